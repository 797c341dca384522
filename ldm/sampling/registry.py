"""The sampler registry: name -> (function, defaults, parameterisations it supports).

Every script's `--sampler` choices, `ldm.scripting.sample`, evaluation (`ldm.eval.sample_for_eval`,
`scripts/evaluate.py`), `scripts/benchmark_sampling.py` and the image logs (`log_images(...,
sampler=...)`) read this table; nothing else lists sampler names. Adding a sampler is one
function (in its own file under ldm/sampling/) plus one `register(...)` line below.

A registered function has one signature:

    fn(den, schedule, x_T, steps, *, cond, uncond, scale, eta, generator, callback, **options) -> x_0

den: the model's unguided `ldm.diffusion.denoiser.Denoiser` at integer timesteps; schedule: its
`Schedule` view; classifier-free guidance is applied inside (with `guidance(uncond, scale,
guidance_rescale)`), at the level the sampler's original applied it. callback(i) after step i.
`options` are the entry's defaults, overridden per call (e.g. `timestep_spacing`, `sigma_schedule`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ldm.diffusion.denoiser import PARAMETERIZATIONS, Denoiser
from ldm.diffusion.schedule import Schedule
from ldm.sampling.guidance import guidance
from ldm.sampling.noise import randn

Tensor = torch.Tensor
SamplerFn = Callable[..., Tensor]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")   # DDIM / PLMS grids (diffusers' DDIMScheduler)
SIGMA_SCHEDULES = ("karras", "uniform", "trailing")       # sigma spacings of the k-diffusion samplers


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: SamplerFn
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)   # options and their default values
    parameterizations: tuple[str, ...] = PARAMETERIZATIONS       # network outputs it can sample from
    fixed_steps: bool = False                                    # ignores `steps` (ancestral DDPM: all N)
    uses_eta: bool = False                                       # `eta` changes its result


SAMPLERS: dict[str, SamplerSpec] = {}


def register(name: str, fn: SamplerFn, description: str, **kwargs: Any) -> SamplerSpec:
    if name in SAMPLERS:
        raise ValueError(f"sampler '{name}' is registered twice")
    SAMPLERS[name] = spec = SamplerSpec(name, fn, description, **kwargs)
    return spec


def names() -> tuple[str, ...]:
    return tuple(SAMPLERS)


def get(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}' (choose from {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def help_text(only: Optional[tuple[str, ...]] = None) -> str:
    return "; ".join(f"{s.name}: {s.description}" for s in SAMPLERS.values() if only is None or s.name in only)


def model_denoiser(model: Any) -> Denoiser:
    """The unguided denoiser of a diffusion model: its apply_model (so that a wrapper's own
    apply_model counts) under its schedule and parameterization (= `DDPM.denoiser()`)."""
    return Denoiser.discrete(model.apply_model, Schedule.of(model), getattr(model, "parameterization", "eps"))


@torch.no_grad()
def sample(name: str, model: Any, x_T: Tensor, steps: int, *, cond: Any = None, uncond: Any = None,
           scale: float = 1.0, eta: float = 0.0, generator: Optional[torch.Generator] = None,
           callback: Optional[Callable[[int], None]] = None, **options: Any) -> Tensor:
    """Run sampler `name` on `model` from x_T; unknown option names raise."""
    spec = get(name)
    den = model_denoiser(model)
    if den.parameterization not in spec.parameterizations:
        raise ValueError(f"sampler '{name}' does not support {den.parameterization}-prediction models")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise ValueError(f"sampler '{name}' has no option(s) {sorted(unknown)} (it takes {sorted(spec.defaults)})")
    opts = {**spec.defaults, **{k: v for k, v in options.items() if v is not None}}
    if uncond is None or scale == 1.0:
        uncond, scale = None, 1.0
    return spec.fn(den, Schedule.of(model), x_T, steps, cond=cond, uncond=uncond, scale=scale, eta=eta,
                   generator=generator, callback=callback, **opts)


def initial_noise(model: Any, shape: tuple, generator: Optional[torch.Generator] = None) -> Tensor:
    """x_T ~ N(0, I) on the model's device (from `generator` when given), as the adapters draw it."""
    return randn(shape, torch.empty((), device=model.betas.device), generator)


# ----------------------------------------------------------------------------------------
# The entries (each a few lines over its sampling function)
# ----------------------------------------------------------------------------------------
def ddim_grid(num_timesteps: int, steps: int, timestep_spacing: Optional[str]) -> np.ndarray:
    """The increasing DDIM grid: the original's (`make_ddim_timesteps`, uniform +1) by default, or
    diffusers' leading / trailing / linspace spacing (`spaced_timesteps`)."""
    from ldm.sampling.schedule_view import make_ddim_timesteps
    if timestep_spacing is None:
        return make_ddim_timesteps("uniform", steps, num_timesteps, verbose=False)
    from ldm.sampling.schedule_view import spaced_timesteps
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    grid = np.asarray(spaced_timesteps(num_timesteps, steps, timestep_spacing, 0), dtype=np.int64)
    return np.unique(grid)   # increasing


