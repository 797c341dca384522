"""The callbacks configs name as `main.SetupCallback`, `main.ImageLogger`, `main.CUDACallback`:
log folders and saved configs (+ an emergency checkpoint on failure), image grids from the
model's `log_images`, and CUDA epoch time / memory reports."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ldm.training.checkpointing import save_last_checkpoint_now
from ldm.training.nan_guard import is_nonfinite_error


class SetupCallback(Callback):
    """Creates the log folders and saves the merged configs (rank 0); on an exception or Ctrl-C
    during fit, writes checkpoints/last.ckpt before Lightning re-raises."""

    def __init__(self, resume: str, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any,
                 lightning_config: Any):
        super().__init__()
        self.resume = resume  # the --resume argument ('' if none)
        self.now = now  # timestamp prefixed to the saved config files
        self.logdir = logdir
        self.ckptdir = ckptdir
        self.cfgdir = cfgdir
        self.config = config  # merged project config (model, data)
        self.lightning_config = lightning_config  # merged lightning section
        self._start_step: Optional[int] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # after a resume: the restored step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Only once this fit has trained: a failure during setup must not replace a good last.ckpt.
        # Never after a NaN/inf (the weights or the state may be bad) or a failed write (it would fail again).
        start = self._start_step
        if is_nonfinite_error(exception) or isinstance(exception, OSError):
            rank_zero_info(f"Not writing an emergency checkpoint after {type(exception).__name__}; "
                           f"the checkpoints in {self.ckptdir} are as they were.")
            return
        if trainer.global_rank == 0 and start is not None and trainer.global_step > start:
            rank_zero_info("Summoning checkpoint.")
            try:
                save_last_checkpoint_now(trainer, self.ckptdir)
            except Exception as e:  # noqa: BLE001 - the original exception is the one to see
                rank_zero_info(f"emergency checkpoint failed: {e}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(d, exist_ok=True)
        if "callbacks" in self.lightning_config and \
                "metrics_over_trainsteps_checkpoint" in self.lightning_config["callbacks"]:
            os.makedirs(os.path.join(self.ckptdir, "trainstep_checkpoints"), exist_ok=True)
        stamp = self.now
        for i in range(1, 100):  # a resume within the same second must not overwrite the first run's files
            if not os.path.exists(os.path.join(self.cfgdir, f"{stamp}-project.yaml")):
                break
            stamp = f"{self.now}.{i}"
        rank_zero_info("Project config\n%s", OmegaConf.to_yaml(self.config))
        OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{stamp}-project.yaml"))
        rank_zero_info("Lightning config\n%s", OmegaConf.to_yaml(self.lightning_config))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       os.path.join(self.cfgdir, f"{stamp}-lightning.yaml"))


class ImageLogger(Callback):
    """Every `batch_frequency` steps (and at 1, 2, 4, ... if `increase_log_steps`), saves the grids
    of `pl_module.log_images(batch)` to <logdir>/images/<split>/ and to TensorBoard.

    The cost is set by `log_images_kwargs` (for LDMs: `ddim_steps`, `N`, and which rows:
    `plot_diffusion_rows`, `plot_progressive_rows`, `plot_denoise_rows`, `inpaint`,
    `quantize_denoised`), `batch_frequency` and `max_images`. A call that takes longer than
    `progress_delay` seconds shows a progress bar of UNet evaluations; at the end of fit the
    wall time of training vs image logging is printed (`time_report`)."""

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Optional[dict] = None,
                 enable_autocast: bool = True, progress_delay: Optional[float] = 2.0):
        super().__init__()
        self.batch_freq = batch_frequency  # log every this many steps
        self.max_images = max_images  # images per grid
        self.clamp = clamp  # clamp to [-1, 1] before saving
        self.rescale = rescale  # map [-1, 1] to [0, 1]
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx  # count batches of the epoch instead of global steps
        self.log_first_step = log_first_step  # also log at step 0
        self.log_images_kwargs = dict(log_images_kwargs or {})  # passed to log_images (N, ddim_steps, ...)
        self.enable_autocast = enable_autocast  # run log_images under CUDA autocast (SD 2 configs)
        self.progress_delay = progress_delay  # seconds before a progress bar appears (None: never)
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps \
            else [self.batch_freq]
        self.logging_seconds = 0.0  # wall time spent in log_images (+ saving) during this fit
        self.logging_calls = 0
        self.unet_evals = 0  # denoiser forward calls made by log_images during this fit
        self._fit_start: Optional[float] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start, self.logging_seconds, self.logging_calls, self.unet_evals = time.perf_counter(), 0.0, 0, 0

    def time_report(self) -> str:
        total = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return (f"Wall time: {total:.1f} s fit, of which {total - self.logging_seconds:.1f} s training and "
                f"{self.logging_seconds:.1f} s image logging ({self.logging_calls} log_images calls, "
                f"{self.unet_evals} UNet evaluations)")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            rank_zero_info(self.time_report())

    def _progress(self, pl_module: pl.LightningModule, split: str) -> Any:
        """A context showing a progress bar of denoiser evaluations once a call is slow."""
        net = getattr(pl_module, "model", None)
        if self.progress_delay is None or not isinstance(net, torch.nn.Module) or pl_module.global_rank != 0:
            return nullcontext()
        return _EvalProgress(net, f"log_images ({split}, step {pl_module.global_step})", self.progress_delay, self)

    @rank_zero_only
    def log_local(self, save_dir: str, split: str, images: dict, global_step: int, current_epoch: int,
                  batch_idx: int) -> None:
        root = os.path.join(save_dir, "images", split)
        os.makedirs(root, exist_ok=True)
        for k, img in images.items():
            grid = torchvision.utils.make_grid(img, nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0  # -1,1 -> 0,1; c,h,w
            grid = (grid.clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy() * 255).astype(np.uint8)
            filename = f"{k}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(grid).save(os.path.join(root, filename))

    @rank_zero_only
    def log_tensorboard(self, pl_module: pl.LightningModule, images: dict, split: str) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger
        for logger in pl_module.loggers:
            if isinstance(logger, TensorBoardLogger):
                for k, img in images.items():
                    grid = (torchvision.utils.make_grid(img) + 1.0) / 2.0 if self.rescale \
                        else torchvision.utils.make_grid(img)
                    logger.experiment.add_image(f"{split}/{k}", grid.clamp(0, 1), global_step=pl_module.global_step)

    def log_img(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int, split: str = "train") -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not (self.check_frequency(check_idx) and callable(getattr(pl_module, "log_images", None))
                and self.max_images > 0):
            return
        modes = {m: m.training for m in pl_module.modules()}  # restored below (frozen parts stay in eval)
        pl_module.eval()
        autocast = torch.autocast("cuda") if self.enable_autocast and pl_module.device.type == "cuda" \
            else nullcontext()
        start = time.perf_counter()
        try:
            with torch.no_grad(), autocast, self._progress(pl_module, split):
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            for m, mode in modes.items():
                m.training = mode
        images = {k: v[:self.max_images].detach().float().cpu() for k, v in images.items()
                  if isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[1] in (1, 3)}
        if self.clamp:
            images = {k: v.clamp(-1.0, 1.0) for k, v in images.items()}
        save_dir = getattr(pl_module.trainer, "logdir", None) or pl_module.logger.save_dir
        self.log_local(save_dir, split, images, pl_module.global_step, pl_module.current_epoch, batch_idx)
        self.log_tensorboard(pl_module, images, split)
        self.logging_seconds += time.perf_counter() - start
        self.logging_calls += 1

    def check_frequency(self, check_idx: int) -> bool:
        if ((check_idx % self.batch_freq) == 0 or (check_idx in self.log_steps)) and \
                (check_idx > 0 or self.log_first_step):
            if self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.disabled and pl_module.global_step > 0 and not trainer.sanity_checking:
            self.log_img(pl_module, batch, batch_idx, split="val")


class _EvalProgress:
    """Counts forward calls of `net` on a tqdm bar that appears only after `delay` seconds."""

    def __init__(self, net: torch.nn.Module, desc: str, delay: float, owner: Optional["ImageLogger"] = None):
        self.net, self.desc, self.delay, self.owner = net, desc, delay, owner

    def __enter__(self) -> "_EvalProgress":
        from tqdm.auto import tqdm
        self.bar = tqdm(desc=self.desc, unit=" UNet evals", delay=self.delay, leave=False)
        self.handle = self.net.register_forward_hook(self._count)
        return self

    def _count(self, *_: Any) -> None:
        self.bar.update(1)   # returns nothing: a forward hook's return value would replace the output

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        if self.owner is not None:
            self.owner.unet_evals += self.bar.n
        self.bar.close()


class CUDACallback(Callback):
    """Reports epoch time and peak CUDA memory (averaged over ranks); does nothing off CUDA."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device.index)
            torch.cuda.synchronize(trainer.strategy.root_device.index)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type != "cuda":
            return
        torch.cuda.synchronize(trainer.strategy.root_device.index)
        max_memory = torch.cuda.max_memory_allocated(trainer.strategy.root_device.index) / 2 ** 20
        epoch_time = time.time() - self.start_time
        max_memory = trainer.strategy.reduce(max_memory)
        epoch_time = trainer.strategy.reduce(epoch_time)
        rank_zero_info(f"Average Epoch time: {epoch_time:.2f} seconds")
        rank_zero_info(f"Average Peak memory {max_memory:.2f}MiB")


