"""ldm.checkpoint: strict loading with a readable report, the benign-key table, file formats."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
from torch import nn

from ldm.checkpoint import (CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError, load_into,
                            load_model_from_config, load_state_dict_file, save_safetensors)


class Tiny(nn.Module):
    """A LatentDiffusion-shaped tree: model.diffusion_model, first_stage_model, cond_stage_model."""

    def __init__(self, ema: bool = False):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
        self.first_stage_model = nn.Module()
        self.first_stage_model.encoder = nn.Linear(3, 3)
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.transformer = nn.Module()
        self.cond_stage_model.transformer.text_model = nn.Linear(2, 2)
        self.register_buffer("betas", torch.linspace(0.1, 0.2, 5))
        if ema:
            from ldm.modules.ema import LitEma
            self.model_ema = LitEma(self.model)


def shifted(sd: dict, by: float = 1.0) -> dict:
    return {k: v + by if v.is_floating_point() else v for k, v in sd.items()}


def test_strict_report_names_missing_and_unexpected_keys():
    model = Tiny()
    sd = shifted(model.state_dict())
    del sd["model.diffusion_model.0.weight"], sd["model.diffusion_model.2.bias"]
    sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_into(model, sd)
    msg = str(e.value)
    assert "missing keys (in the model, not in the checkpoint): 2" in msg
    assert "model.diffusion_model.* (2 keys): 0.weight, 2.bias" in msg
    assert "unexpected keys (in the checkpoint, not in the model): 1" in msg
    assert "first_stage_model.decoder.* (1 key): conv_out.weight" in msg
    assert torch.equal(model.betas, torch.linspace(0.1, 0.2, 5))         # nothing loaded on error
    report = load_into(model, sd, strict=False)                            # non-strict: loads what matches
    assert report.missing == ["model.diffusion_model.0.weight", "model.diffusion_model.2.bias"]
    assert torch.equal(model.betas, sd["betas"])


def test_benign_table_drops_known_keys(caplog):
    model = Tiny()
    sd = shifted(model.state_dict())
    extra = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100, dtype=torch.int),
        "model_ema.diffusion_model0weight": torch.zeros(4, 2, 3, 3),
        "first_stage_model.loss.logvar": torch.zeros(()),
    }
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        report = load_into(model, {**sd, **extra})
    assert report.ok and not report.missing and not report.unexpected
    dropped = sorted(k for ks in report.benign.values() for k in ks)
    assert dropped == sorted(extra)
    assert "position_ids" in caplog.text and "transformers <= 4.30" in caplog.text
    assert torch.equal(model.model.diffusion_model[0].weight, sd["model.diffusion_model.0.weight"])


def test_ema_keys_are_not_benign_when_the_model_has_ema():
    model = Tiny(ema=True)
    sd = model.state_dict()
    sd["model_ema.not_a_param"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="model_ema.not_a_param"):
        load_into(model, sd)


def test_wrong_shape_names_key_and_both_shapes():
    model = Tiny()
    sd = model.state_dict()
    sd["first_stage_model.encoder.weight"] = torch.zeros(5, 3)
    expected = r"first_stage_model\.encoder\.weight: checkpoint \(5, 3\) vs model \(3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        load_into(model, sd, strict=False)


@pytest.mark.parametrize("with_litema", [False, True])
def test_use_ema_swaps_in_ema_weights(with_litema):
    src = Tiny(ema=True)
    with torch.no_grad():
        for b in src.model_ema.buffers():
            if b.is_floating_point() and b.ndim:
                b.add_(3.0)
    sd = src.state_dict()
    model = Tiny(ema=with_litema)
    load_into(model, sd, use_ema=True)
    for name, p in model.model.named_parameters():
        torch.testing.assert_close(p, sd[f"model_ema.{name.replace('.', '')}"])
    plain = Tiny()
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_into(plain, Tiny().state_dict(), use_ema=True)


def test_safetensors_round_trip_with_shared_tensors(tmp_path):
    model = Tiny()
    model.tied = model.first_stage_model.encoder                    # the same weights under two names
    path = tmp_path / "w.safetensors"
    save_safetensors(model, path)
    sd = load_state_dict_file(path)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)


def test_lightning_ckpt_weights_only(tmp_path, caplog):
    model = Tiny()
    sd = shifted(model.state_dict())
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3, "optimizer_states": []}, path)
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        got = load_state_dict_file(path)
    assert "470000" in caplog.text
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_pickled_objects_need_explicit_opt_in(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": Tiny().state_dict(), "hparams": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(UnsafeCheckpointError, match="unsafe_pickle=True") as e:
        load_state_dict_file(path)
    assert str(path) in str(e.value)
    assert "betas" in load_state_dict_file(path, unsafe_pickle=True)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "models" / "ldm" / "cin256" / "model.ckpt"
    with pytest.raises(CheckpointNotFoundError, match="model.ckpt") as e:
        load_state_dict_file(path)
    assert str(path) in str(e.value) and isinstance(e.value, FileNotFoundError)


def test_load_model_from_config_fp16_weights_dtype_device(tmp_path):
    cfg = {"model": {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}}}
    ref = nn.Linear(3, 2)
    half = {k: v.half() for k, v in ref.state_dict().items()}
    path = tmp_path / "lin.safetensors"
    save_safetensors(half, path)
    model = load_model_from_config(cfg, path)
    assert model.weight.dtype == torch.float32 and not model.training
    torch.testing.assert_close(model.weight, half["weight"].float(), rtol=0, atol=0)
    model64 = load_model_from_config(cfg["model"], path, dtype=torch.float64)
    assert model64.weight.dtype == torch.float64
    with pytest.raises(CheckpointError, match="missing keys"):
        save_safetensors({"weight": half["weight"]}, tmp_path / "partial.safetensors")
        load_model_from_config(cfg, tmp_path / "partial.safetensors")


def test_loss_keys_must_match_when_the_model_has_a_loss():
    model = Tiny()
    model.loss = nn.Linear(2, 2)                                   # a training config: loss.* are real keys
    sd = model.state_dict()
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="loss.discriminator"):
        load_into(model, sd)
    del model.loss                                                 # an inference config (Identity loss)
    assert load_into(Tiny(), sd).benign


def test_lightning1_callback_state_loads_without_unpickling_code(tmp_path):
    """Released LDM checkpoints pickle callback classes and numpy scalars beside the weights:
    those load under weights_only; any other global is still refused."""
    import os

    import numpy as np
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ldm.checkpoint import UnsafeCheckpointError, load_state_dict_file

    path = tmp_path / "released.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3,
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(1.5)}}}, path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="released.ckpt"):
        load_state_dict_file(path)
