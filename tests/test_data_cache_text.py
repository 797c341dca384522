"""scripts/cache_latents.py --text: frozen cond-stage outputs cached beside the latents, a killed
run resumed at the first unfinished shard gives identical shards, CachedLatents returns the cached
tensors, and LatentDiffusion trains a step from cached latents + cached text with neither the
first stage nor the text encoder running."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import ROOT
from ldm import perf
from ldm.data.cached_latents import CachedLatents, shard_name
from ldm.data.digits import DigitsTrain
from ldm.util import instantiate_from_config

torch.set_num_threads(1)


class TinyTextEncoder(nn.Module):
    """A frozen 'text encoder' for strings: bytes -> embeddings, (B, 4, 64) context."""

    def __init__(self, dim: int = 64, length: int = 4):
        super().__init__()
        torch.manual_seed(7)
        self.length = length
        self.embedding = nn.Embedding(257, dim).requires_grad_(False)
        self.calls = 0

    def encode(self, text: list[str]) -> torch.Tensor:
        self.calls += 1
        ids = torch.tensor([[(text_i.encode() + b"\0" * self.length)[k] + 1 for k in range(self.length)]
                            for text_i in text])
        return self.embedding(ids)


class CaptionedDigits(DigitsTrain):
    """The digits with a caption (the digit's name)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "caption": f"digit {item['human_label']}"}


def config(tmp_path):
    cfg = OmegaConf.load(ROOT / "configs" / "quickstart" / "ldm_digits.yaml")
    cfg.data.params.train.target = "test_data_cache_text.CaptionedDigits"
    params = cfg.model.params
    params.cond_stage_key = "caption"
    params.cond_stage_trainable = False
    params.scale_by_std = False
    params.use_ema = False
    params.cond_stage_config = {"target": "test_data_cache_text.TinyTextEncoder"}
    path = tmp_path / "cfg.yaml"
    OmegaConf.save(cfg, path)
    return path


def script():
    spec = importlib.util.spec_from_file_location("cache_latents", ROOT / "scripts" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_shards(root):
    from safetensors.torch import load_file
    return [load_file(str(p)) for p in sorted(root.glob("shard-*.safetensors"))]


def test_text_cache_resume_dataset_and_training(tmp_path, monkeypatch):
    cfg_path = config(tmp_path)
    cache = script()
    args = ["--config", str(cfg_path), "--limit", "10", "--batch-size", "3", "--shard-size", "4",
            "--num-workers", "0", "--device", "cpu", "--text", "--store", "sample", "--no-progress"]
    full = cache.main(args + ["--out", str(tmp_path / "full")])

    # a run killed while encoding shard 1 (shard 0 finished): the restart begins at shard 1
    real = cache.encode_shard
    calls = []

    def dying(loader, *a, **k):
        calls.append(len(loader.dataset))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(loader, *a, **k)
    monkeypatch.setattr(cache, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.main(args + ["--out", str(tmp_path / "resumed")])
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard-*")) == [shard_name(0)]
    monkeypatch.setattr(cache, "encode_shard", lambda loader, *a, **k: (calls.append(len(loader.dataset)),
                                                                       real(loader, *a, **k))[1])
    resumed = cache.main(args + ["--out", str(tmp_path / "resumed")])
    assert calls == [4, 4, 4, 2]   # shard 0 once, shard 1 again after the kill, then shard 2
    a, b = read_shards(full), read_shards(resumed)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and [k for k in x if not torch.equal(x[k], y[k])] == []
    with pytest.raises(ValueError, match="other arguments"):
        cache.main(args[:-3] + ["--store", "mean", "--no-progress", "--out", str(tmp_path / "resumed")])

    # the dataset returns the cached encodings: the text encoder's output for the item's label
    ds = CachedLatents(full)
    assert len(ds) == 10 and ds.index["cached_cond_shape"] == [4, 64]
    item = ds[5]
    assert set(item) >= {"latent", "cached_cond", "cached_uncond", "caption", "class_label"}
    torch.testing.assert_close(item["cached_cond"], TinyTextEncoder().encode([item["caption"]])[0])
    torch.testing.assert_close(item["cached_uncond"], TinyTextEncoder().encode([""])[0])

    # one training step from cached latents + cached text: no encoder, no text encoder
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader
    model = instantiate_from_config(OmegaConf.load(cfg_path).model)
    model.learning_rate = 1e-3
    model.first_stage_model.encode = lambda x: pytest.fail("first stage called")
    model.cond_stage_model.encode = lambda c: pytest.fail("text encoder called")
    seen = []
    model.model.diffusion_model.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    before = model.model.diffusion_model.out[2].weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(ds, batch_size=4))
    assert trainer.global_step == 1 and seen == [(4, 4, 8, 8)]
    assert not torch.equal(model.model.diffusion_model.out[2].weight, before)
    z, c = model.get_input(next(iter(DataLoader(ds, batch_size=2))), "image")
    torch.testing.assert_close(c, torch.stack([ds[0]["cached_cond"], ds[1]["cached_cond"]]))


def test_text_mode_refuses_a_trainable_cond_stage(tmp_path):
    with pytest.raises(ValueError, match="frozen cond stage"):
        script().main(["--config", str(ROOT / "configs" / "quickstart" / "ldm_digits.yaml"), "--limit", "2",
                       "--num-workers", "0", "--device", "cpu", "--text", "--out", str(tmp_path / "x")])


def test_ucg_on_cached_text_equals_ucg_on_the_fly(tmp_path):
    """ucg_rate drops a cached caption to the cached empty-prompt encoding: same draws, same c, same loss."""
    cfg = OmegaConf.load(config(tmp_path)).model
    cfg.params.ucg_rate = 0.5
    torch.manual_seed(0)
    model = instantiate_from_config(cfg).train()
    enc = TinyTextEncoder()
    captions = ["digit 1", "digit 2", "digit 3", "digit 4", "digit 5", "digit 6"]
    images = torch.rand(6, 32, 32, 3) * 2 - 1
    with torch.no_grad():
        posterior = model.encode_first_stage(images.permute(0, 3, 1, 2).contiguous())
    cached = {perf.LATENT_KEY: posterior.mean, perf.LATENT_LOGVAR_KEY: posterior.logvar, "caption": captions,
              perf.CACHED_COND_KEY: enc.encode(captions), perf.CACHED_UNCOND_KEY: enc.encode([""]).expand(6, -1, -1)}
    results = []
    for batch in ({"image": images, "caption": captions}, cached):
        torch.manual_seed(5)
        c_seen = []
        model.apply_model = (lambda f: lambda x, t, c, *a, **k: (c_seen.append(c), f(x, t, c, *a, **k))[1])(
            type(model).apply_model.__get__(model))
        loss, _ = model.shared_step(batch)
        results.append((loss, c_seen[0]))
    (loss_fly, c_fly), (loss_cache, c_cache) = results
    torch.testing.assert_close(c_cache, c_fly)
    assert torch.equal(loss_fly, loss_cache)
    dropped = [bool(torch.equal(c_cache[i], enc.encode([""])[0])) for i in range(6)]
    assert any(dropped) and not all(dropped)   # seed 5 drops some, keeps some
    bare = {k: v for k, v in cached.items() if k != perf.CACHED_UNCOND_KEY}
    with pytest.raises(ValueError, match="empty prompt's encoding"):
        model.shared_step(bare)
