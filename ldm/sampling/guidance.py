"""Network output -> eps, and classifier-free guidance, in one place.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and x_t = alpha_t x_0 + sigma_t eps:

    eps -> eps:  eps                              eps -> x0:  (x_t - sigma_t eps) / alpha_t
    x0  -> eps:  (x_t - alpha_t x0) / sigma_t     x0  -> x0:  x0
    v   -> eps:  alpha_t v + sigma_t x_t          v   -> x0:  alpha_t x_t - sigma_t v
    (the v formulas are LatentDiffusion.predict_eps_from_z_and_v / predict_start_from_z_and_v)

A noise predictor `eps_fn(x, t)` returns eps, or the pair (eps, x0) when the network predicts
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

PARAMETERIZATIONS = ("eps", "x0", "v")


def to_eps(output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    """eps implied by the network `output` at x_t = x; alpha, sigma broadcast against x."""
    if parameterization == "eps":
        return output
    if parameterization == "v":
        return alpha * output + sigma * x
    if parameterization == "x0":
        return (x - alpha * output) / sigma
    raise NotImplementedError(f"parameterization '{parameterization}' not supported (expected {PARAMETERIZATIONS})")


def to_x0(output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    """x0 implied by the network `output` at x_t = x (for v: = LatentDiffusion.predict_start_from_z_and_v)."""
    if parameterization == "eps":
        return eps_to_x0(output, x, alpha, sigma)
    if parameterization == "v":
        return alpha * x - sigma * output
    if parameterization == "x0":
        return output
    raise NotImplementedError(f"parameterization '{parameterization}' not supported (expected {PARAMETERIZATIONS})")


def eps_to_x0(eps: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - sigma * eps) / alpha


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


def cfg_denoiser(model_fn: ModelFn, scale: Scale) -> Callable[..., Tensor]:
    """Wrap `model_fn(x, t, c)` into `guided(x, t, cond, uncond=None)`.

    `scale` is a float or a function of the timestep batch `t` (a per-step schedule).
    Without `uncond`, or with scale 1, it is a single plain call."""
    def guided(x: Tensor, t: Tensor, cond: Cond, uncond: Optional[Cond] = None) -> Tensor:
        s = scale(t) if callable(scale) else scale
        if uncond is None or s == 1.0:
            return model_fn(x, t, cond)
        out_uncond, out_cond = model_fn(torch.cat([x] * 2), torch.cat([t] * 2), cat_cond(uncond, cond)).chunk(2)
        return out_uncond + s * (out_cond - out_uncond)
    return guided


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
