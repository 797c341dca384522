"""First-stage autoencoders of Latent Diffusion (Rombach et al. 2022, Sec. 3.1): `AutoencoderKL`
(KL-regularised, a DiagonalGaussian posterior), `VQModel` (vector-quantised, VQGAN), the
`VQModelInterface` the LDM configs build (encode -> pre-quantisation latent, decode quantises),
and `IdentityFirstStage`.

Training is adversarial with two optimizers (autoencoder, discriminator), in the original's
order: the original relied on Lightning 1.x calling `training_step` once per optimizer, so one
batch was (1) a forward, the autoencoder's loss and step, then (2) a *fresh* forward of the
just-updated autoencoder (its own random draws: a new posterior sample for KL, a new
`batch_resize_range` size for VQ) whose detached reconstructions the discriminator's loss and
step see. Here, with Lightning 2 manual optimisation, one `training_step` does both in that
order. `reuse_forward_for_disc=True` skips the second forward (the discriminator sees the
reconstructions of the generator's forward, from before its update): one forward per batch,
faster, but not the original's training. Both losses see the same `global_step`, and
`global_step` advances once per optimizer update of the autoencoder (Lightning would
otherwise count both optimizers).

The perceptual network: Lightning 1.x called `model.train()` on the whole module before
training, which put LPIPS (built `.eval()`) into train mode, so every released first stage was
trained with LPIPS's dropout active; validation ran it in eval. Lightning 2 keeps each
submodule's mode, so `on_fit_start` does that `train()` again; the loss's
`perceptual_dropout: false` keeps LPIPS in eval throughout instead (its VGG trunk is frozen
either way).

Gradient accumulation: Lightning refuses `Trainer(accumulate_grad_batches=N)` with manual
optimisation, so the model does it: set `model.accumulate_grad_batches = N` (constructor
argument, or main.py moves the trainer setting here). Losses are divided by N and both
optimizers (and LR schedulers) step every N batches and at the end of an epoch;
`global_step` then counts optimizer updates, as Lightning's automatic accumulation does.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class _FirstStage(pl.LightningModule):
    """What AutoencoderKL and VQModel share: input handling, loading, EMA scope and GAN training."""

    image_key: str
    use_ema: bool = False
    accumulate_grad_batches: int = 1

    def _setup(self, image_key: str, colorize_nlabels: Optional[int], monitor: Optional[str],
               scheduler_config: Any, base_learning_rate: float, accumulate_grad_batches: int,
               reuse_forward_for_disc: bool = False) -> None:
        self.automatic_optimization = False
        self.reuse_forward_for_disc = bool(reuse_forward_for_disc)
        self.image_key = image_key
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.scheduler_config = scheduler_config
        self.base_learning_rate = base_learning_rate
        self.accumulate_grad_batches = int(accumulate_grad_batches)

    def _setup_ema(self, decay: Optional[float]) -> None:
        self.use_ema = decay is not None
        if self.use_ema:
            from ldm.modules.ema import LitEma
            assert 0.0 < decay < 1.0, f"EMA decay must be in (0, 1), got {decay}"
            self.model_ema = LitEma(self, decay=decay)
            logger.info("Keeping EMAs of %d tensors.", len(list(self.model_ema.buffers())))

    # ------------------------------------------------------------------ loading
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights strictly (ldm.checkpoint: only its known-benign differences, e.g. a released
        checkpoint's `loss.*` under an inference config, are tolerated); checkpoint keys starting
        with an `ignore_keys` prefix are dropped and those weights keep their initial values."""
        from ldm.checkpoint import load_into, load_state_dict_file
        sd = load_state_dict_file(path)
        ignored = [k for k in sd if any(k.startswith(ik) for ik in ignore_keys)]
        for k in ignored:
            del sd[k]
        for k, v in self.state_dict().items():       # ignored entries stay as initialised
            if k not in sd and any(k.startswith(ik) for ik in ignore_keys):
                sd[k] = v
        if ignored:
            logger.info("%s: ignoring %d keys (%s, ...)", path, len(ignored), ", ".join(ignored[:3]))
        load_into(self, sd, source=str(path))
        logger.info("Restored %s from %s", type(self).__name__, path)

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Within the block, the parameters are the EMA ones (when EMA is used)."""
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    # ------------------------------------------------------------------ data
    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """batch[k] (B, H, W[, C]) channels-last -> (B, C, H, W) float."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a multi-channel map (e.g. segmentation) to RGB in [-1, 1] with a fixed random matrix."""
        assert self.image_key == "segmentation", "to_rgb colours segmentation maps"
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ hooks of the subclasses
    def _forward_for_loss(self, x: torch.Tensor) -> tuple:
        raise NotImplementedError

    def _loss(self, x: torch.Tensor, out: tuple, optimizer_idx: int, global_step: int, split: str):
        raise NotImplementedError

    def _generator_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def _learning_rates(self) -> tuple[float, float]:
        lr = getattr(self, "learning_rate", None)
        lr = self.base_learning_rate if lr is None else lr
        return lr, lr   # (autoencoder, discriminator)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        # Lightning 1.x's model.train() before training (see module doc): LPIPS dropout on, unless
        # the loss keeps its perceptual network in eval (perceptual_dropout: false)
        self.train()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        n = max(1, int(self.accumulate_grad_batches))
        update = (batch_idx + 1) % n == 0 or bool(getattr(self.trainer, "is_last_batch", False))
        step = self.global_step        # both losses see the same step, as in the original

        self.toggle_optimizer(opt_ae)   # only autoencoder parameters receive gradients
        x = self.get_input(batch, self.image_key)
        out = self._forward_for_loss(x)
        aeloss, log_ae = self._loss(x, out, 0, step, "train")
        self.manual_backward(aeloss / n)
        if update:
            opt_ae.step()
            opt_ae.zero_grad(set_to_none=True)
        self.untoggle_optimizer(opt_ae)

        self.toggle_optimizer(opt_disc)
        if not self.reuse_forward_for_disc:
            # the original's second training_step call: a fresh forward of the updated autoencoder
            # (no graph: the autoencoder's parameters are toggled off for this optimizer anyway)
            x = self.get_input(batch, self.image_key)
            with torch.no_grad():
                out = self._forward_for_loss(x)
        discloss, log_disc = self._loss(x, out, 1, step, "train")
        self.manual_backward(discloss / n)
        if update:
            _step_without_counting(opt_disc)
            opt_disc.zero_grad(set_to_none=True)
            for sched in self._schedulers():
                sched.step()
        self.untoggle_optimizer(opt_disc)

        self.log("train/aeloss", aeloss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log("train/discloss", discloss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log_dict(log_ae, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        self.log_dict(log_disc, prog_bar=False, logger=True, on_step=True, on_epoch=False)

    def _schedulers(self) -> list:
        scheds = self.lr_schedulers()
        if scheds is None:
            return []
        return list(scheds) if isinstance(scheds, (list, tuple)) else [scheds]

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        log = self._validation_step(batch, batch_idx)
        if self.use_ema:
            with self.ema_scope():
                self._validation_step(batch, batch_idx, suffix="_ema")
        return log

    def _validation_step(self, batch: dict, batch_idx: int, suffix: str = "") -> dict:
        x = self.get_input(batch, self.image_key)
        out = self._forward_for_loss(x)
        split = "val" + suffix
        aeloss, log_ae = self._loss(x, out, 0, self.global_step, split)
        _, log_disc = self._loss(x, out, 1, self.global_step, split)
        rec_loss = log_ae.pop(f"{split}/rec_loss")
        self.log(f"{split}/rec_loss", rec_loss, prog_bar=True, logger=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        self.log(f"{split}/aeloss", aeloss, prog_bar=True, logger=True, on_step=False, on_epoch=True, sync_dist=True)
        self.log_dict(log_ae, sync_dist=True)
        self.log_dict(log_disc, sync_dist=True)
        return {f"{split}/rec_loss": rec_loss, **log_ae, **log_disc}

    def configure_optimizers(self):
        if not hasattr(self.loss, "discriminator"):
            raise RuntimeError(f"{type(self).__name__} was built with lossconfig {type(self.loss).__name__}, "
                               "which has no discriminator: it can encode/decode but not be trained")
        lr_ae, lr_disc = self._learning_rates()
        opt_ae = torch.optim.Adam(self._generator_parameters(), lr=lr_ae, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr_disc, betas=(0.5, 0.9))
        if self.scheduler_config is None:
            return [opt_ae, opt_disc]
        schedule = instantiate_from_config(self.scheduler_config).schedule
        scheds = [{"scheduler": LambdaLR(opt, lr_lambda=schedule), "interval": "step", "frequency": 1}
                  for opt in (opt_ae, opt_disc)]
        return [opt_ae, opt_disc], scheds


def _step_without_counting(opt: Any) -> None:
    """Step a Lightning optimizer without advancing `trainer.global_step`: in manual optimisation
    Lightning counts every optimizer's step (Lightning-AI/pytorch-lightning#17958)."""
    hooks = ("_on_before_step", "_on_after_step")
    if not all(hasattr(opt, h) for h in hooks):
        opt.step()
        return
    saved = [getattr(opt, h) for h in hooks]
    for h in hooks:
        setattr(opt, h, lambda: None)
    try:
        opt.step()
    finally:
        for h, f in zip(hooks, saved):
            setattr(opt, h, f)


class VQModel(_FirstStage):
    def __init__(self, ddconfig: dict, lossconfig: dict, n_embed: int, embed_dim: int,
                 ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: Optional[int] = None, monitor: Optional[str] = None,
                 batch_resize_range: Optional[Sequence[int]] = None, scheduler_config: Optional[dict] = None,
                 lr_g_factor: float = 1.0, remap: Optional[str] = None, sane_index_shape: bool = False,
                 use_ema: bool = False, base_learning_rate: float = 4.5e-6, accumulate_grad_batches: int = 1,
                 reuse_forward_for_disc: bool = False):
        # ddconfig: Encoder/Decoder kwargs; lossconfig: {target, params} of the training loss
        # n_embed: codebook size; embed_dim: code dimension
        # ckpt_path / ignore_keys: weights to load, key prefixes to drop from them
        # image_key: batch entry holding images; colorize_nlabels: channels of a segmentation input
        # monitor: metric for checkpointing; batch_resize_range: (min, max) random per-batch size (multiples of 16)
        # scheduler_config: {target, params} of an object with `.schedule(step)` -> LR multiplier
        # lr_g_factor: autoencoder LR = lr_g_factor * discriminator LR
        # remap / sane_index_shape: VectorQuantizer2 options; use_ema: keep an EMA of the weights
        # base_learning_rate: LR when main.py has not set `model.learning_rate`
        # accumulate_grad_batches: batches per optimizer update (see module doc)
        # reuse_forward_for_disc: the discriminator step reuses the generator step's forward (faster,
        #   not the original's order; see module doc)
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self._setup(image_key, colorize_nlabels, monitor, scheduler_config, base_learning_rate,
                    accumulate_grad_batches, reuse_forward_for_disc)
        self.batch_resize_range = batch_resize_range
        self.lr_g_factor = lr_g_factor
        self._setup_ema(0.9999 if use_ema else None)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor):
        """-> (quant (B, embed_dim, h, w), codebook loss, (perplexity, min_encodings, indices))."""
        return self.quantize(self.encode_to_prequant(x))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) -> images."""
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        x = super().get_input(batch, k)
        if self.batch_resize_range is not None:
            lower, upper = self.batch_resize_range[0], self.batch_resize_range[1]
            # the first few batches at the largest size, to hit out-of-memory early
            new_size = upper if self.global_step <= 4 else int(np.random.choice(np.arange(lower, upper + 16, 16)))
            if new_size != x.shape[2]:
                x = F.interpolate(x, size=new_size, mode="bicubic")
            x = x.detach()
        return x

    def _forward_for_loss(self, x: torch.Tensor) -> tuple:
        return self(x, return_pred_indices=True)   # (xrec, qloss, indices)

    def _loss(self, x, out, optimizer_idx, global_step, split):
        xrec, qloss, ind = out
        return self.loss(qloss, x, xrec, optimizer_idx, global_step, last_layer=self.get_last_layer(),
                         split=split, predicted_indices=ind)

    def _generator_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quantize.parameters(),
                *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]

    def _learning_rates(self) -> tuple[float, float]:
        lr, _ = super()._learning_rates()
        return self.lr_g_factor * lr, lr

    @torch.no_grad()
    def log_images(self, batch: dict, only_inputs: bool = False, plot_ema: bool = False, **kwargs: Any) -> dict:
        log = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if only_inputs:
            log["inputs"] = x
            return log
        xrec, _ = self(x)
        if x.shape[1] > 3:
            assert xrec.shape[1] > 3
            x, xrec = self.to_rgb(x), self.to_rgb(xrec)
        log["inputs"] = x
        log["reconstructions"] = xrec
        if plot_ema:
            with self.ema_scope():
                xrec_ema, _ = self(x)
                log["reconstructions_ema"] = self.to_rgb(xrec_ema) if x.shape[1] > 3 else xrec_ema
        return log


class VQModelInterface(VQModel):
    """VQModel as the LDM configs use it: `encode` returns the pre-quantisation latent and
    `decode` quantises (unless `force_not_quantize`)."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.quantize(self.encode_to_prequant(input))
        dec = self.decoder(self.post_quant_conv(quant))
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class AutoencoderKL(_FirstStage):
    def __init__(self, ddconfig: dict, lossconfig: dict, embed_dim: int, ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image", colorize_nlabels: Optional[int] = None,
                 monitor: Optional[str] = None, ema_decay: Optional[float] = None, learn_logvar: bool = False,
                 scheduler_config: Optional[dict] = None, base_learning_rate: float = 4.5e-6,
                 accumulate_grad_batches: int = 1, reuse_forward_for_disc: bool = False):
        # ddconfig: Encoder/Decoder kwargs (double_z must be true); lossconfig: {target, params} of the loss
        # embed_dim: latent channels; ckpt_path / ignore_keys: weights to load, key prefixes to drop
        # image_key: batch entry holding images; colorize_nlabels: channels of a segmentation input
        # monitor: metric for checkpointing; ema_decay: keep an EMA of the weights (SD2), None: off
        # learn_logvar: also optimise the loss's `logvar` (SD2); scheduler_config: {target, params} with `.schedule`
        # base_learning_rate: LR when main.py has not set `model.learning_rate`
        # accumulate_grad_batches: batches per optimizer update (see module doc)
        # reuse_forward_for_disc: the discriminator step reuses the generator step's forward (faster,
        #   not the original's order; see module doc)
        super().__init__()
        self.learn_logvar = learn_logvar
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and logvar)")
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self._setup(image_key, colorize_nlabels, monitor, scheduler_config, base_learning_rate,
                    accumulate_grad_batches, reuse_forward_for_disc)
        self._setup_ema(ema_decay)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _forward_for_loss(self, x: torch.Tensor) -> tuple:
        return self(x)   # (xrec, posterior)

    def _loss(self, x, out, optimizer_idx, global_step, split):
        xrec, posterior = out
        return self.loss(x, xrec, posterior, optimizer_idx, global_step, last_layer=self.get_last_layer(),
                         split=split)

    def _generator_parameters(self) -> list[torch.nn.Parameter]:
        params = [*self.encoder.parameters(), *self.decoder.parameters(), *self.quant_conv.parameters(),
                  *self.post_quant_conv.parameters()]
        if self.learn_logvar:
            params.append(self.loss.logvar)
        return params

    @torch.no_grad()
    def log_images(self, batch: dict, only_inputs: bool = False, log_ema: bool = False, **kwargs: Any) -> dict:
        """inputs, reconstructions and samples = decode(z ~ N(0, I)) (+ EMA versions)."""
        log = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            if x.shape[1] > 3:
                assert xrec.shape[1] > 3
                x, xrec = self.to_rgb(x), self.to_rgb(xrec)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            log["reconstructions"] = xrec
            if log_ema or self.use_ema:
                with self.ema_scope():
                    xrec_ema, posterior_ema = self(x)
                    if x.shape[1] > 3:
                        xrec_ema = self.to_rgb(xrec_ema)
                    log["samples_ema"] = self.decode(torch.randn_like(posterior_ema.sample()))
                    log["reconstructions_ema"] = xrec_ema
        log["inputs"] = x
        return log


class IdentityFirstStage(torch.nn.Module):
    """A first stage that does nothing (pixel-space diffusion through the LDM code path)."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any):
        # vq_interface: `quantize` returns (x, None, [None, None, None]) like a VQ model
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
