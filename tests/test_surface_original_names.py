"""Every public module, class and function of the original repositories (latent-diffusion, CompVis
stable-diffusion, Stability-AI stablediffusion; names listed from their trees into
tests/fixtures/original_public_names.json) resolves at its original path in our package, except the
names the README's compatibility notes leave out on purpose (LEFT_OUT, with the reason there)."""
from __future__ import annotations

import importlib
import json

import pytest

from conftest import ROOT

NAMES = json.loads((ROOT / "tests" / "fixtures" / "original_public_names.json").read_text())
REPOS = [r for r in NAMES if not r.startswith("_")]
# README "Compatibility notes: original public surface": vendored third-party networks not rebuilt
LEFT_OUT = ("ldm.modules.karlo", "ldm.modules.midas", "ldm.data.util")


def resolve(repo: str) -> tuple[int, int, list[str]]:
    total = resolved = 0
    missing = []
    for module, names in NAMES[repo]["modules"].items():
        if module.startswith(LEFT_OUT):
            continue
        total += 1 + len(names)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
            continue
        resolved += 1
        for name in names:
            if hasattr(mod, name):
                resolved += 1
            else:
                missing.append(f"{module}.{name}")
    return resolved, total, missing


@pytest.mark.parametrize("repo", REPOS)
def test_original_public_names_resolve(repo):
    resolved, total, missing = resolve(repo)
    everything = sum(1 + len(v) for v in NAMES[repo]["modules"].values())
    print(f"{repo} @ {NAMES[repo]['commit'][:8]}: {resolved}/{total} resolved "
          f"({everything - total} left out on purpose: {', '.join(LEFT_OUT)})")
    assert not missing, f"{repo}: {len(missing)} names do not resolve:\n" + "\n".join(missing)
