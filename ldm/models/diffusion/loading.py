"""`ckpt_path` / `ignore_keys` / `load_only_unet` / `make_it_fit` / `reset_ema` of the diffusion models.

Reading the file and the strict, reported loading are `ldm.checkpoint`'s (the one checkpoint
boundary); this module only prepares the state dict the way the diffusion configs ask for.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def drop_keys(sd: dict[str, torch.Tensor], ignore_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove every key starting with one of `ignore_keys` (logged)."""
    ignore_keys = tuple(ignore_keys or ())
    for k in list(sd):
        if ignore_keys and k.startswith(ignore_keys):
            logger.info("Deleting key %s from state_dict.", k)
            del sd[k]
    return sd


def fit_state_dict(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`make_it_fit` (SD2): tile old weights into new shapes along the first two axes, dividing by
    how often each old input channel is used (counting from 1, as the original)."""
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    for name, param in own.items():
        if name not in sd or sd[name].shape == param.shape:
            continue
        old, new_shape = sd[name], param.shape
        if old.ndim != len(new_shape) or (len(new_shape) > 2 and new_shape[2:] != old.shape[2:]):
            raise ValueError(f"make_it_fit cannot fit {name}: {tuple(old.shape)} -> {tuple(new_shape)}")
        i = torch.arange(new_shape[0]) % old.shape[0]
        if len(new_shape) == 1:
            sd[name] = old[i].clone()
            continue
        j = torch.arange(new_shape[1]) % old.shape[1]
        n_used_old = torch.ones(old.shape[1]).index_add_(0, j, torch.ones(len(j)))
        n_used_new = n_used_old[j].view(1, -1, *([1] * (len(new_shape) - 2)))
        sd[name] = old[i][:, j] / n_used_new.to(old.dtype)
    return sd


def unet_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`load_only_unet`: the DiffusionWrapper's entries, relative to it. (A full checkpoint's
    `model.*` keys are re-rooted; the original silently loaded nothing from such a file.)"""
    if any(k.startswith("model.") for k in sd):
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def ema_from_weights(sd: dict[str, torch.Tensor], ema: torch.nn.Module, model: torch.nn.Module,
                     prefix: str = "model") -> dict[str, torch.Tensor]:
    """Replace the checkpoint's `model_ema.*` by EMA buffers that start at the checkpoint's own
    `model.*` weights (reset_ema, or a checkpoint without EMA weights)."""
    sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    for k, v in ema.state_dict().items():
        sd[f"model_ema.{k}"] = v.clone()
    for name, p in model.named_parameters():
        if p.requires_grad and f"{prefix}.{name}" in sd:
            sd[f"model_ema.{name.replace('.', '')}"] = sd[f"{prefix}.{name}"].clone()
    return sd


def load_diffusion_checkpoint(model: torch.nn.Module, path: str, ignore_keys: Iterable[str] = (),
                              only_model: bool = False, reset_ema: bool = False, make_it_fit: bool = False,
                              prepare: Optional[callable] = None) -> None:
    """Read `path`, drop `ignore_keys`, optionally fit shapes / re-root to the UNet / reset the EMA,
    and load strictly (ldm.checkpoint.load_into)."""
    from ldm.checkpoint import load_into, load_state_dict_file
    sd = drop_keys(load_state_dict_file(path), ignore_keys)
    if prepare is not None:
        sd = prepare(sd)
    if make_it_fit:
        sd = fit_state_dict(model, sd)
    if only_model:
        load_into(model.model, unet_only(sd), source=f"'{path}'")
        return
    ema = getattr(model, "model_ema", None)
    if ema is not None and (reset_ema or not any(k.startswith("model_ema.") for k in sd)):
        if not reset_ema:
            logger.warning("'%s' holds no EMA weights: the EMA starts from the loaded weights", path)
        sd = ema_from_weights(sd, ema, model.model)
    load_into(model, sd, source=f"'{path}'")
