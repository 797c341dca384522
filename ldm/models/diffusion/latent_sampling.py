"""Sampling entry points of LatentDiffusion, with the original's method names and arguments.

The loops themselves are `ldm.sampling.ddpm.sample_ddpm` (ancestral) and the DDIM sampler
adapter; this mixin turns the model into the denoiser those functions take: the network
output -> eps (any parameterization), optional score corrector, the shortened conditioning
schedule (the conditioning is re-noised before every network call, as the original).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from einops import repeat
from omegaconf import ListConfig

from ldm.diffusion.conditioning import cond_route, slice_cond
from ldm.diffusion.denoiser import Denoiser, with_score_corrector
from ldm.sampling.noise import ancestral_step, dropout, randn


class LatentSamplingMixin:
    """Mixed into LatentDiffusion (needs apply_model, q_sample, q_posterior, the schedule buffers)."""

    # ------------------------------------------------------------------ the denoiser of the loops
    def sampling_denoiser(self, score_corrector=None, corrector_kwargs=None) -> Denoiser:
        """apply_model under the schedule and parameterization, with the optional score corrector."""
        den = self.denoiser()
        if score_corrector is not None:
            if self.parameterization != "eps":
                raise NotImplementedError("score_corrector needs an eps model")
            den = den.with_network(with_score_corrector(self, score_corrector, corrector_kwargs))
        return den

    # ------------------------------------------------------------------ one reverse step
    def p_mean_variance(self, x, c, t, clip_denoised: bool, return_codebook_ids=False, quantize_denoised=False,
                        return_x0=False, score_corrector=None, corrector_kwargs=None):
        if return_codebook_ids:
            raise NotImplementedError("return_codebook_ids: support dropped (as in the original)")
        x_recon = self.sampling_denoiser(score_corrector, corrector_kwargs).x0(x, t, c)
        if clip_denoised:
            x_recon.clamp_(-1., 1.)
        if quantize_denoised:
            x_recon, _, _ = self.first_stage_model.quantize(x_recon)
        mean, variance, log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        return (mean, variance, log_variance, x_recon) if return_x0 else (mean, variance, log_variance)

    @torch.no_grad()
    def p_sample(self, x, c, t, clip_denoised=False, repeat_noise=False, return_codebook_ids=False,
                 quantize_denoised=False, return_x0=False, temperature=1., noise_dropout=0., score_corrector=None,
                 corrector_kwargs=None):
        mean, _, log_variance, x0 = self.p_mean_variance(
            x=x, c=c, t=t, clip_denoised=clip_denoised, return_codebook_ids=return_codebook_ids,
            quantize_denoised=quantize_denoised, return_x0=True, score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs)
        noise = dropout(randn(x.shape, x, repeat=repeat_noise) * temperature, noise_dropout)
        x_prev = ancestral_step(mean, log_variance, t, noise)
        return (x_prev, x0) if return_x0 else x_prev

    # ------------------------------------------------------------------ full chains
    def _eps_fn(self, cond, score_corrector=None, corrector_kwargs=None) -> Callable:
        """x, t -> eps for the ancestral loop; with shorten_cond_schedule the conditioning is
        re-noised before every call (as the original)."""
        den = self.sampling_denoiser(score_corrector, corrector_kwargs)
        if not self.shorten_cond_schedule:
            return lambda x, t: den.eps(x, t, cond)
        if self.model.conditioning_key == "hybrid":
            raise NotImplementedError("shorten_cond_schedule with hybrid conditioning")
        state = {"cond": cond}

        def eps_fn(x, t):
            c = state["cond"]
            state["cond"] = self.q_sample(x_start=c, t=self.cond_ids[t].to(c.device), noise=torch.randn_like(c))
            return den.eps(x, t, state["cond"])
        return eps_fn

    def _run_chain(self, cond, shape, *, x_T, start_T, timesteps, log_every_t, quantize_denoised, mask, x0,
                   temperature=1., noise_dropout=0., score_corrector=None, corrector_kwargs=None,
                   callback=None, img_callback=None):
        from ldm.sampling.ddpm import sample_ddpm
        if mask is not None and (x0 is None or x0.shape[2:3] != mask.shape[2:3]):
            raise ValueError("mask needs an x0 of the same spatial size")
        if not isinstance(temperature, (int, float)):
            raise NotImplementedError("per-step temperature lists are not supported")
        img = torch.randn(shape, device=self.device) if x_T is None else x_T
        n = default_steps = self.num_timesteps if timesteps is None else timesteps
        if start_T is not None:
            n = min(default_steps, start_T)
        x0_preds: list[torch.Tensor] = []

        def on_step(info: dict[str, Any]) -> None:
            if info["t"] % log_every_t == 0 or info["t"] == n - 1:
                x0_preds.append(info["pred_x0"])
            if callback:
                callback(info["t"])
            if img_callback:
                img_callback(info["x"], info["t"])
        quantize = (lambda z: self.first_stage_model.quantize(z)[0]) if quantize_denoised else None
        img, intermediates = sample_ddpm(
            self._eps_fn(cond, score_corrector, corrector_kwargs), img, self.betas, v_posterior=self.v_posterior,
            start_T=n, clip_denoised=self.clip_denoised, mask=mask, x0=x0, q_sample=self.q_sample,
            temperature=float(temperature), noise_dropout=noise_dropout, quantize=quantize, callback=on_step,
            log_every_t=log_every_t)
        return img, intermediates, x0_preds

    @torch.no_grad()
    def progressive_denoising(self, cond, shape, verbose=True, callback=None, quantize_denoised=False,
                              img_callback=None, mask=None, x0=None, temperature=1., noise_dropout=0.,
                              score_corrector=None, corrector_kwargs=None, batch_size=None, x_T=None, start_T=None,
                              log_every_t=None):
        """Ancestral sampling returning (x_0, [predicted x_0 every log_every_t steps])."""
        if batch_size is not None:
            shape = [batch_size] + list(shape)
        batch_size = shape[0]
        img, _, x0_preds = self._run_chain(
            slice_cond(cond, batch_size), shape, x_T=x_T, start_T=start_T, timesteps=None,
            log_every_t=log_every_t or self.log_every_t, quantize_denoised=quantize_denoised, mask=mask, x0=x0,
            temperature=temperature, noise_dropout=noise_dropout, score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs, callback=callback, img_callback=img_callback)
        return img, x0_preds

    @torch.no_grad()
    def p_sample_loop(self, cond, shape, return_intermediates=False, x_T=None, verbose=True, callback=None,
                      timesteps=None, quantize_denoised=False, mask=None, x0=None, img_callback=None, start_T=None,
                      log_every_t=None):
        """Ancestral sampling; intermediates are x_T and x_t every log_every_t steps."""
        img, intermediates, _ = self._run_chain(
            cond, shape, x_T=x_T, start_T=start_T, timesteps=timesteps, log_every_t=log_every_t or self.log_every_t,
            quantize_denoised=quantize_denoised, mask=mask, x0=x0, callback=callback, img_callback=img_callback)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, cond, batch_size=16, return_intermediates=False, x_T=None, verbose=True, timesteps=None,
               quantize_denoised=False, mask=None, x0=None, shape=None, **kwargs):
        if shape is None:
            shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(slice_cond(cond, batch_size), shape, return_intermediates=return_intermediates,
                                  x_T=x_T, verbose=verbose, timesteps=timesteps, quantize_denoised=quantize_denoised,
                                  mask=mask, x0=x0)

    @torch.no_grad()
    def sample_log(self, cond, batch_size, ddim, ddim_steps, sampler=None, **kwargs):
        """Samples and intermediates for image logs: DDIM (ddim=True, `ddim_steps` steps) or ancestral,
        or any registered `sampler` (ldm.sampling.registry; no intermediates) for the rows it can draw
        (the masked / quantized rows stay with DDIM, the only sampler taking them)."""
        ddim_only = any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in ("mask", "x0", "quantize_x0"))
        if sampler is not None and sampler != "ddim" and not ddim_only:
            from ldm.sampling import registry
            spec = registry.get(sampler)
            shape = (batch_size, self.channels, self.image_size, self.image_size)
            options = {"clip_denoised": self.clip_denoised} if "clip_denoised" in spec.defaults else {}
            z = registry.sample(sampler, self, registry.initial_noise(self, shape), ddim_steps or 50, cond=cond,
                                uncond=kwargs.get("unconditional_conditioning"),
                                scale=kwargs.get("unconditional_guidance_scale", 1.0),
                                eta=kwargs.get("eta", 0.0) if spec.uses_eta else 0.0, **options)
            return z, None
        if ddim:
            from ldm.models.diffusion.ddim import DDIMSampler
            shape = (self.channels, self.image_size, self.image_size)
            return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)
        return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch_size, null_label=None):
        """The conditioning of `null_label` (e.g. [""]) repeated batch_size times, or the class
        embedder's null class."""
        if null_label is not None:
            xc = list(null_label) if isinstance(null_label, ListConfig) else null_label
            if not isinstance(xc, (dict, list)) and hasattr(xc, "to"):
                xc = xc.to(self.device)
            c = self.get_learned_conditioning(xc)
        elif cond_route(self.cond_stage_key).null == "null_class":
            xc = self.cond_stage_model.get_unconditional_conditioning(batch_size, device=self.device)
            return self.get_learned_conditioning(xc)
        else:
            raise NotImplementedError("unconditional conditioning needs a null_label (e.g. [''])")
        if isinstance(c, list):   # in case the encoder gives us a list
            return [repeat(ci, "1 ... -> b ...", b=batch_size).to(self.device) for ci in c]
        return repeat(c, "1 ... -> b ...", b=batch_size).to(self.device)
