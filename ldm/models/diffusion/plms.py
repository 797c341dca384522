"""PLMSSampler: the original class and signatures, as a thin adapter over `ldm.sampling.plms`.

Differences from the original: as DDIMSampler (model-device default, `use_original_steps`
works, x0/v models converted to eps, `dynamic_threshold` as SD2's PLMS, optional `generator=`,
logging instead of prints).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.models.diffusion.ddim import GridSampler, model_eps_fn
from ldm.sampling.ddim import ddim_step
from ldm.sampling.guidance import split_prediction
from ldm.sampling.plms import plms_eps, sample_plms

Tensor = torch.Tensor


class PLMSSampler(GridSampler):
    """Pseudo linear multistep sampling (Liu et al. 2022) on the DDIM grid, the original interface."""

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta, verbose=verbose)

    _name = "PLMS"

    @torch.no_grad()
    def plms_sampling(self, cond: Any, shape: tuple, x_T: Optional[Tensor] = None,
                      ddim_use_original_steps: bool = False,
                      callback: Any = None, timesteps: Any = None, quantize_denoised: bool = False,
                      mask: Optional[Tensor] = None, x0: Optional[Tensor] = None, img_callback: Any = None,
                      log_every_t: int = 100, temperature: float = 1., noise_dropout: float = 0.,
                      score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
                      unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
                      dynamic_threshold: Any = None,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, list[Tensor]]]:
        return self._chain(cond, shape, x_T=x_T, use_original_steps=ddim_use_original_steps, timesteps=timesteps,
                           callback=callback, img_callback=img_callback, quantize_denoised=quantize_denoised,
                           mask=mask, x0=x0, log_every_t=log_every_t, temperature=temperature,
                           noise_dropout=noise_dropout, score_corrector=score_corrector,
                           corrector_kwargs=corrector_kwargs, scale=unconditional_guidance_scale,
                           uncond=unconditional_conditioning, dynamic_threshold=dynamic_threshold, ucg_schedule=None,
                           generator=generator)

    def _loop(self, eps_fn, img, grid, **kw):
        return sample_plms(eps_fn, img, self.model.alphas_cumprod, grid, **kw)

    @torch.no_grad()
    def p_sample_plms(self, x: Tensor, c: Any, t: Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.,
                      noise_dropout: float = 0., score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
                      unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
                      old_eps: Optional[list] = None, t_next: Optional[Tensor] = None,
                      dynamic_threshold: Any = None, generator: Optional[torch.Generator] = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """One PLMS step at grid position `index` -> (x_prev, pred_x0, e_t); append e_t to old_eps yourself."""
        full = model_eps_fn(self.model, c, unconditional_conditioning, unconditional_guidance_scale,
                            score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        eps_fn = lambda x, t: split_prediction(full(x, t))[0]      # noqa: E731
        coef = self._coefficients(index, use_original_steps)
        kw = dict(temperature=temperature, noise_dropout=noise_dropout, quantize=self._quantize(quantize_denoised),
                  dynamic_threshold=dynamic_threshold, generator=generator, repeat_noise=repeat_noise)
        e_t = eps_fn(x, t)
        if not old_eps:
            x_trial, _ = ddim_step(x, e_t, *coef, **kw)
            e_prime = (e_t + eps_fn(x_trial, t if t_next is None else t_next)) / 2
        else:
            e_prime = plms_eps(e_t, old_eps)
        x_prev, pred_x0 = ddim_step(x, e_prime, *coef, **kw)
        return x_prev, pred_x0, e_t
