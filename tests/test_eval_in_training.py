"""EvalCallback: a tiny class-conditional LDM trained for a few steps logs fixed-seed metrics
and a sample grid to TensorBoard at the configured steps, within its stated cost."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ldm.training.eval_callback import EvalCallback  # noqa: E402

TINY_CLIP = dict(embed_dim=16, vision_cfg=dict(layers=1, width=16, patch_size=8, image_size=32, head_width=8),
                 text_cfg=dict(context_length=8, vocab_size=49408, width=16, heads=2, layers=1))


class Colours(torch.utils.data.Dataset):
    def __init__(self, n=16):
        rs = np.random.RandomState(0)
        self.img = (rs.rand(n, 1, 1, 3) * 2 - 1).astype(np.float32).repeat(32, 1).repeat(32, 2)
        self.lab = rs.randint(0, 4, n)

    def __len__(self):
        return len(self.img)

    def __getitem__(self, i):
        return {"image": self.img[i], "class_label": int(self.lab[i])}


class DM(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.datasets = {"train": Colours(), "validation": Colours(8)}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.datasets["train"], batch_size=4)


def test_eval_callback_logs_metrics_over_steps(tmp_path):
    from make_tiny_checkpoint import make_tiny
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ldm.util import instantiate_from_config
    cfg_path = make_tiny(ROOT / "configs/ldm/cin256.yaml", [tmp_path / "m.safetensors"],
                         overrides=["model.params.cond_stage_config.params.n_classes=5",
                                    "model.params.cond_stage_config.params.key=class_label",
                                    "model.params.cond_stage_key=class_label",
                                    "model.params.first_stage_config.params.ddconfig.resolution=32"],
                         config_out=tmp_path / "m.yaml")
    cfg = OmegaConf.load(cfg_path)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-4
    with pytest.raises(ValueError, match="unknown metric"):
        EvalCallback(metrics=["fid", "nope"])
    # (FID / KID / FD-DINOv2 run the same code path on other networks; the quickstart overlay
    # configs/eval/in_training_digits.yaml exercises them)
    cb = EvalCallback(every_n_steps=2, n_samples=4, metrics=["cmmd"], ddim_steps=3, guidance_scale=2.0,
                      n_reference=8, batch_size=4, random_weights=True, clip_arch=TINY_CLIP, n_classes=4)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=4, logger=logger, callbacks=[cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=DM())
    assert [h["step"] for h in cb.history] == [2, 4]
    ev = EventAccumulator(logger.log_dir)
    ev.Reload()
    cm = [(e.step, e.value) for e in ev.Scalars("eval/cmmd")]
    cost = [e.value for e in ev.Scalars("eval/seconds")]
    print("EVAL tiny cin: cmmd over steps", cm, "seconds per call", cost)
    assert [s for s, _ in cm] == [2, 4] and all(np.isfinite(v) and v > 0 for _, v in cm)
    assert any(t.startswith("eval/cost") for t in ev.Tags()["tensors"])
    assert "eval/samples" in ev.Tags()["images"]
    # the same seeds every call: sampling twice with the same weights gives the same images
    model.eval()   # (training mode drops class labels: ucg_rate)
    a = cb.sample(model, torch.arange(4))
    b = cb.sample(model, torch.arange(4))
    assert np.array_equal(a, b)
