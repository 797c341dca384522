"""Every golden fixture recorded from the original implementation replays on our package."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REFERENCE, reference_or_skip


def _case_ids() -> list[str]:
    golden = REFERENCE / "golden"
    if not golden.exists():
        return ["<no reference>"]
    return sorted(p.name for p in golden.iterdir() if (p / "case.json").exists())


def _runner():
    spec = importlib.util.spec_from_file_location("golden_runner", REFERENCE / "golden_runner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_case(case_id: str) -> None:
    ref = reference_or_skip()
    runner = _runner()
    case_dir = ref / "golden" / case_id
    status, msg, worst = runner.run_case(case_dir)
    desc = json.loads((case_dir / "case.json").read_text())["description"]
    assert status == "PASS", f"{case_id} ({desc}): {status}: {msg}"
