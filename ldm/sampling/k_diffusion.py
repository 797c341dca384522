"""The k-diffusion sampler family (Karras et al. 2022; Lu et al. 2022) as functions of a VE denoiser.

Notation (Karras et al. 2022, "EDM"): data x0, noise level sigma, x = x0 + sigma * eps, and a
denoiser D(x, sigma) ~ E[x0 | x]. The probability-flow ODE is

    dx / dsigma = (x - D(x, sigma)) / sigma  =: d(x, sigma)                        (EDM Eq. 3)

Every sampler here is `sample_*(denoiser, x, sigmas, *, generator=None, callback=None, **opts)`:
`x` is the starting sample at noise level sigmas[0] (e.g. sigmas[0] * N(0, I)), `sigmas` a
decreasing schedule ending with 0 (`get_sigmas_*`), and the return value the sample at sigma = 0.
The denoiser is called as denoiser(x, sigma) with sigma a (B,) tensor in x's dtype and device.

A discrete VP model (DDPM/LDM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, trained at integer
t) is the same process with sigma_t = sqrt((1 - abar_t) / abar_t) and x = x_t / sqrt(abar_t);
`DiscreteVPDenoiser` turns its noise predictor into a VE denoiser (the CompVis wrapping of
k-diffusion: input scaled by 1 / sqrt(1 + sigma^2), sigma mapped to a fractional timestep).

Noise is drawn through `ldm.sampling.ddim.randn` (a `generator` reproduces a sample across
devices). The sigma schedule is read to the host once per call, so the loops do not sync.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ldm.sampling.ddim import randn
from ldm.sampling.guidance import split_prediction

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]        # D(x, sigma) -> x0_hat; sigma: (B,)
Callback = Callable[[dict[str, Any]], None]
ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "get_sigmas_karras", "get_sigmas_uniform", "get_sigmas_trailing", "get_ancestral_step",
    "DiscreteVPDenoiser", "K_SAMPLERS",
]


# ----------------------------------------------------------------------------------------
# Sigma schedules (decreasing, ending with 0)
# ----------------------------------------------------------------------------------------
def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.) -> Tensor:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..n-1, then 0. float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def vp_sigmas(alphas_cumprod: ArrayLike) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of a discrete VP schedule, float64 (N,).

    A zero-terminal-SNR schedule (abar_T = 0) has sigma_T = inf, which no VE sampler can
    start from; abar_T is then taken as 2**-24 (sigma_T ~ 4096), as diffusers does."""
    ac = torch.as_tensor(np.asarray(alphas_cumprod.detach().cpu() if torch.is_tensor(alphas_cumprod)
                                    else alphas_cumprod), dtype=torch.float64).clone()
    ac[ac == 0] = 2.0 ** -24
    return ((1 - ac) / ac).sqrt()


def get_sigmas_uniform(alphas_cumprod: ArrayLike, n: int) -> Tensor:
    """n sigmas at fractional timesteps uniform from N-1 down to 0 (log-sigma interpolated
    between the discrete ones, as k-diffusion's `DiscreteSchedule.get_sigmas`), then 0. float64."""
    log_sigmas = vp_sigmas(alphas_cumprod).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n, dtype=torch.float64)
    return _append_zero(_interp_log_sigma(t, log_sigmas).exp())


def get_sigmas_trailing(alphas_cumprod: ArrayLike, n: int) -> Tensor:
    """n sigmas at the "trailing" timesteps round(N - i N/n) - 1, i = 0..n-1 (Lin et al. 2024,
    Table 2; diffusers' timestep_spacing="trailing": starts at t = N-1), then 0. float64."""
    sigmas = vp_sigmas(alphas_cumprod)
    num_train = len(sigmas)
    t = np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1
    return _append_zero(sigmas[torch.as_tensor(t)])


def _interp_log_sigma(t: Tensor, log_sigmas: Tensor) -> Tensor:
    """log sigma at fractional timesteps t: linear between the neighbouring integer steps."""
    low = t.floor().long().clamp(0, len(log_sigmas) - 1)
    high = t.ceil().long().clamp(0, len(log_sigmas) - 1)
    w = (t - low.to(t.dtype)).to(log_sigmas.dtype)
    return (1 - w) * log_sigmas[low] + w * log_sigmas[high]


# ----------------------------------------------------------------------------------------
# Discrete VP (eps-predicting DDPM/LDM) model -> VE denoiser
# ----------------------------------------------------------------------------------------
class DiscreteVPDenoiser:
    """D(x, sigma) of a discrete VP noise predictor `eps_fn(x_vp, t) -> eps` (or (eps, x0)).

    With x = x0 + sigma eps (VE), the VP input is x_vp = x / sqrt(1 + sigma^2) and
    D(x, sigma) = x - sigma * eps_fn(x_vp, t(sigma)), or the network's own x0 when eps_fn
    returns (eps, x0) (x0 / v models; x0 is the same in both views).
    t(sigma): the fractional timestep whose log-sigma, linearly interpolated between the
    discrete sigma_t = sqrt((1 - abar_t) / abar_t), equals log sigma (k-diffusion's
    `CompVisDenoiser`), or with `quantize=True` the nearest integer timestep (a long tensor).
    """

    def __init__(self, eps_fn: Callable[[Tensor, Tensor], Any], alphas_cumprod: ArrayLike, quantize: bool = False):
        self.eps_fn = eps_fn
        self.quantize = quantize           # nearest integer timestep instead of interpolation
        self.sigmas = vp_sigmas(alphas_cumprod).float()         # (N,) increasing in t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """(B,) sigmas -> (B,) timesteps (float, or long with `quantize`)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma[None] - log_sigmas[:, None]                       # (N, B)
        if self.quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """(fractional) timesteps -> sigma, log-sigma interpolated."""
        return _interp_log_sigma(t.double().cpu(), self.log_sigmas.double()).exp().to(t.device)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        eps, x0 = split_prediction(self.eps_fn(x / (s ** 2 + 1) ** 0.5, self.sigma_to_t(sigma)))
        return x0 if x0 is not None else x - s * eps


# ----------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------
def _host_sigmas(sigmas: ArrayLike) -> list[float]:
    s = sigmas.detach().cpu().tolist() if torch.is_tensor(sigmas) else [float(v) for v in sigmas]
    if len(s) < 2 or s[-1] != 0 or any(b > a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must decrease to a final 0 (use get_sigmas_*), got {s}")
    return s


def _call(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype))


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to: a deterministic
    step to sigma_down, then fresh noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_to^2.
    eta = 1 is the DDPM posterior's noise (eta = 0: no noise, sigma_down = sigma_to)."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _churn(x: Tensor, sigma: float, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, generator: Optional[torch.Generator]) -> tuple[Tensor, float]:
    """EDM Alg. 2 lines 4-6: raise the noise level to sigma_hat = sigma (1 + gamma) with fresh noise."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + randn(x.shape, x, generator) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


def _report(callback: Optional[Callback], i: int, x: Tensor, sigma: float, sigma_hat: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: ArrayLike, *, generator: Optional[torch.Generator] = None,
                 callback: Optional[Callback] = None, s_churn: float = 0., s_tmin: float = 0.,
                 s_tmax: float = float("inf"), s_noise: float = 1.) -> Tensor:
    """Euler's method on the ODE (EDM Alg. 2 without the correction; churn opt-in):
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i)."""
    s = _host_sigmas(sigmas)
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = _call(denoiser, x, sigma_hat)
        _report(callback, i, x, s[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (s[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: ArrayLike, *, eta: float = 1.,
                           generator: Optional[torch.Generator] = None, callback: Optional[Callback] = None,
                           s_noise: float = 1.) -> Tensor:
    """Euler step to sigma_down, then noise of std sigma_up (`get_ancestral_step`); no noise on the last step."""
    s = _host_sigmas(sigmas)
    for i in range(len(s) - 1):
        denoised = _call(denoiser, x, s[i])
        _report(callback, i, x, s[i], s[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + randn(x.shape, x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: ArrayLike, *, generator: Optional[torch.Generator] = None,
                callback: Optional[Callback] = None, s_churn: float = 0., s_tmin: float = 0.,
                s_tmax: float = float("inf"), s_noise: float = 1.) -> Tensor:
    """Heun's 2nd-order method (EDM Alg. 2): Euler predictor, trapezoidal corrector with the
    derivative at sigma_{i+1}; the last step (to sigma = 0) is a plain Euler step."""
    s = _host_sigmas(sigmas)
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = _call(denoiser, x, sigma_hat)
        _report(callback, i, x, s[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, s[i + 1], _call(denoiser, x_2, s[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: ArrayLike, *, generator: Optional[torch.Generator] = None,
                    callback: Optional[Callback] = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = -log sigma, h = lambda_{i+1} - lambda_i:

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - (e^{-h} - 1) D_i',
        D_i' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h_i,

    first order (D_i' = D_i) on the first step and on the last (to sigma = 0)."""
    s = _host_sigmas(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _call(denoiser, x, s[i])
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised     # the limit of the update as sigma_{i+1} -> 0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            if old_denoised is None:
                d_prime = denoised
            else:
                r = h_last / h
                d_prime = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d_prime
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: ArrayLike, *, eta: float = 1.,
                        solver_type: str = "midpoint", generator: Optional[torch.Generator] = None,
                        callback: Optional[Callback] = None, s_noise: float = 1.) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, §4 / k-diffusion), h = lambda_{i+1} - lambda_i, eta_h = eta h:

        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta_h} x_i + (1 - e^{-h-eta_h}) D_i
                  + c (D_i - D_{i-1}) / r                                  (second order, r = h_{i-1}/h)
                  + sigma_{i+1} sqrt(1 - e^{-2 eta_h}) s_noise z,
        c = (1 - e^{-h-eta_h}) / 2                                       (solver_type="midpoint")
        c = (1 - e^{-h-eta_h}) / (-h - eta_h) + 1                         (solver_type="heun")

    The last step (to sigma = 0) returns D. z is i.i.d. Gaussian (k-diffusion draws it from a
    Brownian tree; for one sample path the step increments have the same law)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = _host_sigmas(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _call(denoiser, x, s[i])
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)                 # 1 - e^{-h - eta_h}
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + one_minus * denoised
            if old_denoised is not None:
                r = h_last / h
                c = 0.5 * one_minus if solver_type == "midpoint" else one_minus / (-h - eta_h) + 1
                x = x + c * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + randn(x.shape, x, generator) * (s[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
            h_last = h
        old_denoised = denoised
    return x


# name -> sampler, for the sampler registry
K_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
