"""Randomness shared by the samplers and models: the step noise, its dropout, the inpainting
re-noising, and the one ancestral update (DDPM Alg. 2, line 4).

Draws go through torch.randn / F.dropout as the original's `noise_like` (the golden fixtures
replay them); with `generator=`, on the generator's device, so a seed reproduces a sample on
any device.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def randn(shape: Sequence[int], like: Tensor, generator: Optional[torch.Generator] = None,
          repeat: bool = False) -> Tensor:
    """Standard normal noise of `shape`, on like's device and dtype.

    Drawn as `torch.randn(shape, device=...)` (looked up at call time, in float32 as the
    original's `noise_like`), or, with `generator`, on the generator's device and moved, so
    that a seed gives the same numbers on CPU and GPU. `repeat`: one draw shared by the batch.
    """
    shape = tuple(shape)
    draw_shape = (1, *shape[1:]) if repeat else shape
    if generator is None:
        z = torch.randn(draw_shape, device=like.device)
    else:
        z = torch.randn(draw_shape, generator=generator, device=generator.device)
    if repeat:
        z = z.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return z.to(device=like.device, dtype=like.dtype)


def dropout(noise: Tensor, p: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Dropout on the step noise (the original's `noise_dropout`)."""
    if p <= 0.0:
        return noise
    if generator is None:
        return F.dropout(noise, p=p)
    keep = torch.bernoulli(torch.full(noise.shape, 1.0 - p, device=generator.device), generator=generator)
    return noise * keep.to(noise) / (1.0 - p)


def mask_with_x0(x: Tensor, t: Tensor, mask: Tensor, x0: Tensor, alphas_cumprod: Tensor,
                 q_sample: Optional[Callable[..., Tensor]], generator: Optional[torch.Generator]) -> Tensor:
    """Inpainting: keep x where mask == 0, and a fresh q(x_t | x0) sample where mask == 1."""
    noise = randn(x0.shape, x0, generator)
    if q_sample is not None:
        x_orig = q_sample(x0, t, noise)
    else:
        a = alphas_cumprod.to(x0.device, torch.float64)[t].reshape(-1, *([1] * (x0.ndim - 1)))
        x_orig = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)
    return x_orig * mask + (1. - mask) * x


def ancestral_step(mean: Tensor, log_variance: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_{t-1} = mean + [t > 0] exp(log_variance / 2) noise (no noise is added at t = 0)."""
    nonzero_mask = (1 - (t == 0).float()).reshape(mean.shape[0], *((1,) * (mean.ndim - 1)))
    return mean + nonzero_mask * (0.5 * log_variance).exp() * noise


def uniform_on_device(r1: float, r2: float, shape: Sequence[int], device: torch.device) -> Tensor:
    """Uniform draws in [r2, r1) (the original ddpm.py's helper; client code imports it from there)."""
    return (r1 - r2) * torch.rand(*shape, device=device) + r2
