"""DDPM (pixel space) as a Lightning module, and the DiffusionWrapper around its network.

The modules are wiring: the schedule math is `ldm.diffusion.schedule` / `objectives`,
patch-wise processing `ldm.diffusion.tiling`, sampling loops `ldm.sampling`, image logs
`ldm.models.diffusion.logging`. Paper notation (LDM §3): x -> z = scale_factor * E(x)
(first stage), tau_theta(y) the conditioning (cond stage), eps_theta(z_t, t, tau(y)) the
UNet inside `DiffusionWrapper`, trained with Eq. 2 (eps) or its x0 / v variants.

LatentDiffusion (`ldm.models.diffusion.latent`) and the SD2 / layout variants
(LatentUpscaleDiffusion, LatentInpaintDiffusion, ... in `ldm.models.diffusion.ddpm_variants`)
resolve from here too: configs name them as `ldm.models.diffusion.ddpm.<Name>`.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from einops import rearrange
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from ldm import perf
from ldm.diffusion import objectives as obj
from ldm.diffusion.conditioning import CONDITIONING_KEYS, WRAPPER_KEYS, WRAPPER_ROUTES, apply_ucg
from ldm.diffusion.denoiser import Denoiser, check_parameterization
from ldm.diffusion.recipes import TrainingNoise, build_weighting
from ldm.diffusion.schedule import Schedule, betas_from_config, register_schedule_buffers, schedule_tensors
from ldm.models.diffusion import loading
from ldm.sampling.noise import ancestral_step, randn, uniform_on_device  # noqa: F401 (original public name)
from ldm.util import default, instantiate_from_config

logger = logging.getLogger(__name__)

__conditioning_keys__ = CONDITIONING_KEYS
DEFAULT_LEARNING_RATE = 1.0e-4   # when nothing (main.py) set `model.learning_rate`

# Classes defined in other modules that configs name as ldm.models.diffusion.ddpm.<Name>.
_REEXPORTS = {
    "LatentDiffusion": "ldm.models.diffusion.latent",
    "LatentUpscaleDiffusion": "ldm.models.diffusion.ddpm_variants",
    "LatentFinetuneDiffusion": "ldm.models.diffusion.ddpm_variants",
    "LatentInpaintDiffusion": "ldm.models.diffusion.ddpm_variants",
    "LatentDepth2ImageDiffusion": "ldm.models.diffusion.ddpm_variants",
    "LatentUpscaleFinetuneDiffusion": "ldm.models.diffusion.ddpm_variants",
    "Layout2ImgDiffusion": "ldm.models.diffusion.ddpm_variants",
    "ImageEmbeddingConditionedLatentDiffusion": "ldm.models.diffusion.ddpm_variants",
}


def __getattr__(name: str) -> Any:
    if name in _REEXPORTS:
        return getattr(importlib.import_module(_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replaces `.train` of frozen stages so that train/eval mode does not change anymore."""
    return self


