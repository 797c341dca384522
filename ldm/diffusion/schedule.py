"""The Gaussian diffusion schedule: every quantity derived from the betas, in one place.

Notation (Ho et al. 2020, DDPM; LDM §3 uses the same process on latents):

    q(x_t | x_0)        = N(sqrt(abar_t) x_0, (1 - abar_t) I)                   (DDPM Eq. 4)
    q(x_{t-1}|x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)                      (DDPM Eq. 6-7)
    beta~_t             = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
    c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)

Everything is computed in float64 (numpy) and cast to float32 once, as the original did
(except `lvlb_weights`, which the original derived from the float32 buffers: same here);
the module that owns the schedule registers the result as buffers (names kept: released
checkpoints store them). DDPM, LatentDiffusion, the low-scale noise augmentation of the
x4 upscaler, and the samplers all read these same numbers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch

# The persistent buffers of DDPM/LatentDiffusion, in the original registration order.
SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
# The subset the x4 upscaler's noise augmentation (AbstractLowScaleModel) registers.
FORWARD_BUFFERS: tuple[str, ...] = SCHEDULE_BUFFERS[:8]

PARAMETERIZATIONS = ("eps", "x0", "v")


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """betas_1..T as float64, exactly as the original `make_beta_schedule`.

    linear:      (linspace(sqrt(start), sqrt(end), T))**2   (the LDM "linear" is linear in sqrt(beta))
    cosine:      Nichol & Dhariwal 2021, Eq. 17, betas clipped to 0.999
    sqrt_linear: linspace(start, end, T)
    sqrt:        linspace(start, end, T) ** 0.5
    squaredcos_cap_v2: betas_for_alpha_bar of cos((t + 0.008) / 1.008 * pi / 2)**2 (SD2's unCLIP)
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64,
                               device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    elif schedule == "squaredcos_cap_v2":   # SD2 (Karlo / unCLIP noise augmentation)
        return betas_for_alpha_bar(n_timestep, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    else:
        raise ValueError(f"schedule '{schedule}' unknown (expected linear, cosine, sqrt_linear, sqrt or "
                         f"squaredcos_cap_v2)")
    return betas.numpy()


def schedule_arrays(betas: Union[np.ndarray, Sequence[float]], v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """Every persistent schedule quantity (SCHEDULE_BUFFERS) as float64 arrays.

    v_posterior interpolates the reverse-process variance: sigma_t^2 = (1-v) beta~_t + v beta_t.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # equal to 1 / (1 / (1 - abar_{t-1}) + alpha_t / beta_t)
    posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          + v_posterior * betas)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        # inf at abar_T = 0 (zero terminal SNR): v models never divide by them
        "sqrt_recip_alphas_cumprod": np.sqrt(np.divide(1.0, alphas_cumprod, where=alphas_cumprod > 0,
                                                       out=np.full_like(alphas_cumprod, np.inf))),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(np.divide(1.0, alphas_cumprod, where=alphas_cumprod > 0,
                                                         out=np.full_like(alphas_cumprod, np.inf)) - 1),
        "posterior_variance": posterior_variance,
        # clipped: the posterior variance is 0 at the first step of the chain
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def lvlb_weights(arrays: dict[str, np.ndarray], parameterization: str = "eps") -> np.ndarray:
    """Per-step weights turning the simple loss into the variational bound term L_t.

    eps: beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))      (DDPM Eq. 12 weighting)
    x0:  0.5 sqrt(abar_t) / (2 - abar_t)                     (the original's formula, kept as is)
    v:   1                                                   (SD2)
    The t=0 entry (undefined for eps: sigma_0 = 0) is set to the t=1 entry, as the original.
    Unlike the other quantities, the original computed these from the float32 buffers; the
    same float32 arithmetic is done here, so the weights are bit-identical to it.
    """
    f32 = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    betas, alphas_cumprod = f32["betas"], f32["alphas_cumprod"]
    alphas = (1.0 - arrays["betas"]).astype(np.float32)   # float64 alphas, cast (the original's to_torch(alphas))
    if parameterization == "eps":
        with np.errstate(divide="ignore", invalid="ignore"):
            w = betas ** 2 / (2 * f32["posterior_variance"] * alphas * (1 - alphas_cumprod))
    elif parameterization == "x0":
        w = 0.5 * np.sqrt(alphas_cumprod) / (2. * 1 - alphas_cumprod)
    elif parameterization == "v":
        w = np.ones_like(betas)
    else:
        raise NotImplementedError(f"parameterization '{parameterization}' not supported (expected {PARAMETERIZATIONS})")
    w = np.array(w, dtype=np.float32)
    if len(w) > 1:
        w[0] = w[1]
    if np.isnan(w).all():
        raise ValueError("lvlb_weights are all NaN: check the beta schedule")
    return w


def schedule_tensors(betas: Union[np.ndarray, Sequence[float]], v_posterior: float = 0.0,
                     parameterization: Optional[str] = "eps",
                     names: Sequence[str] = SCHEDULE_BUFFERS) -> dict[str, torch.Tensor]:
    """The float32 tensors to register: `names` (persistent), plus `lvlb_weights` when a
    parameterization is given. Computed in float64, cast once."""
    arrays = schedule_arrays(betas, v_posterior)
    out = {k: torch.tensor(arrays[k], dtype=torch.float32) for k in names}
    if parameterization is not None:
        out["lvlb_weights"] = torch.tensor(lvlb_weights(arrays, parameterization), dtype=torch.float32)
    return out


def betas_from_config(given_betas: Optional[Sequence[float]], beta_schedule: str, timesteps: int,
                      linear_start: float, linear_end: float, cosine_s: float) -> np.ndarray:
    """`given_betas` (any sequence, e.g. from YAML) when set, else `make_beta_schedule`."""
    if given_betas is not None:
        return np.asarray(list(given_betas), dtype=np.float64)
    return make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                              cosine_s=cosine_s)


def register_schedule_buffers(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Register (or overwrite) the schedule buffers on `module`; lvlb_weights is non-persistent."""
    for name, value in tensors.items():
        module.register_buffer(name, value, persistent=name != "lvlb_weights")


@dataclass(frozen=True)
class Schedule:
    """A frozen view of a module's schedule buffers (the tensors themselves, not copies), plus the
    derived SNR quantities. Objectives and samplers take this value instead of the module.

    Build it with `Schedule.of(module)` each time it is needed (a view follows the module's device
    because it holds the registered tensors), or `Schedule.from_betas(betas)` without a module.
    Buffers the module does not register (the upscaler's noise augmentation holds the forward
    process only) are None.
    """
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: Optional[torch.Tensor] = None
    sqrt_alphas_cumprod: Optional[torch.Tensor] = None
    sqrt_one_minus_alphas_cumprod: Optional[torch.Tensor] = None
    log_one_minus_alphas_cumprod: Optional[torch.Tensor] = None
    sqrt_recip_alphas_cumprod: Optional[torch.Tensor] = None
    sqrt_recipm1_alphas_cumprod: Optional[torch.Tensor] = None
    posterior_variance: Optional[torch.Tensor] = None
    posterior_log_variance_clipped: Optional[torch.Tensor] = None
    posterior_mean_coef1: Optional[torch.Tensor] = None
    posterior_mean_coef2: Optional[torch.Tensor] = None
    lvlb_weights: Optional[torch.Tensor] = None
    v_posterior: float = 0.0

    @classmethod
    def of(cls, module: object) -> "Schedule":
        """The view of `module`'s registered buffers. A module holding only `alphas_cumprod`
        (a foreign model) gets the forward-process quantities derived from it (float64, cast)."""
        names = SCHEDULE_BUFFERS + ("lvlb_weights",)
        values = {k: getattr(module, k, None) for k in names}
        if values["alphas_cumprod"] is not None:
            ac = values["alphas_cumprod"].detach().double()
            like = values["sqrt_alphas_cumprod"] if values["sqrt_alphas_cumprod"] is not None else ac
            derived = {"sqrt_alphas_cumprod": lambda: ac.sqrt(), "sqrt_one_minus_alphas_cumprod": lambda: (1 - ac).sqrt(),
                       "sqrt_recip_alphas_cumprod": lambda: (1 / ac).sqrt(),
                       "sqrt_recipm1_alphas_cumprod": lambda: (1 / ac - 1).sqrt()}
            for name, fn in derived.items():
                if values[name] is None:
                    values[name] = fn().float().to(like.device)
        if values["betas"] is None and values["alphas_cumprod"] is not None:
            ac = values["alphas_cumprod"].detach().double()
            values["betas"] = (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).float()
        return cls(**values, v_posterior=float(getattr(module, "v_posterior", 0.0) or 0.0))

    @classmethod
    def from_betas(cls, betas: Union[np.ndarray, Sequence[float]], v_posterior: float = 0.0,
                   parameterization: Optional[str] = "eps") -> "Schedule":
        return cls(**schedule_tensors(betas, v_posterior, parameterization), v_posterior=v_posterior)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) per step (T,), computed in float64."""
        ac = self.alphas_cumprod.double()
        return ac / (1 - ac)

    @property
    def sigmas(self) -> torch.Tensor:
        """The VE noise level sigma_t = sqrt((1 - abar) / abar) per step (T,), float64 (Karras et al. 2022)."""
        ac = self.alphas_cumprod.double()
        return ((1 - ac) / ac).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        """log(abar / (1 - abar)) per step (T,), float64."""
        return self.snr.log()

    def coefficients(self, t: torch.Tensor, x_shape: Sequence[int]) -> "Coefficients":
        """The per-sample forward-process coefficients at integer timesteps t (B,), shaped (B, 1, ..., 1)."""
        return Coefficients(extract_into_tensor(self.sqrt_alphas_cumprod, t, x_shape),
                            extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_shape),
                            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_shape),
                            extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_shape))


class Coefficients(NamedTuple):
    """x_t = alpha x_0 + sigma eps at one noise level; recip = 1 / alpha, recipm1 = sigma / alpha.
    Each broadcasts against x (B, 1, ..., 1). The eps / x0 / v conversions (`ldm.diffusion.denoiser`)
    read these; the discrete schedule stores recip / recipm1 as buffers (the original's formulas)."""
    alpha: torch.Tensor
    sigma: torch.Tensor
    recip: torch.Tensor
    recipm1: torch.Tensor

    @classmethod
    def from_alpha_sigma(cls, alpha: torch.Tensor, sigma: torch.Tensor) -> "Coefficients":
        """Continuous-time levels (DPM-Solver's VP view): recip and recipm1 derived."""
        return cls(alpha, sigma, 1.0 / alpha, sigma / alpha)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """a[t] for a batch of timesteps t (B,), reshaped to (B, 1, ..., 1) to broadcast against x_shape."""
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising a continuous abar(t), t in [0, 1]: beta_i = min(1 - abar(t_{i+1}) / abar(t_i), max_beta)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def __getattr__(name: str):
    """The DDIM grid helpers of the original's `diffusionmodules.util` live with the samplers
    (`ldm.sampling.schedule_view`); forwarded so every old import path resolves."""
    if name in ("make_ddim_timesteps", "make_ddim_sampling_parameters"):
        import importlib
        return getattr(importlib.import_module("ldm.sampling.schedule_view"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rescale_zero_terminal_snr(betas: Union[np.ndarray, torch.Tensor]) -> Union[np.ndarray, torch.Tensor]:
    """Betas rescaled so that the last step has zero SNR (abar_T = 0), Lin et al. 2024, Alg. 1.

    sqrt(abar) is shifted by its last value and scaled to keep its first: abar_1 is unchanged,
    abar_T = 0 exactly, so beta_T = 1 (train with the v target: eps is undefined at SNR 0).
    Computed in the input's type and dtype (numpy or torch)."""
    is_torch = torch.is_tensor(betas)
    cumprod = (lambda a: torch.cumprod(a, dim=0)) if is_torch else np.cumprod
    concat = torch.cat if is_torch else np.concatenate
    sqrt_abar = cumprod(1.0 - betas) ** 0.5
    first, last = sqrt_abar[0] * 1, sqrt_abar[-1] * 1          # copies (the shift is in place below)
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar ** 2
    alphas = concat([abar[0:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas
