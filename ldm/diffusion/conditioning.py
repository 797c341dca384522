"""Conditioning plumbing shared by the diffusion models (no networks here).

* `wrap_cond`: a bare conditioning tensor/list becomes the dict DiffusionWrapper takes
  (`c_concat` for concat models, `c_crossattn` otherwise; LDM §3.3).
* `slice_cond`: the first n items of a conditioning (tensor, list or dict of them).
* `apply_ucg`: conditioning dropout for classifier-free guidance training (SD2's
  `ucg_training: {key: {p: 0.1, val: ""}}`): each batch entry of `key` is replaced by `val`
  with probability p, drawn from a numpy RandomState.
* `make_cond_ids`: the shortened conditioning schedule (`num_timesteps_cond`).
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Optional

import numpy as np
import torch

# DiffusionWrapper keyword for each single-kind conditioning_key (as the original's __conditioning_keys__).
CONDITIONING_KEYS: dict[str, str] = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}

WRAPPER_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


def wrap_cond(cond: Any, conditioning_key: Optional[str]) -> dict[str, Any]:
    """dict conditionings pass through; anything else is listed under c_concat / c_crossattn."""
    if isinstance(cond, Mapping):
        return dict(cond)
    if not isinstance(cond, list):
        cond = [cond]
    return {"c_concat" if conditioning_key == "concat" else "c_crossattn": cond}


def slice_cond(cond: Any, n: int) -> Any:
    """First n batch items of a tensor, a list of tensors, or a dict of either."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: (list(map(lambda x: x[:n], v)) if isinstance(v, list) else v[:n]) for k, v in cond.items()}
    if isinstance(cond, list):
        return [c[:n] for c in cond]
    return cond[:n]


def apply_ucg(batch: MutableMapping[str, Any], ucg_training: Mapping[str, Mapping[str, Any]],
              rng: np.random.RandomState) -> MutableMapping[str, Any]:
    """Replace batch[key][i] by the configured null value with probability p (in place; returns batch).

    Draw order as the original: for each key, one `rng.choice(2, p=[1-p, p])` per batch item."""
    for key, spec in ucg_training.items():
        p = float(spec["p"])
        val = spec.get("val", None)
        if val is None:
            val = ""
        items = batch[key]
        for i in range(len(items)):
            if rng.choice(2, p=[1 - p, p]):
                items[i] = val
    return batch


def make_cond_ids(num_timesteps: int, num_timesteps_cond: int) -> torch.Tensor:
    """(T,) long: the conditioning timestep used at each diffusion step when the conditioning
    is itself noised (shorten_cond_schedule); steps past num_timesteps_cond map to T-1."""
    cond_ids = torch.full(size=(num_timesteps,), fill_value=num_timesteps - 1, dtype=torch.long, device="cpu")
    ids = torch.round(torch.linspace(0, num_timesteps - 1, num_timesteps_cond, device="cpu")).long()
    cond_ids[:num_timesteps_cond] = ids
    return cond_ids
