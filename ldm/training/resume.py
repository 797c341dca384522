"""Resuming a main.py run: what `-r` accepts, what it checks before Lightning restores, and how a
changed optimizer setting is handled.

- `-r <logdir>` (or `-r <logdir>/checkpoints/<file>.ckpt`) continues *training* (it implies
  `-t`; pass `-t false` to only test). `lightning.trainer.resume_from_checkpoint=<ckpt>` with
  `-n` resumes a run's full state into a new log folder.
- `check_resume_checkpoint` reads the file first: a truncated / corrupt file is named; a
  weights-only file (a released checkpoint, no optimizer or loop state) is refused in one line
  that says to use `model.params.ckpt_path=` (or `--finetune_from`); keys or shapes that do not
  match the model give ldm.checkpoint's missing / unexpected / shape report.
- `ResumedOptimizerSettings`: the optimizer and LR settings the config gives now are applied
  over the restored ones (with one line per change), so a changed `base_learning_rate`,
  `--scale_lr` or beta takes effect instead of being printed and then overwritten by the
  checkpoint's optimizer state. Unchanged settings leave the restored state bit-identical.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from ldm.checkpoint import BENIGN_KEYS, CheckpointError, describe_keys, read_checkpoint, rename_released_layout

log = logging.getLogger(__name__)


class ResumeError(CheckpointError):
    """The checkpoint given to resume cannot be resumed (weights only, not from a main.py run)."""


def weights_instead(path: str) -> str:
    return (f"to start a new run from its weights, use model.params.ckpt_path={path} "
            f"(or --finetune_from {path}) instead of -r / resume_from_checkpoint")


def check_resume_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Raise a one-line ResumeError or a CheckpointError report unless `path` is a full training
    checkpoint whose weights match `model` exactly (keys and shapes)."""
    ckpt = read_checkpoint(path)  # names truncated / corrupt / unsafe files
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ResumeError(f"cannot resume from '{path}': not a Lightning checkpoint (no state_dict); "
                          + weights_instead(path))
    missing_state = [k for k in ("optimizer_states", "loops") if k not in ckpt]
    if missing_state:
        raise ResumeError(f"cannot resume from '{path}': it holds weights only (no {' / '.join(missing_state)}, "
                          f"e.g. a released checkpoint); " + weights_instead(path))
    own = model.state_dict()
    # released key layouts (e.g. a transformers < 5 text encoder) are renamed by on_load_checkpoint too
    sd, _ = rename_released_layout(own, ckpt["state_dict"])
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    benign = [k for k in unexpected if any(b.matches(k, "unexpected", own) for b in BENIGN_KEYS)] + \
        [k for k in missing if any(b.matches(k, "missing", own) for b in BENIGN_KEYS)]
    shapes = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    if (missing or unexpected) and len(benign) == len(missing) + len(unexpected) and not shapes:
        if getattr(model, "adapts_checkpoint_layout", False):
            return   # its on_load_checkpoint drops the known-benign keys before Lightning's strict load
        raise ResumeError(f"cannot resume from '{path}': its keys differ from {type(model).__name__} only in "
                          f"known-benign ones ({', '.join(benign[:3])}{', ...' if len(benign) > 3 else ''}), as a "
                          f"released checkpoint's do; " + weights_instead(path))
    parts = []
    if missing:
        parts.append(f"missing keys (in the model, not in the checkpoint): {len(missing)}\n" + describe_keys(missing))
    if unexpected:
        parts.append(f"unexpected keys (in the checkpoint, not in the model): {len(unexpected)}\n"
                     + describe_keys(unexpected))
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es):\n" + "\n".join(shapes))
    if parts:
        raise CheckpointError(f"cannot resume from '{path}': it does not match {type(model).__name__} of this "
                              f"config (was the config changed?):\n" + "\n".join(parts))


# ----------------------------------------------------------------------------------------
# Optimizer settings given now vs restored
# ----------------------------------------------------------------------------------------
_SKIP = ("params", "lr", "initial_lr")


def _settings(optimizers: list) -> list[list[dict[str, Any]]]:
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


class ResumedOptimizerSettings(Callback):
    """After a resume restores the optimizers, put back the settings this run's config gives
    (learning rate, betas, weight decay, ...) where they differ, with a message per change."""

    def __init__(self) -> None:
        self._fresh: Optional[list[list[dict[str, Any]]]] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # called after configure_optimizers, before Lightning restores the optimizer states
        self._fresh = _settings(trainer.optimizers) if trainer.ckpt_path else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fresh, self._fresh = self._fresh, None
        if fresh is None:
            return
        restored = _settings(trainer.optimizers)
        if [len(o) for o in fresh] != [len(o) for o in restored]:
            return  # a different parameter grouping: Lightning has already refused or adapted
        for i, (opt, f_groups, r_groups) in enumerate(zip(trainer.optimizers, fresh, restored)):
            for j, (f, r) in enumerate(zip(f_groups, r_groups)):
                group = opt.param_groups[j]
                base_f, base_r = f.get("initial_lr", f.get("lr")), r.get("initial_lr", r.get("lr"))
                if base_f is not None and base_r is not None and not _same(base_f, base_r):
                    self._apply_lr(trainer, opt, j, group, float(base_r), float(base_f))
                    rank_zero_info(f"resume: optimizer {i} group {j}: learning rate {base_r:.3e} (checkpoint) -> "
                                   f"{base_f:.3e} (this config); applied")
                for k, v in f.items():
                    if k in _SKIP or k not in r or _same(v, r[k]):
                        continue
                    group[k] = v
                    rank_zero_info(f"resume: optimizer {i} group {j}: {k} {r[k]} (checkpoint) -> {v} "
                                   f"(this config); applied")

    @staticmethod
    def _apply_lr(trainer: pl.Trainer, opt: torch.optim.Optimizer, j: int, group: dict, old: float,
                  new: float) -> None:
        """Scale the group's current (scheduled) lr and its schedulers' base lr by new / old."""
        ratio = new / old if old else 1.0
        if "initial_lr" in group:
            group["initial_lr"] = new
        group["lr"] = group["lr"] * ratio if old else new
        for cfg in trainer.lr_scheduler_configs:
            sched = cfg.scheduler
            if getattr(sched, "optimizer", None) is not opt:
                continue
            if hasattr(sched, "base_lrs") and j < len(sched.base_lrs):
                sched.base_lrs[j] = new
            last = getattr(sched, "_last_lr", None)
            if last is not None and j < len(last):
                last[j] = group["lr"]
