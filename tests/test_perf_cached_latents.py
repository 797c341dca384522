"""Cached first-stage latents: the cache format, scripts/cache_latents.py, and LatentDiffusion
training on them giving exactly the on-the-fly loss (same random draws, no encoder call)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, reference_or_skip
from ldm import perf
from ldm.data.cached_latents import CachedLatents, shard_name, write_index, write_shard
from ldm.util import instantiate_from_config

torch.set_num_threads(1)


def tiny_ldm():
    """The golden ldm_crossattn model: KL first stage, class-conditional cross-attention."""
    ref = reference_or_skip()
    cfg = OmegaConf.load(ref / "golden" / "_models" / "ldm_crossattn" / "config.yaml").model
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


def test_cached_latents_give_the_on_the_fly_loss():
    model = tiny_ldm().train()
    images = torch.rand(3, 8, 8, 3) * 2 - 1
    labels = torch.tensor([1, 4, 7])
    with torch.no_grad():
        posterior = model.encode_first_stage(images.permute(0, 3, 1, 2).contiguous())
    cached = {perf.LATENT_KEY: posterior.mean.clone(), perf.LATENT_LOGVAR_KEY: posterior.logvar.clone(),
              "class_label": labels}
    losses = []
    for batch in ({"image": images, "class_label": labels}, cached):
        torch.manual_seed(123)
        z, c = model.get_input(batch, "image")
        loss, _ = model(z, c)
        losses.append((z, loss))
    (z_fly, loss_fly), (z_cache, loss_cache) = losses
    assert torch.equal(z_fly, z_cache) and torch.equal(loss_fly, loss_cache)


def test_cached_latents_skip_the_encoder(monkeypatch):
    model = tiny_ldm()
    monkeypatch.setattr(model.first_stage_model, "encode", lambda x: pytest.fail("encoder called"))
    mean = torch.randn(2, 4, 8, 8)
    z, c = model.get_input({perf.LATENT_KEY: mean, "class_label": torch.tensor([0, 1])}, "image")
    assert torch.equal(z, model.scale_factor * mean)          # no logvar: the cached tensor as is
    assert torch.equal(c["class_label"], torch.tensor([0, 1]))   # trainable cond stage: raw input, encoded in forward
    z, c = model.get_input({perf.LATENT_KEY: mean, "class_label": torch.tensor([0, 1])}, "image", bs=1,
                           force_c_encode=True)
    assert z.shape == (1, 4, 8, 8) and c.shape == (1, 1, 16)
    with pytest.raises(ValueError, match="cached latents"):
        model.get_input({perf.LATENT_KEY: mean, "class_label": torch.tensor([0, 1])}, "image",
                        return_first_stage_outputs=True)


def test_cache_roundtrip(tmp_path):
    lat = torch.randn(5, 4, 2, 2)
    write_shard(tmp_path / shard_name(0), {"latent": lat[:3].half(), "class_label": torch.arange(3)},
                {"caption": ["a", "b", "c"]})
    write_shard(tmp_path / shard_name(1), {"latent": lat[3:].half(), "class_label": torch.arange(3, 5)},
                {"caption": ["d", "e"]})
    write_index(tmp_path, [3, 2], kind="tensor")
    ds = CachedLatents(tmp_path)
    assert len(ds) == 5
    item = ds[4]
    assert item["latent"].dtype == torch.float32 and torch.equal(item["latent"], lat[4].half().float())
    assert item["class_label"] == 4 and item["caption"] == "e"
    assert set(CachedLatents(tmp_path, keys=["latent"])[0]) == {"latent"}
    with pytest.raises(ValueError, match="differ in length"):
        write_shard(tmp_path / "bad.safetensors", {"latent": lat}, {"caption": ["x"]})
    with pytest.raises(FileNotFoundError, match="cache_latents"):
        CachedLatents(tmp_path / "missing")


def test_cache_latents_script_on_the_digits(tmp_path):
    spec = importlib.util.spec_from_file_location("cache_latents", ROOT / "scripts" / "cache_latents.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--config", str(ROOT / "configs" / "quickstart" / "ldm_digits.yaml"), "--out", str(tmp_path),
                       "--limit", "10", "--batch-size", "4", "--shard-size", "6", "--num-workers", "0",
                       "--device", "cpu"])
    ds = CachedLatents(out)
    assert len(ds) == 10 and [s["n"] for s in ds.index["shards"]] == [6, 4]
    item = ds[7]
    cfg = OmegaConf.load(ROOT / "configs" / "quickstart" / "ldm_digits.yaml")
    source = instantiate_from_config(cfg.data.params.train)[7]
    # every conditioning key of the dataset is kept (as is), the images are not
    assert set(item) == {"latent", "latent_logvar"} | (set(source) - {"image"})
    assert int(item["class_label"]) == int(source["class_label"])
    assert item["latent"].shape == (4, 8, 8) == tuple(ds.index["latent_shape"])
    assert ds.index["first_stage"] == "AutoencoderKL" and ds.index["kind"] == "posterior"
    assert Path(out, "index.json").exists()


def test_lightning_bf16_training_on_cached_latents(tmp_path):
    """Lightning's precision="bf16-mixed" runs the UNet in bf16 on a CachedLatents loader."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    mean, logvar = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8) - 3
    write_shard(tmp_path / shard_name(0), {"latent": mean, "latent_logvar": logvar, "class_label": torch.arange(4)}, {})
    write_index(tmp_path, [4], kind="posterior")
    model = tiny_ldm()
    model.learning_rate = 1e-3
    before = model.model.diffusion_model.out[2].weight.detach().clone()
    dtypes = []
    model.model.diffusion_model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    model.first_stage_model.encode = lambda x: pytest.fail("encoder called")
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(CachedLatents(tmp_path), batch_size=2))
    assert trainer.global_step == 2 and dtypes == [torch.bfloat16] * 2
    after = model.model.diffusion_model.out[2].weight
    assert after.dtype == torch.float32 and torch.isfinite(after).all() and not torch.equal(after, before)
