"""Non-finite guard: a NaN/inf loss or gradient never reaches the weights or a checkpoint.

`NonFiniteGuard` (a callback main.py always adds, as `lightning.callbacks.nan_guard`) looks at
every loss before its backward (`on_before_backward`: the LDM's loss and each autoencoder
optimizer's loss under manual optimisation alike) and at the gradients before each optimizer
step. On a non-finite value it either
- stops training with `NonFiniteError`, whose message names the global step, the loss terms
  logged so far in that step with their values, the optimizer and the first parameters with
  non-finite gradients, and the batch (epoch, batch index, dataset indices); the optimizer
  step is not taken and no checkpoint is written (SetupCallback's emergency save skips this
  error, and `assert_finite_weights` refuses any save from non-finite weights); or
- with `max_skips: K`, drops that optimizer step (gradients set to None, so Adam's moments
  and the weights stay as they were) and trains on, logging `train/nonfinite_skips`; the
  (K+1)-th bad step stops as above.
Under fp16 mixed precision the GradScaler already skips steps with inf gradients (that is how
it finds its scale), so there only a non-finite loss counts. `lightning.trainer.terminate_on_nan`
(Lightning 1) maps to `max_skips: 0`; `detect_anomaly` still goes to Lightning and the error it
raises is treated like the guard's (no emergency checkpoint).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training met a NaN/inf loss or gradient; nothing was saved from it."""


def is_nonfinite_error(exc: BaseException) -> bool:
    """The guard's error, or torch's anomaly-mode error for a NaN produced in backward."""
    if isinstance(exc, NonFiniteError):
        return True
    return isinstance(exc, RuntimeError) and "returned nan values" in str(exc)


def nonfinite_tensors(named: Any, limit: int = 5) -> list[str]:
    """Names of the first `limit` tensors (of (name, tensor) pairs) holding a NaN or inf."""
    names = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in names])  # one sync for all
    if bool(flags.all()):
        return []
    return [n for (n, _), ok in zip(names, flags.tolist()) if not ok][:limit]


def assert_finite_weights(state_dict: dict[str, Any], what: str) -> None:
    """Raise NonFiniteError (and write nothing) if a floating tensor of `state_dict` is non-finite."""
    bad = nonfinite_tensors(state_dict.items())
    if bad:
        raise NonFiniteError(f"not writing {what}: non-finite weights in {', '.join(bad)}; "
                             f"the checkpoints already on disk are left untouched")


class NonFiniteGuard(Callback):
    """Stops (or skips up to `max_skips` steps) on a NaN/inf loss or gradient; see the module doc."""

    def __init__(self, max_skips: int = 0, check_grads: bool = True):
        super().__init__()
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = max_skips  # bad optimizer steps dropped before stopping
        self.check_grads = check_grads  # also check gradients (one device sync per optimizer step)
        self.skipped = 0  # bad steps dropped so far (kept in checkpoints)
        self._bad_loss: Optional[str] = None  # set by on_before_backward for the next optimizer step

    # the count survives a resume
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = f"loss {float(loss.detach().float().flatten()[0]):g}"

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        reasons = []
        if self._bad_loss is not None:
            reasons.append(f"non-finite {self._bad_loss}")
        self._bad_loss = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.check_grads and scaler is None:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            grads = [(names.get(id(p), "?"), p.grad) for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            bad = nonfinite_tensors(grads)
            if bad:
                reasons.append(f"non-finite gradients in {', '.join(bad)}")
        bad_step = bool(reasons)
        if trainer.world_size > 1:  # every rank skips or stops together
            bad_step = trainer.strategy.reduce_boolean_decision(bad_step, all=False)
        if not bad_step:
            return
        message = self._describe(trainer, pl_module, optimizer, reasons or ["non-finite values on another rank"])
        if self.skipped >= self.max_skips:
            hint = "" if self.max_skips else (" To drop up to K such steps and train on, set "
                                              "lightning.callbacks.nan_guard.params.max_skips=K.")
            raise NonFiniteError(f"{message}. Training stopped before this optimizer step; no checkpoint was "
                                 f"written from it (last.ckpt and the top-k files are as they were).{hint}")
        self.skipped += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer skips parameters without gradients: weights and moments unchanged
        log.warning("%s: optimizer step skipped (%d of at most %d)", message, self.skipped, self.max_skips)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"train/nonfinite_skips": self.skipped}, step=trainer.global_step)

    # ------------------------------------------------------------------------------------
    def _describe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer,
                  reasons: list[str]) -> str:
        optimizers = trainer.optimizers
        opt_idx = next((i for i, o in enumerate(optimizers) if o is optimizer or getattr(o, "_optimizer", None)
                        is optimizer or o is getattr(optimizer, "_optimizer", None)), None)
        which = f"optimizer {opt_idx} of {len(optimizers)}" if opt_idx is not None else "an optimizer"
        terms = logged_terms(trainer)
        bad_terms = [f"{k}={v:g}" for k, v in terms.items() if not math.isfinite(v)]
        terms_s = (f"; non-finite loss terms: {', '.join(bad_terms)}" if bad_terms else
                   (f"; loss terms logged so far are finite ({', '.join(sorted(terms))})" if terms else ""))
        return (f"non-finite training step at global step {trainer.global_step} ({which}): {'; '.join(reasons)}"
                f"{terms_s}; batch: {batch_description(trainer)}")


def logged_terms(trainer: pl.Trainer) -> dict[str, float]:
    """The scalar values logged (self.log / log_dict) so far in the current training step."""
    out: dict[str, float] = {}
    results = getattr(trainer, "_results", None)
    if results is None:
        return out
    for key, metric in results.items():
        value = getattr(metric, "value", None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            name = key.split(".", 1)[-1] if "." in key else key
            out[name] = float(value.detach().float())
    return out


def batch_description(trainer: pl.Trainer) -> str:
    """'epoch E, batch B (dataset indices [...])' for a map-style loader with a seeded sampler."""
    epoch_loop = trainer.fit_loop.epoch_loop
    batch_idx = epoch_loop.batch_progress.current.ready - 1
    text = f"epoch {trainer.current_epoch}, batch {batch_idx} of the epoch"
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = getattr(loader, "flattened", None) or []
    sampler = getattr(loaders[0], "sampler", None) if loaders else None
    batch_size = getattr(loaders[0], "batch_size", None) if loaders else None
    from torch.utils.data import DistributedSampler
    if isinstance(sampler, DistributedSampler) and batch_size:
        order = list(DistributedSampler.__iter__(sampler))  # the epoch's full order, resume skipping aside
        text += f" (dataset indices {order[batch_idx * batch_size:(batch_idx + 1) * batch_size]})"
    return text