def _step_cb(callback: Optional[Callable[[int], None]]) -> Optional[Callable[[dict], None]]:
    return None if callback is None else (lambda d: callback(d["i"]))


def _ddim(den, schedule, x_T, steps, *, cond, uncond, scale, eta, generator, callback, timestep_spacing=None,
          guidance_rescale=0.0):
    from ldm.sampling.ddim import sample_ddim
    eps_fn = den.with_network(guidance(uncond, scale, guidance_rescale)).eps_fn(cond)
    x, _ = sample_ddim(eps_fn, x_T, schedule.alphas_cumprod, ddim_grid(schedule.num_timesteps, steps,
                                                                         timestep_spacing),
                       eta, callback=_step_cb(callback), generator=generator)
    return x


def _plms(den, schedule, x_T, steps, *, cond, uncond, scale, eta, generator, callback, timestep_spacing=None,
          guidance_rescale=0.0):
    from ldm.sampling.plms import sample_plms
    if eta != 0:
        raise ValueError(f"the plms sampler needs eta = 0 (got {eta})")
    eps_fn = den.with_network(guidance(uncond, scale, guidance_rescale)).eps_fn(cond)
    x, _ = sample_plms(eps_fn, x_T, schedule.alphas_cumprod, ddim_grid(schedule.num_timesteps, steps,
                                                                         timestep_spacing),
                       callback=_step_cb(callback), generator=generator)
    return x


def dpm_times(num_timesteps: int, steps: int, timestep_spacing: str, dtype: torch.dtype) -> Tensor:
    """DPM-Solver's continuous times (t_n = (n + 1) / N) of a diffusers timestep spacing, decreasing,
    ending at training step 0 (1/N); a grid that contains step 0 takes one step less."""
    grid = ddim_grid(num_timesteps, steps, timestep_spacing)
    times = sorted({(int(g) + 1) / num_timesteps for g in grid} | {1.0 / num_timesteps}, reverse=True)
    return torch.tensor(times, dtype=dtype)


def _dpm(den, schedule, x_T, steps, *, cond, uncond, scale, eta, generator, callback, order=2,
         skip_type="time_uniform", timestep_spacing=None, guidance_rescale=0.0):
    from ldm.sampling.dpm_solver import continuous_denoiser, sample_dpm_solver
    from ldm.sampling.schedule_view import DiscreteVPSchedule
    ns = DiscreteVPSchedule(schedule.alphas_cumprod.detach().clone().to(x_T.device, torch.float32))
    cont = continuous_denoiser(den.network, ns, den.parameterization)
    # as SD2's DPMSolverSampler: each half converted to eps, then guided
    eps_fn = cont.eps_denoiser().with_network(guidance(uncond, scale, guidance_rescale)).eps_fn(cond)
    times = None
    if timestep_spacing is not None:
        times = dpm_times(schedule.num_timesteps, steps, timestep_spacing, ns.t_array.dtype).to(x_T.device)
        steps = len(times) - 1
    return sample_dpm_solver(eps_fn, x_T, ns, steps, order=min(order, steps), skip_type=skip_type,
                             algorithm="dpmsolver++", lower_order_final=True, callback=_step_cb(callback),
                             timesteps=times)


def _ddpm(den, schedule, x_T, steps, *, cond, uncond, scale, eta, generator, callback, clip_denoised=False,
          guidance_rescale=0.0):
    from ldm.sampling.ddpm import sample_ddpm
    eps_fn = den.with_network(guidance(uncond, scale, guidance_rescale)).eps_fn(cond)
    x, _ = sample_ddpm(eps_fn, x_T, schedule.betas, v_posterior=schedule.v_posterior, clip_denoised=clip_denoised,
                       callback=_step_cb(callback), generator=generator)
    return x


register("ddim", _ddim, "DDIM (Song et al. 2021), --eta 0 deterministic", uses_eta=True,
         defaults={"timestep_spacing": None, "guidance_rescale": 0.0})
register("plms", _plms, "PLMS / PNDM (Liu et al. 2022), eta 0",
         defaults={"timestep_spacing": None, "guidance_rescale": 0.0})
register("dpm", _dpm, "DPM-Solver++ 2M (Lu et al. 2022), as SD2",
         defaults={"order": 2, "skip_type": "time_uniform", "timestep_spacing": None, "guidance_rescale": 0.0})
