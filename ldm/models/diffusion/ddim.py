"""DDIMSampler: the original class and signatures, as a thin adapter over `ldm.sampling.ddim`.

The adapter turns a diffusion model (anything with `apply_model`, `alphas_cumprod`,
`num_timesteps`, `parameterization`, `q_sample`) into a noise predictor with classifier-free
guidance, and exposes the schedule attributes the original registered (`ddim_timesteps`,
`ddim_alphas`, `ddim_alphas_prev`, `ddim_sigmas`, `ddim_sqrt_one_minus_alphas`, ...).

Differences from the original (see the README's compatibility section):
- `device` defaults to the model's device (the original moved everything to CUDA).
- `use_original_steps=True` works (the original read `ddim_sigmas_for_original_num_steps`
  from the model, where it never existed, and crashed).
- x0- and v-parameterized models work everywhere (latent-diffusion's DDIM/PLMS and SD2's
  PLMS/`encode` treated any output as eps); v as SD2's DDIM: guidance on v, then eps and x0.
- `dynamic_threshold` (a float) applies SD2's norm thresholding to x0_hat in DDIM as well
  (SD2's DDIM raised NotImplementedError; its PLMS had it).
- `generator=` (an extra keyword) makes a seed reproduce a sample on any device.
- No prints or progress bars; messages go to `logging`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.diffusion.denoiser import Denoiser, with_score_corrector
from ldm.sampling.registry import model_denoiser as model_denoiser_unguided
from ldm.sampling.ddim import EpsFn, ddim_invert, ddim_step, sample_ddim, stochastic_encode
from ldm.sampling.guidance import cond_batch_size, guidance, split_prediction
from ldm.sampling.noise import randn
from ldm.sampling.schedule_view import make_ddim_sampling_parameters, make_ddim_timesteps

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def model_device(model: Any) -> torch.device:
    """The device a model lives on (LightningModule.device, else its parameters / buffers)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def model_denoiser(model: Any, uncond: Any = None, scale: Any = 1.0, *, guidance_rescale: float = 0.0,
                   score_corrector: Any = None, corrector_kwargs: Optional[dict] = None) -> Denoiser:
    """The denoiser of a diffusion model at integer timesteps, wrapped in classifier-free guidance
    on the network output (one batched call) and the optional score corrector. Models without
    `denoiser()` (anything with apply_model, alphas_cumprod, parameterization) get one built here."""
    parameterization = getattr(model, "parameterization", "eps")
    if score_corrector is not None and parameterization != "eps":
        raise NotImplementedError("score_corrector needs an eps-parameterized model (as the original)")
    den = model_denoiser_unguided(model).with_network(guidance(uncond, scale, guidance_rescale))
    if score_corrector is not None:
        den = den.with_network(with_score_corrector(model, score_corrector, corrector_kwargs))
    return den


def model_eps_fn(model: Any, cond: Any, uncond: Any = None, scale: Any = 1.0, *, guidance_rescale: float = 0.0,
                 score_corrector: Any = None, corrector_kwargs: Optional[dict] = None) -> EpsFn:
    """eps_fn(x, t) of `model_denoiser(...)`: eps (eps models) or (eps, x0) (x0 / v models)."""
    return model_denoiser(model, uncond, scale, guidance_rescale=guidance_rescale, score_corrector=score_corrector,
                          corrector_kwargs=corrector_kwargs).eps_fn(cond)


def warn_batch_size(conditioning: Any, batch_size: int) -> None:
    n = cond_batch_size(conditioning)
    if n is not None and n != batch_size:
        log.warning("Got %d conditionings but batch-size is %d", n, batch_size)