class _TrainDisabled:
    """`module.train` of a frozen stage: a no-op returning the module (picklable, unlike a bound method)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return self.module


def freeze(module: nn.Module) -> nn.Module:
    """eval(), train() disabled, no gradients (first stage, frozen cond stage, low-scale model)."""
    module = module.eval()
    module.train = _TrainDisabled(module)
    for p in module.parameters():
        p.requires_grad = False
    return module


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and feeds it the conditioning by `conditioning_key`:
    concat -> channel concat (c_concat); crossattn -> `context` (c_crossattn); adm -> class label
    `y`; hybrid = concat + crossattn; hybrid-adm / crossattn-adm add `y = c_adm`."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: Optional[str]):
        super().__init__()
        # diff_model_config: the UNet's {target, params}; `sequential_crossattn: true` (SD2) passes
        #   the c_crossattn list to the UNet as is instead of concatenating it
        # conditioning_key: None | concat | crossattn | hybrid | adm | hybrid-adm | crossattn-adm
        if conditioning_key not in WRAPPER_KEYS:
            raise ValueError(f"conditioning_key must be one of {WRAPPER_KEYS}, got {conditioning_key!r}")
        self.sequential_cross_attn = bool(diff_model_config.get("sequential_crossattn", False))
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None,
                c_crossattn: Optional[list] = None, c_adm: Optional[torch.Tensor] = None):
        route = WRAPPER_ROUTES[self.conditioning_key]
        kwargs: dict[str, Any] = {}
        if route.concat:
            x = torch.cat([x] + list(c_concat), dim=1)
        if route.context:
            sequential = self.conditioning_key == "crossattn" and self.sequential_cross_attn
            kwargs["context"] = c_crossattn if sequential else torch.cat(c_crossattn, 1)
        if route.y == "c_adm":
            if c_adm is None:
                raise ValueError(f"conditioning_key '{self.conditioning_key}' needs c_adm")
            kwargs["y"] = c_adm
        elif route.y == "c_crossattn":
            kwargs["y"] = c_crossattn[0]
        return self.diffusion_model(x, t, **kwargs)


class _LoadCheckpointAfterInit(type(pl.LightningModule)):
    """Calls `_after_init()` when the outermost constructor has returned: the `ckpt_path` of a
    config is loaded once, into the fully built model (every subclass's modules exist then)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        obj._after_init()
        return obj


class DDPM(pl.LightningModule, metaclass=_LoadCheckpointAfterInit):
    """Gaussian diffusion in image space (Ho et al. 2020) with a fixed variance schedule."""

    def __init__(self,
                 unet_config: Mapping[str, Any],
                 timesteps: int = 1000,
                 beta_schedule: str = "linear",
                 loss_type: str = "l2",
                 ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False,
                 monitor: Optional[str] = "val/loss",
                 use_ema: bool = True,
                 first_stage_key: str = "image",
                 image_size: int = 256,
                 channels: int = 3,
                 log_every_t: int = 100,
                 clip_denoised: bool = True,
                 linear_start: float = 1e-4,
                 linear_end: float = 2e-2,
                 cosine_s: float = 8e-3,
                 given_betas: Optional[Sequence[float]] = None,
                 original_elbo_weight: float = 0.,
                 v_posterior: float = 0.,
                 l_simple_weight: float = 1.,
                 conditioning_key: Optional[str] = None,
                 parameterization: str = "eps",
                 scheduler_config: Optional[Mapping[str, Any]] = None,
                 use_positional_encodings: bool = False,
                 learn_logvar: bool = False,
                 logvar_init: float = 0.,
                 make_it_fit: bool = False,
                 ucg_training: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 reset_ema: bool = False,
                 reset_num_ema_updates: bool = False,
                 compile_unet: Any = False,
                 use_fused_adam: bool = False,
                 loss_weighting: Optional[Mapping[str, Any]] = None,
                 snr_gamma: Optional[float] = None,
                 noise_offset: float = 0.0,
                 input_perturbation: float = 0.0,
                 rescale_betas_zero_snr: bool = False,
                 ):
        # unet_config: {target, params} of the denoising network (inside DiffusionWrapper as model.diffusion_model)
        # timesteps: number of diffusion steps T
        # beta_schedule: linear | cosine | sqrt_linear | sqrt (see ldm.diffusion.schedule.make_beta_schedule)
        # loss_type: l2 | l1 distance between network output and target
        # ckpt_path: checkpoint to load after building (strict; see ldm.models.diffusion.loading)
        # ignore_keys: key prefixes dropped from that checkpoint
        # load_only_unet: load the checkpoint into `model` (the DiffusionWrapper) only
        # monitor: metric the checkpoint callback of main.py watches
        # use_ema: keep an exponential moving average of `model` (model_ema.*), used for validation/sampling
        # first_stage_key: batch key of the images
        # image_size, channels: shape of the generated samples
        # log_every_t: step interval of intermediates in sampling logs
        # clip_denoised: clip predicted x0 to [-1, 1] while sampling
        # linear_start, linear_end, cosine_s: beta schedule parameters
        # given_betas: explicit betas (overrides beta_schedule)
        # original_elbo_weight: weight of the variational bound term L_vlb
        # v_posterior: reverse variance = (1 - v) * posterior variance + v * beta
        # l_simple_weight: weight of the simple (reweighted) loss
        # conditioning_key: how DiffusionWrapper passes conditioning (None for unconditional)
        # parameterization: network predicts eps | x0 | v
        # scheduler_config: {target, params} of an LR-lambda schedule (ldm.lr_scheduler), stepped every step
        # use_positional_encodings: unsupported by the original (kept for config compatibility)
        # learn_logvar: learn a per-timestep log-variance dividing the loss (logvar parameter)
        # logvar_init: initial value of that log-variance
        # make_it_fit: tile checkpoint weights into differently shaped parameters (SD2)
        # ucg_training: {batch_key: {p, val}} conditioning dropout for classifier-free guidance (SD2)
        # reset_ema: re-initialise the EMA from the loaded weights (needs ckpt_path)
        # reset_num_ema_updates: restart the EMA decay warm-up
        # compile_unet: torch.compile the UNet in place (true, or a dict of torch.compile keywords);
        #   not in the original, see ldm.perf
        # use_fused_adam: the fused AdamW kernel when the parameters are on CUDA (not in the original)
        # -- not in the original, all off by default (ldm.diffusion.recipes, ldm.diffusion.weighting):
        # loss_weighting: {target, params} of a per-sample weight w(t) of the simple loss (min-SNR, P2, EDM)
        # snr_gamma: short form of loss_weighting = min-SNR-gamma (Hang et al. 2023), e.g. 5.0
        # noise_offset: training noise eps + noise_offset * randn(B, C, 1, 1) (offset noise)
        # input_perturbation: the network input is noised with eps + input_perturbation * randn_like(eps),
        #   the target stays eps (Ning et al. 2023)
        # rescale_betas_zero_snr: rescale the betas to zero terminal SNR (Lin et al. 2024; use with v)
        super().__init__()
        self.parameterization = check_parameterization(parameterization)
        rank_zero_info(f"{self.__class__.__name__}: Running in {self.parameterization}-prediction mode")
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_fused_adam = use_fused_adam
        perf.compile_module(self.model.diffusion_model, compile_unet)
        self.use_ema = use_ema
        if self.use_ema:
            from ldm.modules.ema import LitEma
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.make_it_fit = make_it_fit
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=float(logvar_init), size=(self.num_timesteps,))
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:   # follows the module's device, not saved
            self.register_buffer("logvar", logvar, persistent=False)
        self.loss_weighting = build_weighting(loss_weighting, snr_gamma)
        self.training_noise = TrainingNoise(noise_offset, input_perturbation)
        self.ucg_training = dict(ucg_training or {})
        if self.ucg_training:
            self.ucg_prng = np.random.RandomState()
        if (reset_ema or reset_num_ema_updates) and not self.use_ema:
            raise ValueError("reset_ema / reset_num_ema_updates need use_ema")
        if reset_ema and ckpt_path is None:
            raise ValueError("reset_ema needs ckpt_path")
        # loaded by _after_init, once the whole model (any subclass) is built
        self._init_checkpoint = dict(path=ckpt_path, ignore_keys=tuple(ignore_keys or ()),
                                     only_model=load_only_unet, reset_ema=reset_ema,
                                     reset_num_ema_updates=reset_num_ema_updates)
        self.restarted_from_ckpt = False

    def _after_init(self) -> None:
        spec = self.__dict__.pop("_init_checkpoint", None)
        if spec is None:
            return
        if spec["path"] is not None:
            self.init_from_ckpt(spec["path"], ignore_keys=spec["ignore_keys"], only_model=spec["only_model"],
                                reset_ema=spec["reset_ema"])
            self.restarted_from_ckpt = True
        self._reset_ema(spec["reset_ema"] and spec["path"] is not None, spec["reset_num_ema_updates"])

    # ------------------------------------------------------------------ schedule, EMA, checkpoints
    def register_schedule(self, given_betas: Optional[Sequence[float]] = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        betas = betas_from_config(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        if getattr(self, "rescale_betas_zero_snr", False):
            from ldm.diffusion.schedule import rescale_zero_terminal_snr
            betas = np.asarray(rescale_zero_terminal_snr(torch.as_tensor(betas, dtype=torch.float64)), dtype=np.float64)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        register_schedule_buffers(self, schedule_tensors(betas, self.v_posterior, self.parameterization))

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Within the block `model` holds the EMA weights (no-op without use_ema)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: Switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: Restored training weights", context)

    def _reset_ema(self, reset_ema: bool, reset_num_ema_updates: bool) -> None:
        if reset_ema:
            rank_zero_info("Resetting ema to pure model weights (restoring from an ema-only checkpoint).")
            from ldm.modules.ema import LitEma
            self.model_ema = LitEma(self.model)
        if reset_num_ema_updates:
            rank_zero_warn("Resetting the number of EMA updates to zero.")
            self.model_ema.reset_num_updates()

    @torch.no_grad()
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False,
                       reset_ema: bool = False) -> None:
        """Load `path` strictly (ldm.checkpoint.load_into); `only_model`: into `model` only. A
        checkpoint without EMA weights (or reset_ema) starts the EMA from the loaded weights."""
        loading.load_diffusion_checkpoint(self, path, ignore_keys, only_model=only_model, reset_ema=reset_ema,
                                          make_it_fit=self.make_it_fit, prepare=self._prepare_checkpoint)

    def _prepare_checkpoint(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook: adapt a checkpoint's state dict before loading (fine-tunes extend input channels)."""
        return sd

    adapts_checkpoint_layout = True   # on_load_checkpoint renames released layouts, drops benign keys

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning resume (main.py -r): released key layouts load as with `ckpt_path`."""
        from ldm.checkpoint import adapt_released_layout
        checkpoint["state_dict"] = adapt_released_layout(self, checkpoint["state_dict"], source="resumed checkpoint")

    # ------------------------------------------------------------------ schedule view and denoiser
    @property
    def schedule(self) -> Schedule:
        """A frozen view of the registered schedule buffers (on the module's current device)."""
        return Schedule.of(self)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The network call (pixel-space DDPM is unconditional; LatentDiffusion routes cond)."""
        return self.model(x_noisy, t)

    def denoiser(self) -> Denoiser:
        """apply_model under this model's schedule and parameterization, answering eps / x0 / v."""
        return Denoiser.discrete(self.apply_model, self.schedule, self.parameterization)

    # ------------------------------------------------------------------ forward process (LDM §3, DDPM Eq. 4-7)
    def q_mean_variance(self, x_start, t):
        return obj.q_mean_variance(self.schedule, x_start, t)

    def predict_start_from_noise(self, x_t, t, noise):
        return obj.predict_start_from_noise(self.schedule, x_t, t, noise)

    def predict_start_from_z_and_v(self, x_t, t, v):
        return obj.predict_start_from_z_and_v(self.schedule, x_t, t, v)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return obj.predict_eps_from_z_and_v(self.schedule, x_t, t, v)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return obj.predict_eps_from_xstart(self.schedule, x_t, t, pred_xstart)

    def q_posterior(self, x_start, x_t, t):
        return obj.q_posterior(self.schedule, x_start, x_t, t)

    def q_sample(self, x_start, t, noise=None):
        return obj.q_sample(self.schedule, x_start, t, noise)

    def get_v(self, x, noise, t):
        return obj.get_v(self.schedule, x, noise, t)

    # ------------------------------------------------------------------ ancestral sampling (DDPM Alg. 2)
    def p_mean_variance(self, x, t, clip_denoised: bool):
        x_recon = self.denoiser().x0(x, t)
        if clip_denoised:
            x_recon.clamp_(-1., 1.)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x, t, clip_denoised=True, repeat_noise=False):
        model_mean, _, model_log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        return ancestral_step(model_mean, model_log_variance, t, randn(x.shape, x, repeat=repeat_noise))

    @torch.no_grad()
    def p_sample_loop(self, shape, return_intermediates=False):
        from ldm.sampling.ddpm import sample_ddpm
        img = torch.randn(shape, device=self.betas.device)
        img, intermediates = sample_ddpm(self.denoiser().eps, img, self.betas, v_posterior=self.v_posterior,
                                         clip_denoised=self.clip_denoised, log_every_t=self.log_every_t)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size=16, return_intermediates=False):
        return self.p_sample_loop((batch_size, self.channels, self.image_size, self.image_size),
                                  return_intermediates=return_intermediates)

    # ------------------------------------------------------------------ training
    def get_loss(self, pred, target, mean=True):
        return obj.get_loss(pred, target, self.loss_type, mean=mean)

    @property
    def log_prefix(self) -> str:
        return "train" if self.training else "val"

    def p_losses(self, x_start, t, noise=None):
        return self.diffusion_loss(x_start, None, t, noise)

    # LatentDiffusion divides the simple loss by exp(logvar_t); the original DDPM did not
    _loss_uses_logvar = False

    def diffusion_loss(self, x_start, cond, t, noise=None):
        """The one training objective of DDPM and LatentDiffusion (LDM Eq. 2, eps / x0 / v targets):
        -> (loss, log dict). Noise drawn here as the original (randn_like), plus the opt-in
        offset / input perturbation; the per-sample weight comes from `loss_weighting`."""
        noise = default(noise, lambda: self.training_noise.draw(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=self.training_noise.perturb(noise))
        model_out = self.apply_model(x_noisy, t, cond)
        target = obj.training_target(self.schedule, self.parameterization, x_start, noise, t)
        loss = obj.per_sample(self.get_loss(model_out, target, mean=False))
        weights = None
        if self.loss_weighting is not None:
            weights = self.loss_weighting(t, self.alphas_cumprod, self.parameterization)
        return obj.diffusion_loss(loss, t, self.lvlb_weights, self.l_simple_weight, self.original_elbo_weight,
                                  self.log_prefix, logvar=self.logvar if self._loss_uses_logvar else None,
                                  learn_logvar=self.learn_logvar, weights=weights)

    def forward(self, x, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, t, *args, **kwargs)

    def get_input(self, batch, k):
        """batch[k] (B, H, W[, C]) -> (B, C, H, W) float, contiguous."""
        x = batch[k]
        if len(x.shape) == 3:
            x = x[..., None]
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch):
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def _batch_size(self, batch) -> Optional[int]:
        x = batch.get(self.first_stage_key, batch.get(perf.LATENT_KEY)) if isinstance(batch, Mapping) else None
        return len(x) if x is not None else None

    def training_step(self, batch, batch_idx):
        if self.ucg_training:
            apply_ucg(batch, self.ucg_training, self.ucg_prng)
        loss, loss_dict = self.shared_step(batch)
        bs = self._batch_size(batch)
        # No host-device sync per step: Lightning turns prog_bar values into Python numbers every
        # step (.item()), and logs a Python number by copying it to the device (a blocking copy);
        # so prog_bar is off (ldm.training.callbacks.SyncFreeProgressBar shows these every
        # refresh_rate steps) and numbers become device tensors through fill kernels.
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("global_step", torch.full((), float(self.global_step), device=self.device), prog_bar=False,
                 logger=True, on_step=True, on_epoch=False, batch_size=bs)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", torch.full((), float(lr), device=self.device), prog_bar=False, logger=True,
                     on_step=True, on_epoch=False, batch_size=bs)
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
            loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        bs = self._batch_size(batch)
        self.log_dict(loss_dict_no_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs)
        self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs)

    def on_train_batch_end(self, *args, **kwargs):
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        """AdamW at `self.learning_rate` (set by main.py from base_learning_rate), optionally with the
        LambdaLR schedule of `scheduler_config` stepped every training step."""
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            rank_zero_warn(f"learning_rate not set on the model; using {DEFAULT_LEARNING_RATE}")
            lr = DEFAULT_LEARNING_RATE
        opt = perf.adamw(self.trainable_parameters(), lr=lr, fused=self.use_fused_adam)
        if not self.use_scheduler:
            return opt
        if "target" not in self.scheduler_config:
            raise ValueError("scheduler_config needs a `target`")
        schedule = instantiate_from_config(self.scheduler_config)
        rank_zero_info("Setting up LambdaLR scheduler...")
        return [opt], [{"scheduler": LambdaLR(opt, lr_lambda=schedule.schedule), "interval": "step", "frequency": 1}]

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=2, sample=True, return_keys=None, **kwargs):
        from ldm.models.diffusion.logging import log_images_ddpm
        return log_images_ddpm(self, batch, N=N, n_row=n_row, sample=sample, return_keys=return_keys)
