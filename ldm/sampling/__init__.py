"""Samplers as functions of a denoiser: they know no model class (adapters in ldm.models.diffusion).
The registry (`ldm.sampling.registry`) lists them for every script; noise draws in `ldm.sampling.noise`."""
from ldm.sampling.ddim import ddim_invert, ddim_step, sample_ddim, stochastic_encode
from ldm.sampling.ddpm import ddpm_step, sample_ddpm
from ldm.sampling.dpm_solver import sample_dpm_solver
from ldm.sampling.guidance import cat_cond, cfg_denoiser, guidance
from ldm.sampling.plms import plms_eps, sample_plms
from ldm.sampling.schedule_view import (DiscreteVPSchedule, ddim_coefficients, make_ddim_sampling_parameters,
                                        make_ddim_timesteps)

__all__ = [
    "sample_ddim", "ddim_step", "ddim_invert", "stochastic_encode", "sample_plms", "plms_eps",
    "sample_dpm_solver", "sample_ddpm", "ddpm_step", "cfg_denoiser", "cat_cond", "guidance",
    "DiscreteVPSchedule", "ddim_coefficients", "make_ddim_timesteps", "make_ddim_sampling_parameters",
]