class SyncFreeProgressBar(TQDMProgressBar):
    """The TQDM progress bar, also showing the training losses, the step and the LR -- values
    the diffusion models log without `prog_bar` because Lightning converts prog_bar values to
    Python numbers (a host-device sync) every step. This bar reads them only when it redraws,
    every `refresh_rate` steps:
    `lightning.callbacks.progress_bar: {target: ldm.training.callbacks.SyncFreeProgressBar,
    params: {refresh_rate: 20}}`."""

    def __init__(self, refresh_rate: int = 20, process_position: int = 0, leave: bool = False,
                 keys: tuple[str, ...] = ("train/loss_step", "train/loss_simple_step", "global_step", "lr_abs")):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.keys = tuple(keys)  # callback_metrics shown next to the bar

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        metrics = trainer.callback_metrics
        for k in self.keys:
            if k in metrics and torch.is_tensor(metrics[k]) and metrics[k].numel() == 1:
                items[k.replace("train/", "")] = f"{float(metrics[k]):.4g}"
        return items


class EMAOffload(Callback):
    """Keeps the model's EMA (`model_ema`, a LitEma) in host memory, updated asynchronously
    (`LitEma(offload=True)`): frees 4 bytes per trainable parameter of accelerator memory.
    `lightning.callbacks.ema_offload: {target: ldm.training.callbacks.EMAOffload}`."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ema = getattr(pl_module, "model_ema", None)
        if ema is not None and hasattr(ema, "set_offload"):
            ema.set_offload(True)
            rank_zero_info("EMA kept in host memory (EMAOffload)")

