"""Forward process, eps / x0 / v conversions and the training objectives.

Every function takes `s`, the schedule: a `ldm.diffusion.schedule.Schedule` view (what the
models pass), or any object carrying those tensors as attributes (the upscaler's
noise-augmentation module), and a batch of integer timesteps `t` (B,). The eps / x0 / v
conversions themselves are `ldm.diffusion.denoiser`'s (one copy).

    x_t   = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                          (q_sample, DDPM Eq. 4)
    x_0   = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps                       (predict_start_from_noise)
    v     = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0                           (Salimans & Ho 2022, §4)
    x_0   = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,  eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t

Losses: LDM Eq. 2 (`loss_simple`, the reweighted bound), optionally divided by a
(learned) per-step log-variance, plus `original_elbo_weight` times the bound term L_vlb.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.diffusion import denoiser as D
from ldm.diffusion.schedule import Coefficients
from ldm.diffusion.schedule import extract_into_tensor as _x

Tensor = torch.Tensor


def q_sample(s: Any, x_start: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
    """Sample x_t ~ q(x_t | x_0); draws `torch.randn_like(x_start)` when no noise is given."""
    if noise is None:
        noise = torch.randn_like(x_start)
    return (_x(s.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _x(s.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def q_mean_variance(s: Any, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and log-variance of q(x_t | x_0), each broadcast to x_start's shape (mean) / (B,1,..)."""
    mean = _x(s.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _x(1.0 - s.alphas_cumprod, t, x_start.shape)
    log_variance = _x(s.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance


def q_posterior(s: Any, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (_x(s.posterior_mean_coef1, t, x_t.shape) * x_start
            + _x(s.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = _x(s.posterior_variance, t, x_t.shape)
    log_variance = _x(s.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def coefficients(s: Any, t: Tensor, x_shape: Sequence[int]) -> Coefficients:
    """The forward-process coefficients of schedule `s` (a `Schedule` view, or any object holding
    its buffers) at timesteps t (B,), shaped to broadcast against x_shape."""
    return Coefficients(_x(s.sqrt_alphas_cumprod, t, x_shape), _x(s.sqrt_one_minus_alphas_cumprod, t, x_shape),
                        _x(s.sqrt_recip_alphas_cumprod, t, x_shape), _x(s.sqrt_recipm1_alphas_cumprod, t, x_shape))


# The original's method names, over the one set of conversions in ldm.diffusion.denoiser.
def predict_start_from_noise(s: Any, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return D.x0_from_eps(coefficients(s, t, x_t.shape), x_t, noise)


def predict_eps_from_xstart(s: Any, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
    return D.eps_from_x0(coefficients(s, t, x_t.shape), x_t, pred_xstart)


def get_v(s: Any, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    return D.v_from(coefficients(s, t, x.shape), x, noise)


def predict_start_from_z_and_v(s: Any, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    return D.x0_from_v(coefficients(s, t, x_t.shape), x_t, v)


def predict_eps_from_z_and_v(s: Any, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    return D.eps_from_v(coefficients(s, t, x_t.shape), x_t, v)


def predict_start(s: Any, parameterization: str, x_t: Tensor, t: Tensor, model_out: Tensor) -> Tensor:
    """x_0 from the network output under any parameterization."""
    return D.to_x0(model_out, x_t, coefficients(s, t, x_t.shape), parameterization)


def training_target(s: Any, parameterization: str, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the network regresses: eps, x_0, or v."""
    return D.training_target(coefficients(s, t, x_start.shape), parameterization, x_start, noise)


def get_loss(pred: Tensor, target: Tensor, loss_type: str = "l2", mean: bool = True) -> Tensor:
    """l1 / l2 distance, reduced to a scalar (mean=True) or elementwise."""
    if loss_type == "l1":
        loss = (target - pred).abs()
        return loss.mean() if mean else loss
    if loss_type == "l2":
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")
    raise NotImplementedError(f"unknown loss type '{loss_type}'")


def per_sample(loss: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return loss.mean(dim=list(range(1, loss.ndim)))


def diffusion_loss(loss: Tensor, t: Tensor, lvlb_weights: Tensor, l_simple_weight: float,
                   original_elbo_weight: float, prefix: str, *, logvar: Optional[Tensor] = None,
                   learn_logvar: bool = False, weights: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The DDPM / LatentDiffusion objective from per-sample losses (B,) (LDM Eq. 2 plus the bound term).

    weights: an optional per-sample factor w(t) (B,) of the simple term (the loss-weighting seam:
      min-SNR, P2, EDM; `ldm.diffusion.weighting`); None is the original objective exactly.
    logvar: LatentDiffusion's per-step log-variance: loss / exp(logvar_t) + logvar_t (DDPM: None,
      as the original's DDPM ignored it). Keys as the original: loss_simple, [loss_gamma, logvar],
      loss_vlb, loss."""
    log: dict[str, Tensor] = {f"{prefix}/loss_simple": loss.mean()}
    weighted = loss if weights is None else weights.to(loss) * loss
    if logvar is not None:
        logvar_t = logvar[t].to(loss.device)
        weighted = weighted / torch.exp(logvar_t) + logvar_t
        if learn_logvar:
            log[f"{prefix}/loss_gamma"] = weighted.mean()
            log["logvar"] = logvar.data.mean()
    total = l_simple_weight * weighted.mean()
    loss_vlb = (lvlb_weights[t] * loss).mean()
    log[f"{prefix}/loss_vlb"] = loss_vlb
    total = total + original_elbo_weight * loss_vlb
    log[f"{prefix}/loss"] = total
    return total, log
