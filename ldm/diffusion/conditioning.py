"""Conditioning plumbing shared by the diffusion models (no networks here).

* `COND_ROUTES`: the one table of how each `cond_stage_key` is read from the batch, whether
  split_input_params tiles it with z, how log_images draws it and what conditioning dropout
  (`ucg_rate`) replaces it by; `WRAPPER_ROUTES`: which DiffusionWrapper slots each
  `conditioning_key` feeds (c_concat -> channels, c_crossattn -> context, y). A new
  conditioning type is one row here plus its encoder.
* `ConditioningDropout`: per-conditioning dropout for classifier-free guidance (ucg_rate).
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
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

# DiffusionWrapper keyword for each single-kind conditioning_key (as the original's __conditioning_keys__).
CONDITIONING_KEYS: dict[str, str] = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}



@dataclass(frozen=True)
class CondRoute:
    """How one kind of conditioning travels from the batch to the UNet."""
    read: str             # "raw": batch[key] as is (strings, bbox tokens); "batch": the whole batch dict
                          #   (class embedders pick their key); "spatial": an image (B, H, W, C) -> (B, C, H, W)
    log: Optional[str]    # how log_images draws it: "text" (rendered), "class" (human_label), "image"
    null: Optional[str]   # what ucg_rate drops it to: "empty_prompt" (""), "null_class" (the embedder's
                          #   unconditional class), "zeros" (the encoded conditioning set to 0)
    tiled: bool = False   # split_input_params cuts it into the same patches as z


COND_ROUTES: dict[str, CondRoute] = {
    "caption": CondRoute("raw", "text", "empty_prompt"),
    "txt": CondRoute("raw", "text", "empty_prompt"),
    "coordinates_bbox": CondRoute("raw", None, None),
    "class_label": CondRoute("batch", "class", "null_class"),
    "cls": CondRoute("batch", "class", "null_class"),
    "image": CondRoute("spatial", "image", "zeros", tiled=True),
    "LR_image": CondRoute("spatial", "image", "zeros", tiled=True),
    "segmentation": CondRoute("spatial", "image", "zeros", tiled=True),
    "bbox_img": CondRoute("spatial", "image", "zeros", tiled=True),
}
DEFAULT_ROUTE = CondRoute("spatial", "image", "zeros")   # any other batch key: an image-like tensor


def cond_route(cond_stage_key: str) -> CondRoute:
    return COND_ROUTES.get(cond_stage_key, DEFAULT_ROUTE)


@dataclass(frozen=True)
class WrapperRoute:
    """Which conditioning slots a DiffusionWrapper `conditioning_key` feeds to the UNet."""
    concat: bool = False       # c_concat is concatenated to x along channels
    context: bool = False      # c_crossattn becomes the cross-attention context
    y: Optional[str] = None    # the class-vector input y: from "c_adm", or "c_crossattn" (adm: its first entry)


WRAPPER_ROUTES: dict[Optional[str], WrapperRoute] = {
    None: WrapperRoute(),
    "concat": WrapperRoute(concat=True),
    "crossattn": WrapperRoute(context=True),
    "hybrid": WrapperRoute(concat=True, context=True),
    "adm": WrapperRoute(y="c_crossattn"),
    "hybrid-adm": WrapperRoute(concat=True, context=True, y="c_adm"),
    "crossattn-adm": WrapperRoute(context=True, y="c_adm"),
}
WRAPPER_KEYS = tuple(WRAPPER_ROUTES)


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


# ----------------------------------------------------------------------------------------
# Conditioning dropout for classifier-free guidance (ucg_rate)
# ----------------------------------------------------------------------------------------
class ConditioningDropout:
    """Per-conditioning dropout while training (SD2 / generative-models' `ucg_rate`).

    rates: {"cond": p} for the cond stage's conditioning (text -> the empty prompt, class -> the
    embedder's null class, spatial -> zeros, as `COND_ROUTES` says), and {"c_concat": p} /
    {"c_adm": p} for the other slots (zeroed). Each batch item is dropped with probability p by
    `torch.rand` draws (from `generator`, else the global RNG that Lightning seeds), one (B,) draw
    per enabled entry in the order cond, c_concat, c_adm; nothing is drawn when no rate is set.
    The text / class nulls are what `get_unconditional_conditioning` gives at sampling time.
    """
    SLOTS = ("cond", "c_concat", "c_adm")

    def __init__(self, rates: Union[None, float, Mapping[str, float]], route: CondRoute):
        if rates is None:
            rates = {}
        elif not isinstance(rates, Mapping):
            rates = {"cond": float(rates)}
        unknown = set(rates) - set(self.SLOTS)
        if unknown:
            raise ValueError(f"ucg_rate: unknown conditioning(s) {sorted(unknown)} (use {list(self.SLOTS)})")
        for k, p in rates.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"ucg_rate.{k} must be in [0, 1], got {p}")
        self.rates = {k: float(p) for k, p in rates.items() if float(p) > 0.0}
        self.route = route
        if "cond" in self.rates and route.null is None:
            raise ValueError("ucg_rate: this conditioning kind has no null value to drop to")

    def __bool__(self) -> bool:
        return bool(self.rates)

    def draw(self, name: str, n: int, device: Any, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """(n,) bool: the items to drop, or None when `name` is not dropped."""
        p = self.rates.get(name)
        if p is None:
            return None
        u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
        return (u < p).to(device)

    def drop_raw(self, xc: Any, drop: torch.Tensor, null_class: Any = None) -> Any:
        """The cond stage's input with dropped items replaced: strings by "", class labels by the null class."""
        if self.route.null == "empty_prompt":
            flags = drop.tolist()
            return [("" if f else v) for v, f in zip(list(xc), flags)]
        if self.route.null == "null_class":
            out = dict(xc)
            (key, nulls), = null_class.items()
            labels = out[key]
            out[key] = torch.where(drop.to(labels.device), nulls.to(labels), labels)
            return out
        return xc

    def drop_batch(self, batch: Mapping[str, Any], key: str, device: Any, null_class_fn: Any = None) -> Any:
        """A copy of the batch with the cond stage's input dropped (text / class kinds; others as is).
        null_class_fn(n, device=...) -> {key: null labels} (the class embedder's unconditional class)."""
        if self.route.null not in ("empty_prompt", "null_class"):
            return batch
        drop = self.draw("cond", len(batch[key]), device)
        if drop is None:
            return batch
        if self.route.null == "empty_prompt":
            return {**batch, key: self.drop_raw(batch[key], drop)}
        return {**batch, **self.drop_raw({key: batch[key]}, drop, null_class=null_class_fn(len(drop), device=device))}

    def drop_encoded(self, c: Any, cond_slot: str, device: Any) -> Any:
        """Encoded conditionings dropped: a spatial cond stage's output (in `cond_slot` of a dict), then
        c_concat, then c_adm, zeroed."""
        first = c[next(iter(c))] if isinstance(c, Mapping) else c
        n = len(first[0] if isinstance(first, list) else first)
        if self.route.null == "zeros":
            drop = self.draw("cond", n, device)
            if drop is not None:
                c = {**c, cond_slot: self.zero(c[cond_slot], drop)} if isinstance(c, Mapping) else self.zero(c, drop)
        for slot in ("c_concat", "c_adm"):
            drop = self.draw(slot, n, device)
            if drop is not None:
                if not isinstance(c, Mapping) or slot not in c:
                    raise ValueError(f"ucg_rate.{slot}: this model's conditioning has no {slot}")
                c = {**c, slot: self.zero(c[slot], drop)}
        return c

    @staticmethod
    def zero(c: Any, drop: torch.Tensor) -> Any:
        """c (tensor, or a list of tensors) with the dropped batch items set to zero."""
        if isinstance(c, (list, tuple)):
            return [ConditioningDropout.zero(ci, drop) for ci in c]
        keep = (~drop).to(c.dtype).reshape(-1, *([1] * (c.ndim - 1)))
        return c * keep
