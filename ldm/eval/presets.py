"""Evaluation protocol presets (configs/eval/presets.yaml): the paper's rows by name."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

PRESETS_FILE = Path(__file__).resolve().parents[2] / "configs" / "eval" / "presets.yaml"


def load_presets(path: Optional[str | Path] = None) -> dict[str, dict]:
    """All presets; keys starting with '_' are YAML anchors (templates), not presets."""
    import yaml

    path = Path(path) if path else PRESETS_FILE
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


def get_preset(name: str, path: Optional[str | Path] = None) -> dict:
    presets = load_presets(path)
    if name not in presets:
        hint = difflib.get_close_matches(name, list(presets), n=1)
        raise KeyError(f"unknown preset '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
                       + f" (available: {', '.join(presets)})")
    return dict(presets[name], name=name)
