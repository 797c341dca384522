"""Ancestral DDPM sampling (Ho et al. 2020, Alg. 2) as a function of a noise predictor.

    x0_hat  = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps(x_t, t)      (clipped to [-1, 1] if asked)
    x_{t-1} = c1_t x0_hat + c2_t x_t + [t > 0] exp(log(beta~_t) / 2) z

with the posterior coefficients of `ldm.diffusion.schedule`.  As the original
`p_sample_loop`, noise is drawn at every step (also t = 0, where it is masked out), and an
inpainting mask is applied AFTER each step (DDIM/PLMS apply it before).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ldm.diffusion.schedule import schedule_arrays
from ldm.sampling.ddim import Callback, EpsFn
from ldm.sampling.noise import dropout, mask_with_x0, randn
from ldm.sampling.guidance import split_prediction

Tensor = torch.Tensor


def ddpm_step(x: Tensor, eps: Tensor, t: int, arrays: dict[str, np.ndarray], *, pred_x0: Optional[Tensor] = None,
              clip_denoised: bool = True, quantize: Optional[Callable[[Tensor], Tensor]] = None,
              temperature: float = 1.0, noise_dropout: float = 0.0,
              generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """One ancestral step from integer timestep t -> (x_{t-1}, x0_hat). Draws the noise (always).
    pred_x0: the network's own x0 (x0 / v models); else derived from eps."""
    x0 = pred_x0
    if x0 is None:
        x0 = float(arrays["sqrt_recip_alphas_cumprod"][t]) * x - float(arrays["sqrt_recipm1_alphas_cumprod"][t]) * eps
    if clip_denoised:
        x0 = x0.clamp(-1., 1.)
    if quantize is not None:
        x0 = quantize(x0)
    mean = float(arrays["posterior_mean_coef1"][t]) * x0 + float(arrays["posterior_mean_coef2"][t]) * x
    noise = dropout(randn(x.shape, x, generator) * temperature, noise_dropout, generator)
    std = float(np.exp(0.5 * arrays["posterior_log_variance_clipped"][t])) if t > 0 else 0.0
    return mean + std * noise, x0


def sample_ddpm(eps_fn: EpsFn, x_T: Tensor, betas: Union[Tensor, np.ndarray, Sequence[float], Mapping], *,
                v_posterior: float = 0.0, clip_denoised: bool = True, start_T: Optional[int] = None,
                mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                q_sample: Optional[Callable[..., Tensor]] = None, temperature: float = 1.0,
                noise_dropout: float = 0.0, quantize: Optional[Callable[[Tensor], Tensor]] = None,
                callback: Optional[Callback] = None, log_every_t: int = 100,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, list[Tensor]]:
    """Run the full reverse chain t = T-1 .. 0 (or from start_T - 1).

    betas: the model's N betas (the posterior is derived from them here, in float64), or a
    mapping holding the schedule buffers themselves (`schedule_arrays` names, e.g. a model's
    registered float32 buffers, which is what the original computed with).
    Returns (x_0, [x_T, then x after every step t with t % log_every_t == 0 or t = T-1]).
    callback({'i', 't', 'x', 'pred_x0'}) after every step.
    """
    as64 = lambda v: v.detach().cpu().double().numpy() if torch.is_tensor(v) else np.asarray(v, np.float64)  # noqa
    arrays = ({k: as64(v) for k, v in betas.items()} if isinstance(betas, Mapping)
              else schedule_arrays(as64(betas), v_posterior))
    ac = torch.as_tensor(arrays["alphas_cumprod"])
    n = len(ac) if start_T is None else min(len(ac), start_T)
    if mask is not None and q_sample is None:   # moved once here, not in every step's mask_with_x0
        ac = ac.to(device=x_T.device, dtype=torch.float64)
    if mask is not None and x0 is None:
        raise ValueError("sample_ddpm: `mask` needs `x0`")
    x = x_T
    intermediates = [x]
    for i, step in enumerate(reversed(range(n))):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        eps, x0_hat = split_prediction(eps_fn(x, t))
        x, pred_x0 = ddpm_step(x, eps, step, arrays, pred_x0=x0_hat, clip_denoised=clip_denoised, quantize=quantize,
                               temperature=temperature, noise_dropout=noise_dropout, generator=generator)
        if mask is not None:
            x = mask_with_x0(x, t, mask, x0, ac, q_sample, generator)
        if step % log_every_t == 0 or step == n - 1:
            intermediates.append(x)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "pred_x0": pred_x0})
    return x, intermediates
