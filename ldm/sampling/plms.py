"""PLMS: pseudo linear multistep sampling (Liu et al. 2022, PNDM) on DDIM's update.

The DDIM update x_prev = phi(x_t, eps) is applied with an Adams-Bashforth combination of
the current and up to three previous noise predictions:

    first step:  eps' = (eps(x_t, t) + eps(phi(x_t, eps(x_t, t)), t_next)) / 2   (Heun-like, 2 calls)
    then:        eps' = (3 e_0 - e_1) / 2
                 eps' = (23 e_0 - 16 e_1 + 5 e_2) / 12
                 eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24

As the original, the first step draws the step noise twice (once for the trial update).
PLMS is deterministic: eta must be 0.  Only the eps of `eps_fn` is used (x0_hat always
follows from the combined eps').
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ldm.sampling.ddim import Callback, EpsFn, ddim_step, should_log
from ldm.sampling.noise import mask_with_x0
from ldm.sampling.guidance import split_prediction
from ldm.sampling.schedule_view import ddim_coefficients

Tensor = torch.Tensor


def plms_eps(eps: Tensor, old_eps: Sequence[Tensor]) -> Tensor:
    """Adams-Bashforth combination of eps (current) with old_eps (oldest first), order len(old_eps)+1."""
    n = len(old_eps)
    if n == 1:
        return (3 * eps - old_eps[-1]) / 2
    if n == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    if n >= 3:
        return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    raise ValueError("plms_eps needs at least one previous eps (the first step is handled by sample_plms)")


def sample_plms(eps_fn: EpsFn, x_T: Tensor, alphas_cumprod: Union[Tensor, np.ndarray],
                timesteps: Union[Sequence[int], np.ndarray], *,
                mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                q_sample: Optional[Callable[..., Tensor]] = None, temperature: float = 1.0,
                noise_dropout: float = 0.0, quantize: Optional[Callable[[Tensor], Tensor]] = None,
                dynamic_threshold: Optional[float] = None, callback: Optional[Callback] = None,
                log_every_t: int = 100,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Run PLMS from x_T down the increasing grid `timesteps`; arguments and result as `sample_ddim`."""
    co = ddim_coefficients(alphas_cumprod, timesteps, 0.0)
    ac = torch.as_tensor(np.asarray(alphas_cumprod.detach().cpu() if torch.is_tensor(alphas_cumprod)
                                    else alphas_cumprod))
    time_range = [int(s) for s in np.asarray(timesteps)][::-1]
    total = len(time_range)
    if mask is not None and q_sample is None:   # moved once here, not in every step's mask_with_x0
        ac = ac.to(device=x_T.device, dtype=torch.float64)
    if mask is not None and x0 is None:
        raise ValueError("sample_plms: `mask` needs `x0`")
    x = x_T
    b = x.shape[0]
    intermediates = {"x_inter": [x], "pred_x0": [x]}
    old_eps: list[Tensor] = []
    step_kw = dict(temperature=temperature, noise_dropout=noise_dropout, quantize=quantize,
                   dynamic_threshold=dynamic_threshold, generator=generator)
    eps_only = lambda x, t: split_prediction(eps_fn(x, t))[0]      # noqa: E731
    for i, step in enumerate(time_range):
        index = total - i - 1
        coef = (float(co.alphas[index]), float(co.alphas_prev[index]), float(co.sigmas[index]))
        t = torch.full((b,), step, device=x.device, dtype=torch.long)
        t_next = torch.full((b,), time_range[min(i + 1, total - 1)], device=x.device, dtype=torch.long)
        if mask is not None:
            x = mask_with_x0(x, t, mask, x0, ac, q_sample, generator)
        e_t = eps_only(x, t)
        if not old_eps:
            x_trial, _ = ddim_step(x, e_t, *coef, **step_kw)
            e_prime = (e_t + eps_only(x_trial, t_next)) / 2
        else:
            e_prime = plms_eps(e_t, old_eps)
        x, pred_x0 = ddim_step(x, e_prime, *coef, **step_kw)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback({"i": i, "index": index, "t": step, "x": x, "pred_x0": pred_x0})
        if should_log(index, total, log_every_t):
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates
