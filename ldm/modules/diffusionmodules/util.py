"""Building blocks of the diffusion UNet (after openai/guided-diffusion `nn.py`).

Kept at the original import path because configs, checkpoints' code and user scripts
import from here: `checkpoint`, `timestep_embedding`, `zero_module`, `normalization`
(`GroupNorm32`), `conv_nd`, `linear`, `avg_pool_nd`, `noise_like`.

The schedule helpers the original also kept here (`make_beta_schedule`,
`make_ddim_timesteps`, `make_ddim_sampling_parameters`, `betas_for_alpha_bar`,
`extract_into_tensor`) live in
the one schedule module, `ldm.diffusion.schedule`; importing them from this module still
works (they are forwarded on first access).
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ldm.util import instantiate_from_config, mean_flat  # noqa: F401  (mean_flat re-exported)

_SCHEDULE_NAMES = ("make_beta_schedule", "make_ddim_timesteps", "make_ddim_sampling_parameters",
                   "betas_for_alpha_bar", "extract_into_tensor")


def __getattr__(name: str) -> Any:
    """Forward the original's schedule helpers to `ldm.diffusion.schedule`."""
    if name in _SCHEDULE_NAMES:
        return getattr(importlib.import_module("ldm.diffusion.schedule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------
def checkpoint(func: Callable, inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool) -> Any:
    """Run `func(*inputs)`, recomputing its activations in the backward pass when `flag`.

    Same signature as the original (`params` is accepted for compatibility; the
    non-reentrant `torch.utils.checkpoint` finds the parameters itself). Checkpointing is
    real: only `inputs` are saved for backward, everything inside `func` is recomputed,
    with the RNG state (dropout) and autocast state restored, so gradients are identical.
    Without grad (sampling) it is a plain call.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


# ----------------------------------------------------------------------------------------
# Embeddings and initialisation
# ----------------------------------------------------------------------------------------
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal timestep embeddings, (N,) -> (N, dim), as `cat[cos(t f), sin(t f)]`.

    f_i = exp(-ln(max_period) * i / (dim // 2)), i < dim // 2, computed in float32 exactly
    as the original (its released models were trained on these float32 values); an odd
    `dim` gets a zero column. `repeat_only` repeats the raw timestep value `dim` times.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim).clone()
    half = dim // 2
    freqs = _timestep_freqs(half, max_period, timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


_FREQS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _timestep_freqs(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """The embedding frequencies, computed on the CPU as the original, moved to `device` once
    and cached: a host-to-device copy in every UNet call would synchronise the GPU stream."""
    key = (half, max_period, device)
    freqs = _FREQS.get(key)
    if freqs is None:
        with torch.inference_mode(False):
            freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
            freqs = _FREQS[key] = freqs.to(device=device)
    return freqs


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (output layers: a fresh block is the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale the parameters of `module` by `scale`."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: GroupNorm32 with 32 groups (eps 1e-5)."""
    return GroupNorm32(32, channels)


class SiLU(nn.Module):
    """x * sigmoid(x) (the original's pre-1.7 stand-in; nn.SiLU is used by the UNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    if dims not in _CONVS:
        raise ValueError(f"unsupported dimensions: {dims}")
    return _CONVS[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """A linear layer."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    if dims not in _POOLS:
        raise ValueError(f"unsupported dimensions: {dims}")
    return _POOLS[dims](*args, **kwargs)


# ----------------------------------------------------------------------------------------
# Small tensor helpers the original kept here
# ----------------------------------------------------------------------------------------
def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of `shape`; with `repeat`, one draw shared by the whole batch."""
    if repeat:
        noise = torch.randn((1, *shape[1:]), device=device)
        return noise.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


class HybridConditioner(nn.Module):
    """Two conditioners, one for `c_concat` and one for `c_crossattn`."""

    def __init__(self, c_concat_config: Any, c_crossattn_config: Any):
        super().__init__()
        # c_concat_config: config of the module encoding the concatenated conditioning
        self.concat_conditioner = instantiate_from_config(c_concat_config)
        # c_crossattn_config: config of the module encoding the cross-attention conditioning
        self.crossattn_conditioner = instantiate_from_config(c_crossattn_config)

    def forward(self, c_concat: Any, c_crossattn: Any) -> dict[str, list[torch.Tensor]]:
        return {"c_concat": [self.concat_conditioner(c_concat)],
                "c_crossattn": [self.crossattn_conditioner(c_crossattn)]}


class CheckpointFunction(torch.autograd.Function):
    """The original's activation-checkpointing Function: forward without storing activations,
    recompute them in backward. `args` = `length` inputs, then the parameters to differentiate.
    (`checkpoint` above uses torch.utils.checkpoint; this stays for code that calls it directly.)"""

    @staticmethod
    def forward(ctx: Any, run_function: Callable, length: int, *args: Any) -> Any:
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx: Any, *output_grads: torch.Tensor) -> tuple:
        inputs = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            # views, so that in-place ops inside run_function do not modify the detached leaves
            outputs = ctx.run_function(*[x.view_as(x) for x in inputs])
        grads = torch.autograd.grad(outputs, inputs + ctx.input_params, output_grads, allow_unused=True)
        del ctx.input_tensors, ctx.input_params
        return (None, None) + tuple(grads)