class GridSampler:
    """What DDIMSampler and PLMSSampler share: the model, the DDIM grid and its attributes."""

    def __init__(self, model: Any, schedule: str = "linear", device: Optional[torch.device] = None, **kwargs: Any):
        self.model = model                              # the diffusion model (LatentDiffusion / DDPM)
        self.ddpm_num_timesteps = model.num_timesteps   # N, the training chain length
        self.schedule = schedule                        # kept for compatibility (unused, as the original)
        # where the schedule attributes live; default: the model's device (the original forced CUDA)
        self.device = torch.device(device) if device is not None else model_device(model)
        self.ddim_eta = 0.0
        self._host: dict[str, Any] = {}

    def register_buffer(self, name: str, attr: Any) -> None:
        self._host[name] = attr      # the host copy: per-step scalars are read from it (no device sync)
        if isinstance(attr, torch.Tensor) and attr.device != self.device:
            attr = attr.to(self.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = True) -> None:
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod
        assert alphas_cumprod.shape[0] == self.ddpm_num_timesteps, "alphas have to be defined for each timestep"
        ac = alphas_cumprod.detach().cpu().double()
        ac_prev = self.model.alphas_cumprod_prev.detach().cpu().double()
        f32 = lambda x: x.to(torch.float32)     # noqa: E731
        self.register_buffer("betas", f32(self.model.betas.detach()))
        self.register_buffer("alphas_cumprod", f32(ac))
        self.register_buffer("alphas_cumprod_prev", f32(ac_prev))
        self.register_buffer("sqrt_alphas_cumprod", f32(ac.sqrt()))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", f32((1. - ac).sqrt()))
        self.register_buffer("log_one_minus_alphas_cumprod", f32((1. - ac).log()))
        self.register_buffer("sqrt_recip_alphas_cumprod", f32((1. / ac).sqrt()))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", f32((1. / ac - 1).sqrt()))
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod.detach().cpu(),
                                                                    self.ddim_timesteps, ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", sigmas)
        self.register_buffer("ddim_alphas", alphas)
        self.register_buffer("ddim_alphas_prev", alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", f32((1. - alphas.double()).sqrt()))
        self.register_buffer("ddim_sigmas_for_original_num_steps",
                             f32(ddim_eta * torch.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))))
        self.ddim_eta = ddim_eta

    # -- helpers --------------------------------------------------------------------------
    def _grid(self, use_original_steps: bool, timesteps: Any = None) -> np.ndarray:
        """The increasing timestep grid; `timesteps` (int) truncates it as the original."""
        if use_original_steps:
            return np.arange(self.ddpm_num_timesteps if timesteps is None else int(timesteps))
        if timesteps is None:
            return self.ddim_timesteps
        n = self.ddim_timesteps.shape[0]
        subset_end = int(min(timesteps / n, 1) * n) - 1
        return self.ddim_timesteps[:subset_end]

    def _coefficients(self, index: int, use_original_steps: bool) -> tuple[float, float, float]:
        names = (("alphas_cumprod", "alphas_cumprod_prev", "ddim_sigmas_for_original_num_steps") if use_original_steps
                 else ("ddim_alphas", "ddim_alphas_prev", "ddim_sigmas"))
        a, a_prev, sigma = (self._host[n][index] for n in names)     # host copies: no device sync
        return float(a), float(a_prev), float(sigma)

    def _x_T(self, x_T: Optional[Tensor], shape: tuple, generator: Optional[torch.Generator]) -> Tensor:
        if x_T is not None:
            return x_T
        device = self.model.betas.device
        return randn(shape, torch.empty((), device=device), generator)

    def _q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.model.q_sample(x0, t, noise=noise)

    def _quantize(self, quantize_denoised: bool) -> Optional[Callable[[Tensor], Tensor]]:
        if not quantize_denoised:
            return None
        return lambda x0: self.model.first_stage_model.quantize(x0)[0]

    @staticmethod
    def _callbacks(callback: Optional[Callable], img_callback: Optional[Callable]) -> Optional[Callable]:
        if callback is None and img_callback is None:
            return None

        def cb(d: dict) -> None:
            if callback:
                callback(d["i"])
            if img_callback:
                img_callback(d["pred_x0"], d["i"])
        return cb


    # -- the shared entry point and chain -------------------------------------------------
    _name = "DDIM"

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple, conditioning: Any = None, callback: Any = None,
               normals_sequence: Any = None, img_callback: Any = None, quantize_x0: bool = False, eta: float = 0.,
               mask: Optional[Tensor] = None, x0: Optional[Tensor] = None, temperature: float = 1.,
               noise_dropout: float = 0., score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
               verbose: bool = True, x_T: Optional[Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
               dynamic_threshold: Any = None, ucg_schedule: Any = None, generator: Optional[torch.Generator] = None,
               **kwargs: Any) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """S steps for batch_size samples of shape (C, H, W) -> (samples, intermediates)."""
        if conditioning is not None:
            warn_batch_size(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        C, H, W = shape
        size = (batch_size, C, H, W)
        log.info("Data shape for %s sampling is %s, eta %s", self._name, size, eta)
        return self._chain(conditioning, size, x_T=x_T, use_original_steps=False, timesteps=None, callback=callback,
                           img_callback=img_callback, quantize_denoised=quantize_x0, mask=mask, x0=x0,
                           log_every_t=log_every_t, temperature=temperature, noise_dropout=noise_dropout,
                           score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                           scale=unconditional_guidance_scale, uncond=unconditional_conditioning,
                           dynamic_threshold=dynamic_threshold, ucg_schedule=ucg_schedule, generator=generator)

    def _chain(self, cond: Any, shape: tuple, *, x_T, use_original_steps, timesteps, callback, img_callback,
               quantize_denoised, mask, x0, log_every_t, temperature, noise_dropout, score_corrector,
               corrector_kwargs, scale, uncond, dynamic_threshold, ucg_schedule, generator):
        img = self._x_T(x_T, shape, generator)
        grid = self._grid(use_original_steps, timesteps)
        if ucg_schedule is not None:
            assert len(ucg_schedule) == len(grid), "ucg_schedule needs one scale per step"
            # one scale per step in sampling order, as the original's ucg_schedule[i] (reading
            # the value of t instead would be a device sync per step)
            scales = iter([float(g) for g in ucg_schedule])
            scale = lambda t: next(scales)      # noqa: E731
        eps_fn = model_eps_fn(self.model, cond, uncond, scale, score_corrector=score_corrector,
                              corrector_kwargs=corrector_kwargs)
        return self._loop(eps_fn, img, grid, mask=mask, x0=x0, q_sample=self._q_sample, temperature=temperature,
                          noise_dropout=noise_dropout, quantize=self._quantize(quantize_denoised),
                          dynamic_threshold=dynamic_threshold, callback=self._callbacks(callback, img_callback),
                          log_every_t=log_every_t, generator=generator)

    def _loop(self, eps_fn: EpsFn, img: Tensor, grid: np.ndarray, **kw: Any) -> tuple[Tensor, dict]:
        raise NotImplementedError


class DDIMSampler(GridSampler):
    """DDIM sampling of a diffusion model (Song et al. 2021), the original interface."""

    @torch.no_grad()
    def ddim_sampling(self, cond: Any, shape: tuple, x_T: Optional[Tensor] = None,
                      ddim_use_original_steps: bool = False,
                      callback: Any = None, timesteps: Any = None, quantize_denoised: bool = False,
                      mask: Optional[Tensor] = None, x0: Optional[Tensor] = None, img_callback: Any = None,
                      log_every_t: int = 100, temperature: float = 1., noise_dropout: float = 0.,
                      score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
                      unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
                      dynamic_threshold: Any = None, ucg_schedule: Any = None,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
        return self._chain(cond, shape, x_T=x_T, use_original_steps=ddim_use_original_steps, timesteps=timesteps,
                           callback=callback, img_callback=img_callback, quantize_denoised=quantize_denoised,
                           mask=mask, x0=x0, log_every_t=log_every_t, temperature=temperature,
                           noise_dropout=noise_dropout, score_corrector=score_corrector,
                           corrector_kwargs=corrector_kwargs, scale=unconditional_guidance_scale,
                           uncond=unconditional_conditioning, dynamic_threshold=dynamic_threshold,
                           ucg_schedule=ucg_schedule, generator=generator)

    def _loop(self, eps_fn: EpsFn, img: Tensor, grid: np.ndarray, **kw: Any) -> tuple[Tensor, dict]:
        return sample_ddim(eps_fn, img, self.model.alphas_cumprod, grid, self.ddim_eta, **kw)

    @torch.no_grad()
    def p_sample_ddim(self, x: Tensor, c: Any, t: Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.,
                      noise_dropout: float = 0., score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
                      unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
                      dynamic_threshold: Any = None, generator: Optional[torch.Generator] = None
                      ) -> tuple[Tensor, Tensor]:
        """One DDIM step at grid position `index` (timestep t) -> (x_prev, pred_x0)."""
        eps, x0 = split_prediction(model_eps_fn(self.model, c, unconditional_conditioning,
                                                unconditional_guidance_scale, score_corrector=score_corrector,
                                                corrector_kwargs=corrector_kwargs)(x, t))
        return ddim_step(x, eps, *self._coefficients(index, use_original_steps), pred_x0=x0, temperature=temperature,
                         noise_dropout=noise_dropout, quantize=self._quantize(quantize_denoised),
                         dynamic_threshold=dynamic_threshold, generator=generator, repeat_noise=repeat_noise)

    @torch.no_grad()
    def encode(self, x0: Tensor, c: Any, t_enc: int, use_original_steps: bool = False,
               return_intermediates: Optional[int] = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, callback: Any = None) -> tuple[Tensor, dict]:
        """Deterministic DDIM inversion of x0 over the first t_enc grid steps (SD2)."""
        grid = self._grid(use_original_steps)
        assert t_enc <= len(grid)
        eps_fn = model_eps_fn(self.model, c, unconditional_conditioning, unconditional_guidance_scale)
        return ddim_invert(eps_fn, x0, self.model.alphas_cumprod, grid[:t_enc],
                           return_intermediates=return_intermediates, callback=callback)

    @torch.no_grad()
    def stochastic_encode(self, x0: Tensor, t: Tensor, use_original_steps: bool = False,
                          noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """q(x_t | x0) with t a grid index (img2img): fast, not exactly invertible."""
        if use_original_steps:
            a, s = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            a, s = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        return stochastic_encode(x0, t.to(a.device), a, s, noise=noise, generator=generator)

    @torch.no_grad()
    def decode(self, x_latent: Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False, callback: Any = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Denoise x_latent from grid step t_start down to the end (img2img), with the schedule's eta."""
        grid = self._grid(use_original_steps)[:t_start]
        log.info("Running DDIM Sampling with %d timesteps", len(grid))
        eps_fn = model_eps_fn(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        x, _ = sample_ddim(eps_fn, x_latent, self.model.alphas_cumprod, grid, self.ddim_eta,
                           callback=self._callbacks(callback, None), generator=generator)
        return x
