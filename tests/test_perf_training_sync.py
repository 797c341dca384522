"""No host-device synchronisation per step in the LatentDiffusion training step.

A full Lightning fit (EMA, `scale_by_std`, a LambdaLR schedule, loss-dict / lr / global-step
logging with prog_bar, a logger) runs on CPU under a dispatch mode that emulates
`torch.cuda.set_sync_debug_mode("error")`: it records every op that makes the host wait for
the device on a GPU -- reading a value (`.item()`, `float(t)`, `if t:` all end in
`aten._local_scalar_dense`), data-dependent shapes (`nonzero`, `masked_select`, `unique`),
and creating a device tensor from host data (`torch.tensor(x, device=...)`: a pageable
host-to-device copy, which blocks). Reads of tensors the optimizer keeps on the host by design
(torch.optim's step counters) are not syncs and are excluded. Each step after the first two
(step 0 sets scale_factor once) must record nothing; logging flushes every
`log_every_n_steps` and the progress bar every `refresh_rate` steps are the only places that
read values, and they are set beyond this run's length here.
"""
from __future__ import annotations

import traceback

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT
from ldm.training.callbacks import SyncFreeProgressBar
from ldm.util import instantiate_from_config

torch.set_num_threads(1)

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh")


class SyncCounter(TorchDispatchMode):
    """Records ops that would synchronise host and device (see module doc) while `active`."""

    def __init__(self) -> None:
        super().__init__()
        self._tensor = torch.tensor
        self.active = False
        self.counted_ops = 0
        self.step = -1
        self.hits: list[tuple[int, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counted_ops += self.active
        if self.active and any(s in func.__name__ for s in SYNC_OPS):
            stack = traceback.extract_stack()[:-1]
            host_only = ("torch/optim/", "torch/utils/data/")   # optimizer step counters, collate
            if not any(h in f.filename for f in stack for h in host_only):
                outside = [f for f in stack if "/torch/" not in f.filename and "apply_func" not in f.filename]
                where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in outside[::-1][:3])
                self.hits.append((self.step, func.__name__, where))
        return func(*args, **(kwargs or {}))

    def host_data_to_device(self, data, *args, **kwargs):
        """torch.tensor(<Python data>, device=...): on a GPU a blocking host-to-device copy."""
        if self.active and kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
            stack = traceback.extract_stack()[:-1]
            self.hits.append((self.step, "torch.tensor(host data, device=...)",
                              f"{stack[-1].filename.split('/')[-1]}:{stack[-1].lineno} {stack[-1].line}"))
        return self._tensor(data, *args, **kwargs)


class CountSteps(Callback):
    """Counts from the start of step `first` to the start of step `stop` (whole steps: forward,
    backward, optimizer and scheduler step, EMA, logging; not the epoch-end flush)."""

    def __init__(self, counter: SyncCounter, first: int, stop: int):
        self.counter, self.first, self.stop = counter, first, stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.step = trainer.global_step
        self.counter.active = self.first <= trainer.global_step < self.stop

    def on_train_end(self, trainer, pl_module):
        self.counter.active = False


class Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(32, 32, 3, generator=g) * 2 - 1, "class_label": i % 10}


def tiny_digits_ldm():
    cfg = OmegaConf.load(ROOT / "configs" / "quickstart" / "ldm_digits.yaml").model
    cfg.params.unet_config.params.model_channels = 32
    cfg.params.unet_config.params.num_head_channels = 16
    cfg.params.scheduler_config = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                                   "params": {"warm_up_steps": [3], "cycle_lengths": [10 ** 9],
                                              "f_start": [1e-6], "f_max": [1.0], "f_min": [1.0]}}
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    model.learning_rate = 1e-4
    return model


def test_training_steps_make_no_host_device_sync(tmp_path, monkeypatch):
    model = tiny_digits_ldm()
    assert model.use_ema and model.scale_by_std and model.use_scheduler
    counter = SyncCounter()
    bar = SyncFreeProgressBar(refresh_rate=100)
    steps, first = 6, 2
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                         log_every_n_steps=100, callbacks=[CountSteps(counter, first, steps - 1), bar],
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_model_summary=False)
    loader = torch.utils.data.DataLoader(Images(), batch_size=4)
    ema_before = model.model_ema.num_updates.clone()
    monkeypatch.setattr(torch, "tensor", counter.host_data_to_device)
    with counter:
        trainer.fit(model, loader)
    assert trainer.global_step == steps
    assert int(model.model_ema.num_updates) == int(ema_before) + steps      # the EMA did run every step
    assert float(model.scale_factor) != 1.0                                 # scale_by_std did run
    assert counter.hits == [], "host-device syncs per step:\n" + "\n".join(map(str, counter.hits))
    assert counter.counted_ops > 1000
    shown = bar.get_metrics(trainer, model)                # what the bar shows when it redraws
    assert {"loss_step", "loss_simple_step", "global_step", "lr_abs"} <= set(shown)
    assert float(shown["global_step"]) == steps - 1          # the counter did watch those steps


def test_the_counter_sees_the_syncs_it_should(monkeypatch):
    counter = SyncCounter()
    counter.active = True
    x = torch.randn(4)
    monkeypatch.setattr(torch, "tensor", counter.host_data_to_device)
    with counter:
        torch.tensor(2.0, device=x.device)
        x.sum().item()
        bool(x[0] > 0)
        float(x.max())
        torch.nonzero(x > 0)
        torch.tensor(1.5, device=x.device)
        torch.full((), 1.5)                 # a fill kernel: no copy, no sync
        x.add_(1.0)
    assert [h[1].split(".")[0] for h in counter.hits] == \
        ["torch", "lift_fresh"] + ["_local_scalar_dense"] * 3 + ["nonzero", "torch", "lift_fresh"]
