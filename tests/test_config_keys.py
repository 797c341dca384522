"""Every original config builds as is, with the state-dict keys, shapes and dtypes the
original builds (../shared/reference/keys/*.json): the contract released checkpoints load against."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REFERENCE, reference_or_skip
from ldm.util import instantiate_from_config


def _listings() -> list[str]:
    keys = REFERENCE / "keys"
    if not keys.exists():
        return ["<no reference>"]
    return sorted(p.name for p in keys.glob("*.json") if p.name != "skipped.json")


def strip_ckpt_paths(node) -> None:
    """The reference removed every `ckpt_path` before building (they point at local files)."""
    if OmegaConf.is_dict(node):
        if "ckpt_path" in node:
            node.pop("ckpt_path")
        for k in list(node.keys()):
            strip_ckpt_paths(node[k])
    elif OmegaConf.is_list(node):
        for v in node:
            strip_ckpt_paths(v)


def build_on_meta(config_path):
    cfg = OmegaConf.load(config_path)
    strip_ckpt_paths(cfg.model)
    # Meta tensors: the full architecture without allocating or initialising weights.
    with torch.device("meta"):
        return instantiate_from_config(cfg.model)


@pytest.mark.parametrize("listing", _listings())
def test_config_builds_reference_keys(listing: str) -> None:
    ref = reference_or_skip()
    spec = json.loads((ref / "keys" / listing).read_text())
    model = build_on_meta(ref / "configs" / spec["config"])
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    want = [tuple(e) for e in spec["state_dict"]]
    got_keys, want_keys = {k for k, _, _ in got}, {k for k, _, _ in want}
    missing = sorted(want_keys - got_keys)
    unexpected = sorted(got_keys - want_keys)
    assert not missing and not unexpected, (
        f"{spec['config']}: {len(missing)} missing (e.g. {missing[:5]}), "
        f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    got_map = {k: (s, d) for k, s, d in got}
    wrong = [(k, got_map[k], (s, d)) for k, s, d in want if got_map[k] != (list(s), d)]
    assert not wrong, f"{spec['config']}: {len(wrong)} keys differ in shape/dtype, e.g. {wrong[:5]}"
    assert len(got) == spec["n_state_dict_entries"]
