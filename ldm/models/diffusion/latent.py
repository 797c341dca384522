"""LatentDiffusion: DDPM in the latent space of a frozen first stage (LDM §3.2-3.3).

z = scale_factor * E(x) (a posterior sample for KL first stages), conditioning c = tau(y)
from the cond stage, eps_theta(z_t, t, c) through DiffusionWrapper. Configs name this class
as `ldm.models.diffusion.ddpm.LatentDiffusion`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from einops import rearrange
from pytorch_lightning.utilities import rank_zero_info

from ldm import perf
from ldm.diffusion import objectives as obj
from ldm.diffusion import tiling
from ldm.diffusion.conditioning import ConditioningDropout, cond_route, make_cond_ids, wrap_cond
from ldm.models.diffusion.ddpm import DDPM, freeze
from ldm.models.diffusion.latent_sampling import LatentSamplingMixin
from ldm.modules import lora
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import default, instantiate_from_config


class LatentInput(list):
    """get_input's result: the original's list ([z, c] + [x, xrec] + [x] + [xc], as the flags ask),
    which configs' clients unpack and index, with the entries also by name (`.z`, `.c`, `.x`,
    `.xrec`, `.xc`; None when not requested)."""

    def __init__(self, values: list, names: list[str]):
        super().__init__(values)
        self._names = {}
        for i, name in enumerate(names):
            self._names.setdefault(name, i)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in ("z", "c", "x", "xrec", "xc"):
            raise AttributeError(f"get_input's result has no entry '{name}' (z, c, x, xrec, xc)")
        i = self._names.get(name)
        return None if i is None else self[i]


class LatentDiffusion(LatentSamplingMixin, DDPM):
    """main class"""

    # User code sets, reads and deletes this like a plain attribute (the original's super-resolution
    # notebook runs `delattr(model, "split_input_params")` between images): deleting = no tiling.
    split_input_params = property(lambda self: self.__dict__.get("_split_input_params"),
                                  lambda self, value: self.__dict__.__setitem__("_split_input_params", value),
                                  lambda self: self.__dict__.pop("_split_input_params", None))

    def __init__(self,
                 first_stage_config: Mapping[str, Any],
                 cond_stage_config: Any,
                 num_timesteps_cond: Optional[int] = None,
                 cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False,
                 concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None,
                 conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0,
                 scale_by_std: bool = False,
                 force_null_conditioning: bool = False,
                 ucg_rate: Any = None,
                 lora_config: Optional[Mapping[str, Any]] = None,
                 *args, **kwargs):
        # first_stage_config: {target, params} of the frozen autoencoder E/D (first_stage_model)
        # cond_stage_config: {target, params} of tau (cond_stage_model), or "__is_first_stage__" (reuse the
        #   first stage) or "__is_unconditional__"
        # num_timesteps_cond: > 1 noises the conditioning too, on a shortened schedule (cond_ids)
        # cond_stage_key: batch key of the conditioning input (caption, txt, class_label, segmentation, ...)
        # cond_stage_trainable: train tau jointly (its input is then encoded inside forward)
        # concat_mode: conditioning_key default when none is given: concat (True) or crossattn (False)
        # cond_stage_forward: name of the cond stage method to call instead of encode/forward
        # conditioning_key: see DiffusionWrapper
        # scale_factor: z = scale_factor * E(x) (unit-variance latents)
        # scale_by_std: set scale_factor = 1/std(z) from the first training batch (then a buffer)
        # force_null_conditioning: keep conditioning_key although the model is unconditional (SD2)
        # ucg_rate: conditioning dropout while training, for classifier-free guidance (not in the original):
        #   p for the cond stage's conditioning, or {cond: p, c_concat: p, c_adm: p}; see
        #   ldm.diffusion.conditioning.ConditioningDropout
        # lora_config: {rank, alpha, target_modules, dropout, text_encoder}: train LoRA adapters only
        # remaining args: DDPM's
        self.force_null_conditioning = force_null_conditioning
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond must not exceed timesteps")
        if conditioning_key is None:   # backwards compatibility (before DiffusionWrapper)
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not self.force_null_conditioning:
            conditioning_key = None
        super().__init__(conditioning_key=conditioning_key, *args, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.conditioning_dropout = ConditioningDropout(ucg_rate, cond_route(cond_stage_key))
        if self.conditioning_dropout and self.model.conditioning_key is None:
            raise ValueError("ucg_rate is set but the model is unconditional")
        try:
            self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.bbox_tokenizer = None
        # patch-wise first stage / UNet for large images (see ldm.diffusion.tiling); set by the user
        self.split_input_params: Optional[dict[str, Any]] = None
        # LoRA (ldm.modules.lora): added by _after_init, once the base checkpoint is loaded
        self._lora_spec, self.lora_config = lora_config, None

    def _after_init(self) -> None:
        super()._after_init()     # ckpt_path
        spec = self.__dict__.pop("_lora_spec", None)
        if spec is not None:      # freezes all but the adapters
            self.lora_config = lora.add_lora(self, spec)

    # ------------------------------------------------------------------ stages and schedule
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3) -> None:
        super().register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def make_cond_schedule(self) -> None:
        self.register_buffer("cond_ids", make_cond_ids(self.num_timesteps, self.num_timesteps_cond),
                             persistent=False)

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        self.first_stage_model = freeze(instantiate_from_config(config))

    def instantiate_cond_stage(self, config: Any) -> None:
        if not self.cond_stage_trainable:
            if config == "__is_first_stage__":
                rank_zero_info("Using first stage also as cond stage.")
                self.cond_stage_model = self.first_stage_model
            elif config == "__is_unconditional__":
                rank_zero_info(f"Training {self.__class__.__name__} as an unconditional model.")
                self.cond_stage_model = None
            else:
                self.cond_stage_model = freeze(instantiate_from_config(config))
        else:
            if config in ("__is_first_stage__", "__is_unconditional__"):
                raise ValueError(f"cond_stage_trainable is incompatible with cond_stage_config={config}")
            self.cond_stage_model = instantiate_from_config(config)

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx):
        """scale_by_std: before the very first step, scale_factor = 1 / std(z) of this batch's latents,
        computed on rank 0 and broadcast to every rank."""
        if not (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            return
        if float(self.scale_factor) != 1.0:
            raise ValueError("rather not use custom rescaling and std-rescaling simultaneously")
        std = torch.zeros((), device=self.device)
        if self.global_rank == 0:
            z, _ = self._first_stage_latent(batch, self.first_stage_key)
            std = z.flatten().std()
        if self._trainer is not None and self.trainer.world_size > 1:
            std = self.trainer.strategy.broadcast(std, src=0)
        self.scale_factor.copy_(1.0 / std)
        rank_zero_info(f"### USING STD-RESCALING ###: setting self.scale_factor to {float(self.scale_factor)}")

    # ------------------------------------------------------------------ first stage: x <-> z
    def get_first_stage_encoding(self, encoder_posterior) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    def _split_first_stage(self) -> bool:
        return self.split_input_params is not None and bool(self.split_input_params.get("patch_distributed_vq"))

    def _first_stage_tiled(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, **factor: int):
        p = self.split_input_params
        ks, stride = tiling.fit_to(p["ks"], p["stride"], *x.shape[-2:])
        return tiling.tiled_apply(lambda patch, i: fn(patch), x, ks, stride, p, **factor)

    def _decode(self, z, predict_cids=False, force_not_quantize=False):
        if predict_cids:
            if z.dim() == 4:
                z = torch.argmax(z.exp(), dim=1).long()
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None)
            z = rearrange(z, "b h w c -> b c h w").contiguous()
        z = 1. / self.scale_factor * z
        decode = self.first_stage_model.decode
        if "force_not_quantize" in inspect.signature(decode).parameters:   # VQModelInterface
            def decode(h, _decode=decode):
                return _decode(h, force_not_quantize=predict_cids or force_not_quantize)
        # the first stage decodes in its own (full) precision, also inside a mixed-precision step
        with perf.full_precision(z.device):
            z = z.to(perf.param_dtype(self.first_stage_model, z.dtype))
            if self._split_first_stage():
                return self._first_stage_tiled(decode, z, uf=self.split_input_params["vqf"])
            return decode(z)

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        return self._decode(z, predict_cids=predict_cids, force_not_quantize=force_not_quantize)

    def differentiable_decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        return self._decode(z, predict_cids=predict_cids, force_not_quantize=force_not_quantize)

    @torch.no_grad()
    def encode_first_stage(self, x):
        if self._split_first_stage():
            self.split_input_params["original_image_size"] = x.shape[-2:]
            return self._first_stage_tiled(self.first_stage_model.encode, x, df=self.split_input_params["vqf"])
        return self.first_stage_model.encode(x)

    def _first_stage_latent(self, batch, k, bs=None):
        """-> (z, x): z = scale_factor * E(x), or from the cached encoding when the batch carries
        `latent` (scripts/cache_latents.py; then x is batch[k] if present, else None)."""
        if perf.has_cached_latent(batch):
            z = self.get_first_stage_encoding(perf.cached_first_stage_encoding(batch, self.device, bs)).detach()
            x = super().get_input(batch, k)[:bs].to(self.device) if k in batch else None
            return z, x
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        return self.get_first_stage_encoding(self.encode_first_stage(x)).detach(), x

    # ------------------------------------------------------------------ conditioning: y -> c
    def get_learned_conditioning(self, c):
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            if not hasattr(self.cond_stage_model, self.cond_stage_forward):
                raise AttributeError(f"cond stage has no method '{self.cond_stage_forward}' (cond_stage_forward)")
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    @torch.no_grad()
    def get_input(self, batch, k, return_first_stage_outputs=False, force_c_encode=False,
                  cond_key=None, return_original_cond=False, bs=None, return_x=False):
        """-> [z, c] (+ [x, xrec] with return_first_stage_outputs, + [x] with return_x, + [xc] with
        return_original_cond). c is encoded unless the cond stage is trained (then in forward)."""
        z, x = self._first_stage_latent(batch, k, bs)
        c = xc = None
        conditional = self.model.conditioning_key is not None and not self.force_null_conditioning
        cond_key = default(cond_key, self.cond_stage_key)
        if x is None and (return_first_stage_outputs or return_x or (conditional and cond_key == k)):
            raise ValueError(f"this batch carries cached latents ('{perf.LATENT_KEY}') but no '{k}' images, "
                             "which return_first_stage_outputs / return_x / cond_key == first_stage_key need")
        if conditional and perf.CACHED_COND_KEY in batch:   # cache_latents.py --text: c is already encoded
            if self.cond_stage_trainable:
                raise ValueError(f"the batch carries '{perf.CACHED_COND_KEY}' (cached conditioning), which a trainable "
                                 "cond stage cannot use; cache without --text")
            dropping = self.training and bool(self.conditioning_dropout)
            c, xc = perf.cached_conditioning(batch, cond_key, self.device, dropping), batch.get(cond_key)
            c = c if bs is None else c[:bs]
        elif conditional:
            read = "first_stage" if cond_key == self.first_stage_key else cond_route(cond_key).read
            if read == "first_stage":
                xc = x
            elif read == "raw":
                xc = batch[cond_key]
            elif read == "batch":
                xc = batch
            else:
                xc = super().get_input(batch, cond_key).to(self.device)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc
            if bs is not None:
                c = c[:bs]
        if self.use_positional_encodings:
            raise NotImplementedError("use_positional_encodings is not implemented (nor was it in the original)")
        out, names = [z, c], ["z", "c"]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
            names.extend(["x", "xrec"])
        if return_x:
            out.append(x)
            names.append("x")
        if return_original_cond:
            out.append(xc)
            names.append("xc")
        return LatentInput(out, names)

    # ------------------------------------------------------------------ denoiser and loss (LDM Eq. 2)
    def shared_step(self, batch, **kwargs):
        dropout = self.conditioning_dropout if self.training else None
        if dropout:
            batch = self._drop_cond_input(batch, dropout)
        x, c = self.get_input(batch, self.first_stage_key)
        if dropout:
            c = self._drop_cond_slots(c, dropout)
        return self(x, c)

    def _drop_cond_input(self, batch, dropout: ConditioningDropout):
        """ucg_rate on the cond stage's input (text -> "", class -> the null class), before encoding."""
        if dropout.route.null == "null_class":
            key = getattr(self.cond_stage_model, "key", self.cond_stage_key)
            return dropout.drop_batch(batch, key, self.device, self.cond_stage_model.get_unconditional_conditioning)
        return dropout.drop_batch(batch, self.cond_stage_key, self.device)

    def _drop_cond_slots(self, c, dropout: ConditioningDropout):
        """ucg_rate on encoded conditionings: a spatial cond stage, c_concat and c_adm are zeroed."""
        return dropout.drop_encoded(c, "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn",
                                    self.device)

    def forward(self, x, c, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError(f"conditioning_key '{self.model.conditioning_key}' needs a conditioning")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t].to(self.device)
                c = self.q_sample(x_start=c, t=tc, noise=torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """The denoiser on z_t; cond is a dict {c_concat, c_crossattn, c_adm} or a bare tensor/list."""
        cond = wrap_cond(cond, self.model.conditioning_key)
        if self.split_input_params is not None:
            if return_ids:
                raise NotImplementedError("return_ids with split_input_params")
            x_recon = self._apply_model_tiled(x_noisy, t, cond)
        else:
            x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def _apply_model_tiled(self, x_noisy, t, cond):
        p = self.split_input_params
        ks, stride = p["ks"], p["stride"]
        if len(cond) != 1:
            raise NotImplementedError("split_input_params handles exactly one kind of conditioning")
        n_patches = ((x_noisy.shape[-2] - ks[0]) // stride[0] + 1) * ((x_noisy.shape[-1] - ks[1]) // stride[1] + 1)
        if cond_route(self.cond_stage_key).tiled and self.model.conditioning_key:
            (c_key, c), = cond.items()
            if len(c) != 1:
                raise NotImplementedError("split_input_params handles a single spatial conditioning")
            patches = tiling.unfold_patches(c[0], nn.Unfold(ks, dilation=1, padding=0, stride=stride), ks)
            cond_of = lambda i: {c_key: [patches[..., i]]}   # noqa: E731
        elif self.cond_stage_key == "coordinates_bbox":
            adapted = self._bbox_patch_conditioning(cond, x_noisy.shape[-1], ks, stride, n_patches)
            cond_of = lambda i: {"c_crossattn": [adapted[i]]}   # noqa: E731
        else:
            cond_of = lambda i: cond   # noqa: E731
        return tiling.tiled_apply(lambda z, i: self.model(z, t, **cond_of(i)), x_noisy, ks, stride, p)

    def _bbox_patch_conditioning(self, cond, w, ks, stride, n_patches):
        """Layout conditioning of each patch: the bbox tokens with the patch's crop coordinates."""
        if "original_image_size" not in self.split_input_params:
            raise ValueError("BoundingBoxRescaling is missing original_image_size (encode_first_stage sets it)")
        n_per_row = int((w - ks[0]) / stride[0] + 1)
        full_h, full_w = self.split_input_params["original_image_size"]
        f = 2 ** (self.first_stage_model.encoder.num_resolutions - 1)   # latent -> image factor
        limits = [(f * stride[0] * (n % n_per_row) / full_w, f * stride[1] * (n // n_per_row) / full_h,
                   f * ks[0] / full_w, f * ks[1] / full_h) for n in range(n_patches)]
        tokens = [torch.LongTensor(self.bbox_tokenizer._crop_encoder(b))[None].to(self.device) for b in limits]
        cut_cond = cond["c_crossattn"][0][..., :-2].to(self.device)
        adapted = torch.stack([torch.cat([cut_cond, tok], dim=1) for tok in tokens])
        adapted = self.get_learned_conditioning(rearrange(adapted, "l b n -> (l b) n"))
        return rearrange(adapted, "(l b) n d -> l b n d", l=n_patches)

    _loss_uses_logvar = True

    def p_losses(self, x_start, cond, t, noise=None):
        return self.diffusion_loss(x_start, cond, t, noise)

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (B,)."""
        from ldm.modules.distributions.distributions import normal_kl
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return obj.per_sample(kl_prior) / math.log(2.0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.lora_config is not None:      # LoRA: the adapters only
            return [p for p in self.parameters() if p.requires_grad]
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            rank_zero_info(f"{self.__class__.__name__}: Also optimizing conditioner params!")
            params = params + list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            rank_zero_info("Diffusion model optimizing logvar")
            params.append(self.logvar)
        return params

    def on_save_checkpoint(self, checkpoint):   # LoRA: the adapters alone, as lora.safetensors beside it
        if self.lora_config is not None:
            lora.save_lora_beside_checkpoints(self, self.lora_config)

    @torch.no_grad()
    def to_rgb(self, x):
        """A fixed random projection of a many-channel map (segmentation) to RGB in [-1, 1]."""
        x = x.float()
        if not hasattr(self, "colorize"):
            self.colorize = torch.randn(3, x.shape[1], 1, 1).to(x)
        x = nn.functional.conv2d(x, weight=self.colorize)
        return 2. * (x - x.min()) / (x.max() - x.min()) - 1.

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=4, sample=True, ddim_steps=200, ddim_eta=1., return_keys=None,
                   quantize_denoised=True, inpaint=True, plot_denoise_rows=False, plot_progressive_rows=True,
                   plot_diffusion_rows=True, unconditional_guidance_scale=1., unconditional_guidance_label=None,
                   use_ema_scope=True, sampler=None, **kwargs):
        # sampler: a name of ldm.sampling.registry for the samples / cfg rows (default: DDIM, as the original)
        from ldm.models.diffusion.logging import log_images_ldm
        return log_images_ldm(self, batch, N=N, n_row=n_row, sample=sample, ddim_steps=ddim_steps,
                              ddim_eta=ddim_eta, return_keys=return_keys, quantize_denoised=quantize_denoised,
                              inpaint=inpaint, plot_denoise_rows=plot_denoise_rows,
                              plot_progressive_rows=plot_progressive_rows, plot_diffusion_rows=plot_diffusion_rows,
                              unconditional_guidance_scale=unconditional_guidance_scale,
                              unconditional_guidance_label=unconditional_guidance_label, use_ema_scope=use_ema_scope,
                              sampler=sampler)


    # ------------------------------------------------------------------ log_images hooks (logging.log_images_ldm)
    def log_inputs(self, batch, N):
        """-> (z, c, x, first log rows: inputs, reconstruction, conditioning)."""
        from ldm.models.diffusion.logging import conditioning_logs
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        return z, c, x, {"inputs": x, "reconstruction": xrec, **conditioning_logs(self, batch, c, xc, x)}

    def log_unconditional(self, c, N, label):
        """The conditioning guidance guides away from (c_adm kept for crossattn-adm)."""
        uc = self.get_unconditional_conditioning(N, label)
        if self.model.conditioning_key == "crossattn-adm":
            uc = {"c_crossattn": [uc], "c_adm": c["c_adm"]}
        return uc


__all__ = ["LatentDiffusion"]
