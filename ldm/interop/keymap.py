"""Key maps between our state dicts and diffusers', as lists of small invertible rules.

A `Rule` says: these keys of ours <-> those keys of diffusers, through an exact tensor
transform (rename, reshape, split / concatenate). Every transform is a permutation or a
reshape of the same numbers, so ours -> diffusers -> ours is bit-identical by construction.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


class InteropError(ValueError):
    """A model that has no exact diffusers counterpart, or a folder we cannot read back."""


def _identity(ts: list[Tensor]) -> list[Tensor]:
    return ts


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]                              # our keys
    theirs: tuple[str, ...]                            # diffusers keys
    to_theirs: Callable[[list[Tensor]], list[Tensor]] = _identity
    to_ours: Callable[[list[Tensor]], list[Tensor]] = _identity


def rename(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


def squeeze_to_linear(ours: str, theirs: str, ndim: int) -> Rule:
    """A 1x1 convolution weight (O, C, 1[, 1]) of ours <-> a Linear weight (O, C)."""
    ones = (1,) * (ndim - 2)
    return Rule((ours,), (theirs,), lambda t: [t[0].reshape(t[0].shape[:2])],
                lambda t: [t[0].reshape(*t[0].shape, *ones)])


def split_qkv(ours: str, theirs: Sequence[str], heads: int, heads_first: bool) -> Rule:
    """The fused qkv of an AttentionBlock ((3C, C, 1) weight or (3C,) bias) <-> to_q/to_k/to_v.

    heads_first (QKVAttentionLegacy): channels ordered (head, q|k|v, ch); else (q|k|v, head, ch)."""
    def fwd(ts: list[Tensor]) -> list[Tensor]:
        w = ts[0]
        rest = w.shape[1:2] if w.ndim > 1 else ()                 # weights: (3C, C, 1) -> C columns
        ch = w.shape[0] // (3 * heads)
        w = w.reshape(heads, 3, ch, *rest) if heads_first else w.reshape(3, heads, ch, *rest)
        parts = w.unbind(1) if heads_first else w.unbind(0)       # 3 x (heads, ch, ...)
        return [p.reshape(heads * ch, *rest).contiguous() for p in parts]

    def bwd(ts: list[Tensor]) -> list[Tensor]:
        q = ts[0]
        ch = q.shape[0] // heads
        rest = q.shape[1:]
        parts = [t.reshape(heads, ch, *rest) for t in ts]
        w = torch.stack(parts, 1 if heads_first else 0).reshape(3 * heads * ch, *rest)
        return [w.unsqueeze(-1).contiguous() if w.ndim == 2 else w.contiguous()]

    return Rule((ours,), tuple(theirs), fwd, bwd)


def prefixed(rules: Sequence[Rule], ours_prefix: str, theirs_prefix: str) -> list[Rule]:
    return [Rule(tuple(ours_prefix + k for k in r.ours), tuple(theirs_prefix + k for k in r.theirs),
                 r.to_theirs, r.to_ours) for r in rules]


def _apply(rules: Sequence[Rule], sd: Mapping[str, Tensor], forward: bool, what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for r in rules:
        src, dst = (r.ours, r.theirs) if forward else (r.theirs, r.ours)
        missing = [k for k in src if k not in sd]
        if missing:
            raise InteropError(f"{what}: key(s) {missing[:3]} not found in the state dict")
        fn = r.to_theirs if forward else r.to_ours
        for k, v in zip(dst, fn([sd[k] for k in src])):
            out[k] = v
        used.update(src)
    left = sorted(set(sd) - used)
    if left:
        raise InteropError(f"{what}: {len(left)} key(s) have no counterpart: {left[:5]}")
    return out


def to_theirs(rules: Sequence[Rule], sd: Mapping[str, Tensor], what: str = "export") -> dict[str, Tensor]:
    """Our (sub-)state dict -> the diffusers one; every key must be covered by exactly the rules."""
    return _apply(rules, sd, True, what)


def to_ours(rules: Sequence[Rule], sd: Mapping[str, Tensor], what: str = "import") -> dict[str, Tensor]:
    return _apply(rules, sd, False, what)


def module_rules(module: torch.nn.Module, ours_prefix: str, theirs_prefix: str,
                 names: Mapping[str, str]) -> list[Rule]:
    """Renames for every parameter / buffer of `module`: `names` maps our sub-module prefixes
    (e.g. "in_layers.0") to theirs ("norm1"); keys of ours not covered raise."""
    rules = []
    for key in module.state_dict():
        head, _, leaf = key.rpartition(".")
        if head not in names:
            raise InteropError(f"no diffusers counterpart for '{ours_prefix}{key}'")
        rules.append(rename(ours_prefix + key, f"{theirs_prefix}{names[head]}.{leaf}"))
    return rules
