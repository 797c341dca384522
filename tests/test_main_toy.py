"""A toy LightningModule and dataset for testing main.py without the real models, plus fast
unit tests of main.py's helpers (argument parsing, trainer-kwargs translation, lr scaling,
atomic checkpoints, the resumable sampler)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Toy pieces (configs name them as `test_main_toy.*`)
# ----------------------------------------------------------------------------------------
class ToyImages(Dataset):
    """`n` fixed random 4x4 RGB images in [-1, 1] with labels."""

    def __init__(self, n: int = 20, size: int = 4, seed: int = 0, nan_index: int = -1):
        g = torch.Generator().manual_seed(seed)
        self.x = (torch.rand(n, size, size, 3, generator=g) * 2 - 1).numpy()
        self.y = torch.randint(0, 10, (n,), generator=g).numpy()
        if nan_index >= 0:  # a corrupt sample: its loss is NaN
            self.x[nan_index, 0, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "class_label": int(self.y[i])}


class ToyModel(pl.LightningModule):
    """A noisy linear autoencoder: Adam + a warm-up LR schedule + an EMA buffer, so that resuming
    must restore optimizer, scheduler, buffers and RNG state to match an uninterrupted run."""

    def __init__(self, dim: int = 48, hidden: int = 8, monitor: str | None = None, fail_at_step: int = -1,
                 signal_at_step: int = -1, stop_at_step: int = -1, nan_at_step: int = -1,
                 step_sleep: float = 0.0):
        super().__init__()
        self.enc = torch.nn.Linear(dim, hidden)
        self.dec = torch.nn.Linear(hidden, dim)
        self.register_buffer("ema_w", torch.zeros(hidden, dim))
        self.learning_rate = 1e-3
        self.fail_at_step = fail_at_step  # raise in training_step at this global step
        self.signal_at_step = signal_at_step  # send ourselves SIGUSR1 in training_step at this global step
        self.stop_at_step = stop_at_step  # set trainer.should_stop (as max_time / EarlyStopping do) at this step
        self.nan_at_step = nan_at_step  # the loss of this global step is NaN
        self.step_sleep = step_sleep  # seconds slept per step (spreads fault-injection kill times over training)
        if monitor:
            self.monitor = monitor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x) + 0.1 * torch.randn(x.shape[0], self.enc.out_features))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.step_sleep:
            import time
            time.sleep(self.step_sleep)
        if self.global_step == self.fail_at_step:
            raise RuntimeError("toy failure")
        if self.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.global_step == self.stop_at_step:
            self.trainer.should_stop = True
        x = batch["image"].flatten(1)
        loss = torch.nn.functional.mse_loss(self(x), x)
        if self.global_step == self.nan_at_step:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        self._losses = getattr(self, "_losses", []) + [(self.global_step, float(loss.detach()))]
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"].flatten(1)
        self.log("val/loss", torch.nn.functional.mse_loss(self.dec(self.enc(x)), x))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema_w.mul_(0.9).add_(0.1 * self.enc.weight.detach())
        logdir = getattr(self.trainer, "logdir", None)
        if logdir:
            with open(os.path.join(logdir, f"batches_rank{self.trainer.global_rank}.txt"), "a") as f:
                f.write(" ".join(f"{v:.6f}" for v in batch["image"][:, 0, 0, 0].tolist()) + "\n")
        if logdir and self.trainer.global_rank == 0:
            with open(os.path.join(logdir, "losses.jsonl"), "a") as f:
                step, loss = self._losses[-1]
                f.write(json.dumps({"step": step, "loss": loss, "epoch": self.current_epoch,
                                    "x0": float(batch["image"].flatten()[0])}) + "\n")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        logdir = getattr(self.trainer, "logdir", None)
        if logdir and self.trainer.global_rank == 0:
            with open(os.path.join(logdir, "saves.txt"), "a") as f:
                f.write(f"{self.global_step}\n")

    def on_train_end(self) -> None:
        logdir = getattr(self.trainer, "logdir", None)
        if logdir:
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().numpy().tobytes())
            Path(logdir, f"hash_rank{self.trainer.global_rank}.txt").write_text(h.hexdigest())

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    @torch.no_grad()
    def log_images(self, batch: dict, split: str = "train", **kwargs) -> dict:
        x = batch["image"].permute(0, 3, 1, 2)
        rec = self.dec(self.enc(x.flatten(1))).view_as(x)
        return {"inputs": x, "reconstructions": rec}


def toy_config(tmp_path: Path, train: dict | None = None, **overrides) -> Path:
    """A complete config for the toy model, merged with `overrides` (and the train dataset config
    replaced by `train`), written to tmp_path/toy.yaml."""
    cfg = OmegaConf.create({
        "model": {"base_learning_rate": 1.0e-4, "target": "test_main_toy.ToyModel", "params": {}},
        "data": {"target": "main.DataModuleFromConfig",
                 "params": {"batch_size": 4, "num_workers": 0,
                            "train": {"target": "test_main_toy.ToyImages", "params": {"n": 20}},
                            "validation": {"target": "test_main_toy.ToyImages", "params": {"n": 8, "seed": 1}}}},
        "lightning": {"trainer": {"max_steps": 6, "enable_progress_bar": False, "enable_model_summary": False,
                                  "num_sanity_val_steps": 0, "log_every_n_steps": 1, "check_val_every_n_epoch": 100},
                      "callbacks": {"image_logger": {"target": "main.ImageLogger",
                                                     "params": {"batch_frequency": 2, "max_images": 4}}}},
    })
    cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    if train is not None:
        cfg.data.params.train = train
    path = tmp_path / "toy.yaml"
    OmegaConf.save(cfg, path)
    return path


# ----------------------------------------------------------------------------------------
# Unit tests of the helpers
# ----------------------------------------------------------------------------------------
def test_parse_args_keeps_overrides_out_of_flags() -> None:
    import main
    opt, over = main.parse_args(["--base", "a.yaml", "b.yaml", "x.y=1", "-t", "model.z=2", "--scale_lr", "false"])
    assert opt.base == ["a.yaml", "b.yaml"] and opt.train is True and opt.scale_lr is False
    assert over == ["x.y=1", "model.z=2"]


def test_trainer_kwargs_translation() -> None:
    from ldm.training import trainer_kwargs_from_config
    kw, resume = trainer_kwargs_from_config(
        {"gpus": "0,1", "benchmark": True, "accumulate_grad_batches": 2, "max_epochs": 3, "precision": 16,
         "num_nodes": 2, "accelerator": "ddp", "resume_from_checkpoint": "x.ckpt", "max_steps": None})
    assert kw == {"accelerator": "gpu", "devices": [0, 1], "benchmark": True, "accumulate_grad_batches": 2,
                  "max_epochs": 3, "precision": "16-mixed", "num_nodes": 2, "strategy": "ddp", "max_steps": -1}
    assert resume == "x.ckpt"
    assert trainer_kwargs_from_config({"precision": "bf16", "strategy": "fsdp"})[0] == \
        {"precision": "bf16-mixed", "strategy": "fsdp", "accelerator": "cpu"}
    assert trainer_kwargs_from_config({"gpus": 0})[0] == {"accelerator": "cpu"}  # Lightning 1: 0 GPUs = CPU
    assert trainer_kwargs_from_config({"gpus": "0,"})[0] == {"accelerator": "gpu", "devices": [0]}
    assert trainer_kwargs_from_config({"gpus": 2})[0] == {"accelerator": "gpu", "devices": 2}
    assert trainer_kwargs_from_config({}, gpus="0")[0] == {"accelerator": "gpu", "devices": [0]}  # --gpus 0 = GPU 0
    kw, _ = trainer_kwargs_from_config({"devices": 2, "accelerator": "cpu"}, find_unused_parameters=True)
    assert kw["strategy"] == "ddp_find_unused_parameters_true"


def test_trainer_kwargs_unknown_key_names_it_and_the_file() -> None:
    from ldm.training import trainer_kwargs_from_config
    from ldm.util import ConfigError, config_source
    with config_source("configs/x.yaml"), pytest.raises(ConfigError) as e:
        trainer_kwargs_from_config({"max_step": 10})
    msg = str(e.value)
    assert "max_step" in msg and "max_steps" in msg and "configs/x.yaml" in msg


def test_scaled_learning_rate_formula() -> None:
    from ldm.training import scaled_learning_rate
    lr, how = scaled_learning_rate(1e-4, 8, 2, 3, True)
    assert lr == pytest.approx(3 * 2 * 8 * 1e-4)
    assert "3 (accumulate_grad_batches)" in how and "2 (num_devices)" in how and "8 (batchsize)" in how
    assert scaled_learning_rate(1e-4, 8, 2, 3, False)[0] == 1e-4


def test_atomic_checkpoint_io_never_leaves_partial_file(tmp_path: Path, monkeypatch) -> None:
    from pytorch_lightning.plugins.io import TorchCheckpointIO
    from ldm.training import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.arange(3)}, target)
    assert torch.equal(torch.load(target)["a"], torch.arange(3))

    def broken(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", broken)
    with pytest.raises(OSError):
        io.save_checkpoint({"a": torch.arange(5)}, target)
    assert torch.equal(torch.load(target)["a"], torch.arange(3))  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # temp file removed


def test_resumable_sampler_order_depends_on_seed_and_epoch_only() -> None:
    from ldm.data.base import ResumableDataLoader, ResumableSampler
    ds = ToyImages(n=10)
    s = ResumableSampler(ds, seed=5)
    s.set_epoch(3)
    full = list(s)
    s2 = ResumableSampler(ds, seed=5)
    s2.set_epoch(3)
    assert list(s2) == full and full != list(range(10))
    loader = ResumableDataLoader(ds, batch_size=3, sampler=ResumableSampler(ds, seed=5))
    loader.load_state_dict({"epoch": 3, "batches_done": 2})
    assert list(loader.sampler) == full[6:]  # resumes after 2 batches of 3
    assert list(loader.sampler) == full  # only once
    loader.load_state_dict({"epoch": 3, "batches_done": 4})  # epoch was complete: next one from its start
    s.set_epoch(4)
    assert list(loader.sampler) == list(s)
    # two ranks split one permutation
    r0, r1 = (list(ResumableSampler(ds, num_replicas=2, rank=r, seed=5)) for r in (0, 1))
    assert sorted(r0 + r1) == list(range(10))


def test_every_released_lightning_section_builds_a_trainer(tmp_path: Path) -> None:
    """The lightning sections of the original configs (Lightning 1 keys, SD 2's callbacks and
    strategy-less DDP flags) translate into a Lightning 2 Trainer with our callbacks."""
    from conftest import reference_or_skip
    import main
    from ldm import training

    ref = reference_or_skip()
    paths = [p for p in sorted((ref / "configs").rglob("*.yaml")) if "lightning" in OmegaConf.load(p)]
    assert len(paths) >= 10
    for p in paths:
        opt, _ = main.parse_args(["-b", str(p), "-t"])
        run = training.resolve_run_dirs("2000-01-01T00-00-00", base=(str(p),), logdir=str(tmp_path))
        config, lightning_config, sources = training.load_configs([str(p)], [])
        model = pl.LightningModule()
        model.monitor = "val/loss"
        trainer, _ = main.build_trainer(opt, run, "now", config, lightning_config, sources, model)
        names = {type(c).__name__ for c in trainer.callbacks}
        assert {"SetupCallback", "ImageLogger", "LDMModelCheckpoint", "RNGStateCallback"} <= names, p
        assert isinstance(trainer.strategy.checkpoint_io, training.AtomicCheckpointIO), p
        ckpt = next(c for c in trainer.callbacks if type(c).__name__ == "LDMModelCheckpoint")
        assert ckpt.monitor == "val/loss" and ckpt.save_top_k == 3 and ckpt.save_last, p


def test_image_logger_frequency_grids_and_module_modes(tmp_path: Path) -> None:
    from types import SimpleNamespace
    import main
    model = ToyModel()
    model.frozen = torch.nn.Dropout()
    model.train()
    model.frozen.eval()  # e.g. a frozen first stage or LPIPS: must stay in eval mode after logging
    model._trainer = SimpleNamespace(logdir=str(tmp_path), global_step=4, current_epoch=1, loggers=[], logger=None)
    logger = main.ImageLogger(batch_frequency=8, max_images=2)
    assert logger.log_steps == [1, 2, 4, 8]
    fresh = main.ImageLogger(8, 2)
    assert [s for s in range(0, 20) if fresh.check_frequency(s)] == [1, 2, 4, 8, 16]  # not step 0
    batch = {"image": ToyImages(n=4).x[:3].copy()}
    batch["image"] = torch.from_numpy(batch["image"])
    logger.log_img(model, batch, batch_idx=7, split="train")
    files = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    assert files == ["inputs_gs-000004_e-000001_b-000007.png", "reconstructions_gs-000004_e-000001_b-000007.png"]
    from PIL import Image
    assert Image.open(tmp_path / "images" / "train" / files[0]).size == (2 * 4 + 3 * 2, 4 + 2 * 2)  # 2 images
    assert model.training and model.enc.training and not model.frozen.training


def test_logger_defaults_tensorboard_else_csv(monkeypatch) -> None:
    from ldm.training import config as tc
    empty = OmegaConf.create({})
    assert tc.logger_config(empty, "logs/x", "x").target == "pytorch_lightning.loggers.TensorBoardLogger"
    monkeypatch.setattr(tc, "tensorboard_available", lambda: False)
    cfg = tc.logger_config(empty, "logs/x", "x")
    assert cfg.target == "pytorch_lightning.loggers.CSVLogger" and cfg.params.save_dir == "logs/x"
    # a config's logger section is merged over the default; Lightning-1 / `lightning.pytorch` targets map to ours
    user = OmegaConf.create({"logger": {"target": "lightning.pytorch.loggers.CSVLogger", "params": {"name": "n"}}})
    cfg = tc.logger_config(user, "logs/x", "x")
    assert cfg.target == "pytorch_lightning.loggers.CSVLogger" and cfg.params.name == "n"
