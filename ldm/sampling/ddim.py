"""DDIM (Song et al. 2021) as a function of a noise predictor `eps_fn(x, t) -> eps`.

One step from grid index i (timestep t, abar_t) to the previous grid step (abar_prev), Eq. 12:

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z

Randomness follows the original exactly (the golden fixtures replay it): z is drawn at
every step, even for eta = 0 where it is multiplied by 0; with a mask, the noise of
q(x_t | x0) is drawn before the network call of the step.  Pass `generator=` to make a
seed reproduce a sample across devices (draws then happen on the generator's device).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ldm.sampling.guidance import norm_thresholding, split_prediction
from ldm.sampling.noise import dropout, mask_with_x0, randn
from ldm.sampling.schedule_view import ddim_coefficients

Tensor = torch.Tensor
# eps_fn(x, t) -> eps, or (eps, x0) when the network predicts x0 directly (x0 / v models)
EpsFn = Callable[[Tensor, Tensor], Union[Tensor, tuple[Tensor, Tensor]]]
Callback = Callable[[dict[str, Any]], None]


def should_log(index: int, total_steps: int, log_every_t: int) -> bool:
    return index % log_every_t == 0 or index == total_steps - 1


# ----------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------
def ddim_step(x: Tensor, eps: Tensor, a_t: float, a_prev: float, sigma_t: float, *,
              pred_x0: Optional[Tensor] = None, temperature: float = 1.0, noise_dropout: float = 0.0,
              quantize: Optional[Callable[[Tensor], Tensor]] = None, dynamic_threshold: Optional[float] = None,
              generator: Optional[torch.Generator] = None, repeat_noise: bool = False) -> tuple[Tensor, Tensor]:
    """One DDIM update (Eq. 12) -> (x_prev, x0_hat). Draws the step noise (always).

    pred_x0: the network's own x0 (x0 / v models); else derived from eps. quantize (VQ) and
    dynamic_threshold (SD2's norm thresholding) are applied to x0_hat, in that order."""
    if pred_x0 is None:
        pred_x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if quantize is not None:
        pred_x0 = quantize(pred_x0)
    if dynamic_threshold is not None:
        pred_x0 = norm_thresholding(pred_x0, dynamic_threshold)
    dir_xt = max(1.0 - a_prev - sigma_t ** 2, 0.0) ** 0.5 * eps      # direction pointing to x_t
    noise = sigma_t * randn(x.shape, x, generator, repeat_noise) * temperature
    noise = dropout(noise, noise_dropout, generator)
    return a_prev ** 0.5 * pred_x0 + dir_xt + noise, pred_x0


def sample_ddim(eps_fn: EpsFn, x_T: Tensor, alphas_cumprod: Union[Tensor, np.ndarray],
                timesteps: Union[Sequence[int], np.ndarray], eta: float = 0.0, *,
                mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                q_sample: Optional[Callable[..., Tensor]] = None, temperature: float = 1.0,
                noise_dropout: float = 0.0, quantize: Optional[Callable[[Tensor], Tensor]] = None,
                dynamic_threshold: Optional[float] = None, callback: Optional[Callback] = None,
                log_every_t: int = 100,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Run DDIM from x_T down the increasing grid `timesteps` (visited in reverse).

    eps_fn(x, t): noise prediction for x (B, ...) at integer timesteps t (B,), or (eps, x0).
    alphas_cumprod: the N-step abar of the model; timesteps: `make_ddim_timesteps(...)`, or
    `arange(N)` for the full chain.  mask/x0: inpainting (1 = keep x0, re-noised by
    `q_sample(x0, t, noise)` or the closed form).  quantize (VQ models), dynamic_threshold: on x0_hat.
    callback({'i', 'index', 't', 'x', 'pred_x0'}) after every step.
    Returns (x_0, {'x_inter': [...], 'pred_x0': [...]}): x_T first, then every step whose
    index (counting down to 0) is a multiple of log_every_t, and the first step.
    """
    co = ddim_coefficients(alphas_cumprod, timesteps, eta)
    ac = torch.as_tensor(np.asarray(alphas_cumprod.detach().cpu() if torch.is_tensor(alphas_cumprod)
                                    else alphas_cumprod))
    grid = [int(s) for s in np.asarray(timesteps)]
    total = len(grid)
    if mask is not None and q_sample is None:   # moved once here, not in every step's mask_with_x0
        ac = ac.to(device=x_T.device, dtype=torch.float64)
    if mask is not None and x0 is None:
        raise ValueError("sample_ddim: `mask` needs `x0`")
    x = x_T
    intermediates = {"x_inter": [x], "pred_x0": [x]}
    for i, step in enumerate(reversed(grid)):
        index = total - i - 1
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        if mask is not None:
            x = mask_with_x0(x, t, mask, x0, ac, q_sample, generator)
        eps, x0_hat = split_prediction(eps_fn(x, t))
        x, pred_x0 = ddim_step(x, eps, float(co.alphas[index]), float(co.alphas_prev[index]),
                               float(co.sigmas[index]), pred_x0=x0_hat, temperature=temperature,
                               noise_dropout=noise_dropout, quantize=quantize, dynamic_threshold=dynamic_threshold,
                               generator=generator)
        if callback is not None:
            callback({"i": i, "index": index, "t": step, "x": x, "pred_x0": pred_x0})
        if should_log(index, total, log_every_t):
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates


def ddim_invert(eps_fn: EpsFn, x0: Tensor, alphas_cumprod: Union[Tensor, np.ndarray],
                timesteps: Union[Sequence[int], np.ndarray], *, return_intermediates: Optional[int] = None,
                callback: Optional[Callable[[int], None]] = None) -> tuple[Tensor, dict[str, Any]]:
    """Deterministic DDIM encoding x_0 -> x_t along the increasing grid (SD2 `DDIMSampler.encode`).

    Each step moves from abar_prev to abar_t of the same grid index:
    x_next = sqrt(a_t / a_prev) x + sqrt(a_t) (sqrt(1/a_t - 1) - sqrt(1/a_prev - 1)) eps(x, t).
    """
    co = ddim_coefficients(alphas_cumprod, timesteps, 0.0)
    grid = [int(s) for s in np.asarray(timesteps)]
    n = len(grid)
    x = x0
    inter, inter_steps = [], []
    for i, step in enumerate(grid):
        t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
        eps, _ = split_prediction(eps_fn(x, t))
        a_next, a = float(co.alphas[i]), float(co.alphas_prev[i])
        x = (a_next / a) ** 0.5 * x + a_next ** 0.5 * ((1 / a_next - 1) ** 0.5 - (1 / a - 1) ** 0.5) * eps
        if return_intermediates and ((i % max(n // return_intermediates, 1) == 0 and i < n - 1) or i >= n - 2):
            inter.append(x)
            inter_steps.append(i)
        if callback is not None:
            callback(i)
    out: dict[str, Any] = {"x_encoded": x, "intermediate_steps": inter_steps}
    if return_intermediates:
        out["intermediates"] = inter
    return x, out


def stochastic_encode(x0: Tensor, t: Tensor, sqrt_alphas_cumprod: Tensor, sqrt_one_minus_alphas_cumprod: Tensor,
                      noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """q(x_t | x_0) on a (DDIM) grid: t indexes the given coefficient arrays (img2img)."""
    if noise is None:
        noise = randn(x0.shape, x0, generator) if generator is not None else torch.randn_like(x0)
    shape = (-1, *([1] * (x0.ndim - 1)))
    a = sqrt_alphas_cumprod.to(x0.device)[t].reshape(shape).to(x0.dtype)
    s = sqrt_one_minus_alphas_cumprod.to(x0.device)[t].reshape(shape).to(x0.dtype)
    return a * x0 + s * noise
