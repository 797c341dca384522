"""Classifier-free guidance as a wrapper of a network call, and what the sampler loops share.

The eps / x0 / v conversions are `ldm.diffusion.denoiser`'s. A noise predictor `eps_fn(x, t)` returns eps, or the pair (eps, x0) when the network predicts
x0 or v: DDIM then uses that x0 as is, as the original did for v (no cancellation in
(x_t - sigma eps) / alpha at high noise).

Classifier-free guidance (Ho & Salimans 2022): out = out(uncond) + s (out(cond) - out(uncond)),
with cond and uncond evaluated in ONE batched network call (uncond first, as the original).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

Tensor = torch.Tensor
Cond = Any   # a tensor, a list of tensors, or a dict {'c_concat': [...], 'c_crossattn': [...]}
ModelFn = Callable[[Tensor, Tensor, Cond], Tensor]
Scale = Union[float, Callable[[Tensor], float]]

def norm_thresholding(x0: Tensor, value: float) -> Tensor:
    """SD2's dynamic threshold: scale each sample's x0_hat down to an RMS of at most `value`."""
    s = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / batch_view(s, x0))


def batch_view(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def split_prediction(pred: Union[Tensor, tuple[Tensor, Tensor]]) -> tuple[Tensor, Optional[Tensor]]:
    """eps_fn result -> (eps, x0 or None)."""
    return (pred[0], pred[1]) if isinstance(pred, tuple) else (pred, None)


def cat_cond(uncond: Cond, cond: Cond) -> Cond:
    """Batch unconditional and conditional conditioning along dim 0, uncond first.

    Works on tensors, lists of tensors and dicts of tensors or lists (hybrid conditioning)."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(uncond) != set(cond):
            raise ValueError(f"unconditional conditioning must be a dict with keys {sorted(cond)}, "
                             f"got {sorted(uncond) if isinstance(uncond, dict) else type(uncond).__name__}")
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError("unconditional conditioning must be a list as long as the conditioning")
        return [cat_cond(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def _guide(model_fn: ModelFn, x: Tensor, t: Tensor, cond: Cond, uncond: Optional[Cond], s: float,
           guidance_rescale: float = 0.0) -> Tensor:
    if uncond is None or s == 1.0:
        return model_fn(x, t, cond)
    out_uncond, out_cond = model_fn(torch.cat([x] * 2), torch.cat([t] * 2), cat_cond(uncond, cond)).chunk(2)
    out = out_uncond + s * (out_cond - out_uncond)
    if guidance_rescale:
        from ldm.sampling.guidance import rescale_noise_cfg   # Lin et al. 2024, Sec. 3.4
        out = rescale_noise_cfg(out, out_cond, guidance_rescale)
    return out


def cfg_denoiser(model_fn: ModelFn, scale: Scale, guidance_rescale: float = 0.0) -> Callable[..., Tensor]:
    """Wrap `model_fn(x, t, c)` into `guided(x, t, cond, uncond=None)`.

    `scale` is a float or a function of the timestep batch `t` (a per-step schedule).
    Without `uncond`, or with scale 1, it is a single plain call. guidance_rescale (phi):
    the guided output is rescaled toward the conditional output's standard deviation."""
    def guided(x: Tensor, t: Tensor, cond: Cond, uncond: Optional[Cond] = None) -> Tensor:
        return _guide(model_fn, x, t, cond, uncond, scale(t) if callable(scale) else scale, guidance_rescale)
    return guided


def guidance(uncond: Optional[Cond], scale: Scale, guidance_rescale: float = 0.0
             ) -> Callable[[ModelFn], ModelFn]:
    """The CFG wrapper of a denoiser's network (`Denoiser.with_network(guidance(uc, 7.5))`):
    network(x, t, cond) -> guided output, cond and uncond batched in one call (uncond first)."""
    def wrap(model_fn: ModelFn) -> ModelFn:
        def guided(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
            return _guide(model_fn, x, t, cond, uncond, scale(t) if callable(scale) else scale, guidance_rescale)
        return guided
    return wrap


def cond_batch_size(cond: Cond) -> Optional[int]:
    """Batch size of a conditioning (first tensor found), or None."""
    while isinstance(cond, (dict, list, tuple)) and len(cond):
        cond = next(iter(cond.values())) if isinstance(cond, dict) else cond[0]
    return cond.shape[0] if isinstance(cond, Tensor) else None


def rescale_noise_cfg(guided: Tensor, cond_out: Tensor, guidance_rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, §3.4, Eq. 15-16, phi = guidance_rescale):

        rescaled = guided * std(cond_out) / std(guided)       (per sample, over all non-batch dims)
        out      = phi * rescaled + (1 - phi) * guided

    undoes the over-exposure of large guidance scales; phi = 0 returns `guided` unchanged."""
    if guidance_rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided
