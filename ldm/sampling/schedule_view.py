"""What the samplers read from a diffusion schedule: DDIM step grids and coefficients,
and the continuous-time view of a discrete schedule that DPM-Solver integrates.

Notation: abar_t = alphas_cumprod[t] for the N training steps t = 0..N-1 (DDPM Eq. 4).

DDIM (Song et al. 2021, Eq. 12 and 16), for a sub-grid tau_1 < ... < tau_S of timesteps:

    x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    sigma    = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)

DPM-Solver (Lu et al. 2022) sees the discrete schedule as a continuous VP process on
t in [1/N, 1]: step n sits at t_n = (n + 1) / N, log(alpha_t) = log(abar)/2 is linearly
interpolated in between, sigma_t = sqrt(1 - alpha_t^2), lambda_t = log(alpha_t / sigma_t).
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

Tensor = torch.Tensor
ArrayLike = Union[Tensor, np.ndarray]


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = True) -> np.ndarray:
    """The S DDPM timesteps DDIM visits, increasing, as the original computes them.

    uniform: every (N // S)-th step from 0; quad: (linspace(0, sqrt(0.8 N), S))**2.
    Both are shifted by +1 (the original: "to get the final alpha values right"), so the
    grid is 1, 1 + c, ... and the last DDIM step lands on abar_0 (see `ddim_coefficients`).
    When N - c + 1 = N (S = 3 or S = N for N = 1000) the shifted grid would end at N, which
    the original then indexed out of range and crashed on; that step is dropped here.
    """
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        if c < 1:
            raise ValueError(f"cannot take {num_ddim_timesteps} DDIM steps from {num_ddpm_timesteps} DDPM steps")
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    steps_out = steps + 1
    steps_out = steps_out[steps_out < num_ddpm_timesteps]     # only ever crashed in the original
    if verbose:
        log.info("Selected timesteps for ddim sampler: %s", steps_out)
    return steps_out


class DDIMCoefficients(NamedTuple):
    """Per-step DDIM quantities for a timestep grid, float64, indexed like the grid."""
    alphas: Tensor        # abar at each grid step                          (S,)
    alphas_prev: Tensor   # abar of the step the update lands on            (S,)
    sigmas: Tensor        # noise scale of that update (0 for eta = 0)      (S,)


def ddim_coefficients(alphas_cumprod: ArrayLike, timesteps: ArrayLike, eta: float) -> DDIMCoefficients:
    """DDIM coefficients for an increasing grid of DDPM timesteps (computed in float64).

    The update from grid step i lands on the noise level of grid step i-1; the first grid
    step lands on abar_0 when the grid starts above 0 (the DDIM grids of
    `make_ddim_timesteps`, as the original) and on clean data (abar = 1) when it includes
    t = 0 (the full chain `arange(N)`, the original's `use_original_steps`).
    """
    ac = torch.as_tensor(np.asarray(alphas_cumprod.detach().cpu() if torch.is_tensor(alphas_cumprod)
                                    else alphas_cumprod), dtype=torch.float64)
    ts = torch.as_tensor(np.asarray(timesteps), dtype=torch.long)
    if ts.ndim != 1 or len(ts) == 0 or bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError(f"timesteps must be a non-empty increasing 1-D grid, got {np.asarray(timesteps)}")
    alphas = ac[ts]
    first = ac[:1] if int(ts[0]) > 0 else torch.ones(1, dtype=torch.float64)
    alphas_prev = torch.cat([first, ac[ts[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return DDIMCoefficients(alphas, alphas_prev, sigmas)


def make_ddim_sampling_parameters(alphacums: ArrayLike, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = True) -> tuple[Tensor, Tensor, np.ndarray]:
    """(sigmas, alphas, alphas_prev) with the original's types: float64 tensor, tensor in the
    dtype of `alphacums`, float64 numpy array (DDIMSampler exposes them as attributes)."""
    co = ddim_coefficients(alphacums, ddim_timesteps, eta)
    dtype = alphacums.dtype if torch.is_tensor(alphacums) else torch.float64
    if torch.is_tensor(alphacums):
        alphas = alphacums.detach().cpu()[torch.as_tensor(np.asarray(ddim_timesteps), dtype=torch.long)]
    else:
        alphas = co.alphas.to(dtype)
    if verbose:
        log.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s; sigmas (eta=%s): %s",
                 alphas, co.alphas_prev.numpy(), eta, co.sigmas)
    return co.sigmas, alphas, co.alphas_prev.numpy()


# ----------------------------------------------------------------------------------------
# Continuous-time view (DPM-Solver)
# ----------------------------------------------------------------------------------------
def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear f(x) through (xp, fp), xp increasing; linear extrapolation outside."""
    k = xp.shape[0]
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, k - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule:
    """A discrete schedule of N steps as a continuous VP process on t in [1/N, 1].

    Computed in the dtype of `alphas_cumprod` (the original DPM-Solver sampler uses a float32
    copy, and so does DPMSolverSampler, to reproduce it).
    """

    def __init__(self, alphas_cumprod: Tensor):
        self.total_N = alphas_cumprod.shape[0]
        self.T = 1.0
        dtype = alphas_cumprod.dtype
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1, dtype=dtype,
                                      device=alphas_cumprod.device)[1:]
        self.log_alpha_array = 0.5 * torch.log(alphas_cumprod)

    @property
    def t_end(self) -> float:
        """The time of training step 0 (where sampling stops)."""
        return 1.0 / self.total_N

    def model_time(self, t: Tensor) -> Tensor:
        """Continuous t -> the (fractional) DDPM timestep the network was trained on: t_n = (n+1)/N -> n."""
        return (t - 1.0 / self.total_N) * self.total_N

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        return _interp(t.reshape(-1), self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def marginal_alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Tensor) -> Tensor:
        """Half log-SNR lambda_t = log alpha_t - log sigma_t."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb: Tensor) -> Tensor:
        """t such that lambda_t = lamb."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        xp = torch.flip(self.log_alpha_array.to(lamb.device), [0])
        fp = torch.flip(self.t_array.to(lamb.device), [0])
        return _interp(log_alpha.reshape(-1), xp, fp)

    def time_steps(self, skip_type: str, t_T: float, t_0: float, n: int, device: torch.device) -> Tensor:
        """n + 1 times from t_T down to t_0: uniform in t, in sqrt(t) ("time_quadratic") or in lambda."""
        dtype = self.t_array.dtype
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, n + 1, dtype=dtype).to(device)
        if skip_type == "time_quadratic":
            return torch.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1, dtype=dtype).pow(2).to(device)
        if skip_type == "logSNR":
            lam = self.marginal_lambda(torch.tensor([t_T, t_0], dtype=dtype))
            return self.inverse_lambda(torch.linspace(float(lam[0]), float(lam[1]), n + 1, dtype=dtype)).to(device)
        raise ValueError(f"unsupported skip_type '{skip_type}' (time_uniform, time_quadratic or logSNR)")


# ----------------------------------------------------------------------------------------
# Timestep spacings (Lin et al. 2024, Table 2; diffusers' `timestep_spacing`)
# ----------------------------------------------------------------------------------------
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The `num_steps` training timesteps a sampler visits, increasing (like make_ddim_timesteps).

    leading:  0, c, 2c, ... with c = N // S, plus `steps_offset` (SD's offset 1 gives the
              original's uniform DDIM grid)
    trailing: round(N - i N/S) - 1, i = S-1..0: the grid ends at t = N-1 (needed with a
              zero-terminal-SNR schedule, where the first step must see pure noise)
    linspace: round(linspace(0, N-1, S))
    As diffusers' DDIMScheduler, `steps_offset` only moves the leading grid; timesteps >= N are
    dropped (only steps_offset > 0 at S = N produces one)."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if spacing == "leading":
        steps = np.arange(0, num_steps) * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps))[::-1] - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    steps = steps.astype(np.int64)
    return steps[steps < num_train_timesteps]
