"""Crash-safe checkpointing for main.py: atomic writes, `last.ckpt` at the final step and on
request (SIGUSR1), an emergency save on failure, and RNG state carried through a resume, so
that an interrupted run continues exactly as an uninterrupted one would have."""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm.training.nan_guard import assert_finite_weights


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place, so a
    crash mid-write never leaves a truncated `last.ckpt`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        if isinstance(checkpoint.get("state_dict"), dict):
            assert_finite_weights(checkpoint["state_dict"], path)  # never a checkpoint of NaN weights
        folder = os.path.dirname(path) or "."
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=folder)
            os.close(fd)
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            _unlink_quietly(tmp)
            kept = (f"the previous {os.path.basename(path)} is intact" if os.path.exists(path)
                    else "nothing was written")
            raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e} ({kept}; free space or "
                                   f"fix permissions of {folder}, then resume with -r)") from e
        except BaseException:
            _unlink_quietly(tmp)
            raise


TMP_SUFFIX = ".tmp"  # AtomicCheckpointIO's temporary files: .<name>.<random>.tmp beside the target


def _unlink_quietly(path: Optional[str]) -> None:
    if path and os.path.exists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def remove_stale_tmp_files(folder: str) -> list[str]:
    """Delete temporary files interrupted saves left under `folder` (a killed run's); returns them."""
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                path = os.path.join(root, name)
                _unlink_quietly(path)
                removed.append(path)
    if removed:
        rank_zero_info(f"removed {len(removed)} temporary file(s) of an interrupted save: "
                       + ", ".join(sorted(removed)))
    return removed


class LDMModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that
    - saves step-triggered checkpoints after the LightningModule's own `on_train_batch_end`
      (where LatentDiffusion updates its EMA), not before it as Lightning orders callback hooks,
      so a resumed run does not miss that step's EMA update;
    - also writes `last.ckpt` at the final optimizer step (a run stopped by `max_steps`, `max_time`
      or another `should_stop` resumes mid-epoch exactly, not from an end-of-epoch state), after
      `request_save()` (SIGUSR1), and at the end of training if the last save is older;
    - always names it `last.ckpt` (no `last-v1.ckpt` when resuming into the same folder)."""

    save_requested = False  # set by the signal handler; read at the next batch end
    training_active = False  # between on_train_start and on_train_end: a requested save will happen

    @classmethod
    def request_save(cls, *_: Any) -> None:
        cls.save_requested = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        LDMModelCheckpoint.training_active = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        hooks = after_module_train_batch_end(pl_module)
        if self._after_batch_end not in hooks:
            hooks.append(self._after_batch_end)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        hooks = after_module_train_batch_end(pl_module)
        if self._after_batch_end in hooks:
            hooks.remove(self._after_batch_end)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        pass  # deferred to _after_batch_end, see the class docstring

    def _after_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                         batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop
        requested = LDMModelCheckpoint.save_requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if (final or requested) and not self._should_skip_saving_checkpoint(trainer):
            if requested:
                rank_zero_info("Summoning checkpoint.")
            LDMModelCheckpoint.save_requested = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer), force=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        LDMModelCheckpoint.training_active = False
        LDMModelCheckpoint.save_requested = False
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer), force=True)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any],
                              force: bool = False) -> None:
        if not (self.save_last or force) or self.dirpath is None:
            return
        self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self._save_checkpoint(trainer, self.last_model_path)


def _on_sigusr1(signum: int, frame: Any) -> None:
    """SIGUSR1: save last.ckpt after the current training step, or (not training) say it is ignored."""
    if LDMModelCheckpoint.training_active:
        LDMModelCheckpoint.request_save()
        msg = "SIGUSR1: last.ckpt will be written after the current training step\n"
    else:
        msg = "SIGUSR1 received while not training: nothing to save, ignored\n"
    try:
        os.write(2, msg.encode())
    except OSError:
        pass


def install_sigusr1_handler() -> None:
    """Install the SIGUSR1 handler (main thread only; elsewhere a no-op)."""
    import signal
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        signal.signal(signal.SIGUSR1, _on_sigusr1)
    except ValueError:  # not the main thread
        pass


def after_module_train_batch_end(pl_module: pl.LightningModule) -> list:
    """Functions called right after `pl_module.on_train_batch_end` (Lightning calls every
    callback's hook before the module's). Installed once per module instance."""
    hooks = pl_module.__dict__.get("_after_train_batch_end")
    if hooks is None:
        hooks = []
        module_hook = pl_module.on_train_batch_end

        def on_train_batch_end(outputs: Any, batch: Any, batch_idx: int) -> None:
            module_hook(outputs, batch, batch_idx)
            for fn in list(hooks):
                fn(pl_module.trainer, pl_module, outputs, batch, batch_idx)

        pl_module.__dict__["on_train_batch_end"] = on_train_batch_end
        pl_module.__dict__["_after_train_batch_end"] = hooks
    return hooks


def save_last_checkpoint_now(trainer: pl.Trainer, ckptdir: str) -> Optional[str]:
    """Write `<ckptdir>/last.ckpt` from rank 0 without a collective (safe from an exception or a
    signal handler, where other ranks may not follow). Sharded strategies cannot do that: skipped."""
    from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

    if trainer.global_rank != 0:
        return None
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        rank_zero_warn(f"not saving an emergency checkpoint with {type(trainer.strategy).__name__}")
        return None
    path = os.path.join(ckptdir, "last.ckpt")
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
    return path


class RNGStateCallback(Callback):
    """Saves the torch / numpy / python RNG states with each checkpoint and puts them back just
    before the first training batch after resuming, so a resumed run draws the same noise as an
    uninterrupted one. (All ranks draw alike: every rank is seeded with the same seed.)"""

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        # numpy's state as a tensor and ints: checkpoints must load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        npst = state["numpy"]
        np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