register("ddpm", _ddpm, "ancestral DDPM (Ho et al. 2020), all training steps", fixed_steps=True,
         defaults={"clip_denoised": False, "guidance_rescale": 0.0})


# ----------------------------------------------------------------------------------------
# The k-diffusion family (ldm.sampling.k_diffusion): the model's eps predictor as a VE denoiser
# ----------------------------------------------------------------------------------------
def vp_fractional_coefficients(schedule: Schedule):
    """(t, x) -> Coefficients at fractional timesteps: sigma_VE = exp(log-sigma interpolated between
    the discrete steps), alpha = 1 / sqrt(1 + sigma^2), sigma_VP = sigma_VE alpha (what the VE
    denoiser's input scaling assumes); integer t reads the schedule's buffers as usual."""
    from ldm.diffusion.schedule import Coefficients
    from ldm.sampling.guidance import batch_view
    from ldm.sampling.k_diffusion import _interp_log_sigma, vp_sigmas
    log_sigmas = vp_sigmas(schedule.alphas_cumprod).log()

    def coefficients(t: Tensor, x: Tensor) -> Coefficients:
        if not t.is_floating_point():
            return schedule.coefficients(t, x.shape)
        s = _interp_log_sigma(t.double(), log_sigmas.to(t.device)).exp()
        alpha = (1 + s ** 2).rsqrt()
        return Coefficients.from_alpha_sigma(batch_view(alpha, x).to(x.dtype), batch_view(s * alpha, x).to(x.dtype))
    return coefficients


def k_sigmas(vp_denoiser: Any, alphas_cumprod: Tensor, steps: int, sigma_schedule: str,
             timestep_spacing: Optional[str] = None) -> Tensor:
    """The decreasing sigmas (then 0) of a k-diffusion run: a sigma schedule, or the discrete sigmas
    at a diffusers timestep spacing (which then takes precedence)."""
    from ldm.sampling import k_diffusion as K
    if timestep_spacing is not None:
        grid = ddim_grid(len(alphas_cumprod), steps, timestep_spacing)
        sigmas = K.vp_sigmas(alphas_cumprod)[torch.as_tensor(grid[::-1].copy())]
        return torch.cat([sigmas, sigmas.new_zeros(1)])
    if sigma_schedule == "karras":
        return K.get_sigmas_karras(steps, vp_denoiser.sigma_min, vp_denoiser.sigma_max)
    if sigma_schedule == "uniform":
        return K.get_sigmas_uniform(alphas_cumprod, steps)
    if sigma_schedule == "trailing":
        return K.get_sigmas_trailing(alphas_cumprod, steps)
    raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {sigma_schedule!r}")


def k_sampler(function_name: str) -> SamplerFn:
    """A registry entry over `ldm.sampling.k_diffusion.<function_name>`."""
    def run(den, schedule, x_T, steps, *, cond, uncond, scale, eta, generator, callback, sigma_schedule="karras",
            timestep_spacing=None, guidance_rescale=0.0, ancestral_eta=None):
        # the ancestral samplers' own eta (1 = full ancestral noise); the DDIM-style `eta` is unused
        from ldm.sampling import k_diffusion as K
        k_options = {} if ancestral_eta is None else {"eta": ancestral_eta}
        frac = Denoiser(den.network, vp_fractional_coefficients(schedule), den.parameterization)
        eps_fn = frac.with_network(guidance(uncond, scale, guidance_rescale)).eps_fn(cond)
        vp = K.DiscreteVPDenoiser(eps_fn, schedule.alphas_cumprod)
        sigmas = k_sigmas(vp, schedule.alphas_cumprod, steps, sigma_schedule, timestep_spacing)
        x = x_T * float(sigmas[0])
        return getattr(K, function_name)(vp, x, sigmas, generator=generator, callback=_step_cb(callback), **k_options)
    return run


_K = {"sigma_schedule": "karras", "timestep_spacing": None, "guidance_rescale": 0.0}
register("euler", k_sampler("sample_euler"), "Euler on the probability-flow ODE (Karras et al. 2022)", defaults=_K)
register("euler_a", k_sampler("sample_euler_ancestral"), "Euler ancestral (k-diffusion), stochastic",
         defaults={**_K, "ancestral_eta": 1.0})
register("heun", k_sampler("sample_heun"), "Heun 2nd order (Karras et al. 2022), 2 calls per step", defaults=_K)
register("dpmpp_2m", k_sampler("sample_dpmpp_2m"), "DPM++ 2M (Lu et al. 2022) on the k-diffusion sigmas",
         defaults=_K)
register("dpmpp_2m_sde", k_sampler("sample_dpmpp_2m_sde"), "DPM++ 2M SDE (k-diffusion), stochastic",
         defaults={**_K, "ancestral_eta": 1.0})
