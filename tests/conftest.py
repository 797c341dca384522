"""Shared test fixtures: the reference data in ../shared/reference (skipped when absent)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("LDM_REFERENCE", ROOT.parent / "shared" / "reference"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def reference_or_skip() -> Path:
    if not (REFERENCE / "golden_runner.py").exists():
        pytest.skip(f"reference data not found at {REFERENCE} (set LDM_REFERENCE to the shared/reference folder)")
    return REFERENCE


@pytest.fixture
def reference() -> Path:
    return reference_or_skip()
