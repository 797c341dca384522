"""ldm.scripting and scripts/make_tiny_checkpoint.py, plus the helpers the other
tests/test_scripts_*.py import: `script(name)` (a script module, run in-process through its
main(argv)), the session fixture `tiny` (tiny random-weight checkpoints, made once) and
`png_bytes` / `pngs`."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import ROOT
from ldm import perf
from ldm import scripting as S

_SCRIPTS: dict[str, Any] = {}


def script(name: str) -> Any:
    """scripts/<name>.py as a module (imported once)."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"ldm_script_{name}", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(config relative to the repo, fmt "ckpt" | "safetensors") -> (config.yaml, checkpoint);
    one build per config, both formats written together."""
    made: dict[str, Path] = {}

    def get(config: str, fmt: str = "ckpt") -> tuple[Path, Path]:
        if config not in made:
            out = tmp_path_factory.mktemp(Path(config).stem)
            script("make_tiny_checkpoint").main([str(ROOT / config), "--tiny", "--out", str(out / "model.ckpt"),
                                                 "--out", str(out / "model.safetensors")])
            made[config] = out
        return made[config] / "config.yaml", made[config] / f"model.{fmt}"
    return get


def pngs(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob("*.png"))


def png_bytes(paths) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def image_array(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------------------
# make_tiny_checkpoint
# ----------------------------------------------------------------------------------------
SD1 = "configs/stable-diffusion/v1-inference.yaml"


def test_tiny_checkpoint_formats_hold_the_same_weights(tiny):
    from ldm.checkpoint import load_model_from_config, load_state_dict_file
    cfg, ckpt = tiny(SD1, "ckpt")
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "global_step", "epoch"} and raw["global_step"] == 0 and raw["epoch"] == 0
    a, b = load_state_dict_file(ckpt), load_state_dict_file(tiny(SD1, "safetensors")[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("cond_stage_model.transformer.") for k in a)       # the tiny CLIP is in the file
    with S.random_hub_weights():
        model = load_model_from_config(str(cfg), ckpt)                           # strict: every key matches
    unet = model.model.diffusion_model
    assert unet.model_channels == 32 and unet.channel_mult == [1, 2, 2, 2] and model.image_size == 8
    # zero-initialised output layers were re-drawn: the random UNet's output depends on its input
    x = torch.randn(1, 4, 8, 8)
    out = unet(x, torch.tensor([500]), context=torch.randn(1, 77, 64))
    assert out.abs().mean() > 1e-3


def test_tiny_checkpoint_overrides_and_seed(tmp_path):
    make = script("make_tiny_checkpoint")
    cfg = ROOT / "configs/ldm/celebahq.yaml"
    make.main([str(cfg), "--tiny", "--set", "model.params.unet_config.params.model_channels=64",
               "--out", str(tmp_path / "a/m.safetensors"), "--seed", "3"])
    make.main([str(cfg), "--tiny", "--set", "model.params.unet_config.params.model_channels=64",
               "--out", str(tmp_path / "b/m.safetensors"), "--seed", "3"])
    from ldm.checkpoint import load_state_dict_file
    a, b = load_state_dict_file(tmp_path / "a/m.safetensors"), load_state_dict_file(tmp_path / "b/m.safetensors")
    assert a["model.diffusion_model.input_blocks.0.0.weight"].shape[0] == 64
    assert all(torch.equal(a[k], b[k]) for k in a)                              # same seed, same weights
    assert "model_ema.decay" in a                                               # use_ema kept
    # EMA shadows are the (re-drawn) weights, so sampling in ema_scope is not degenerate
    assert torch.equal(a["model_ema.diffusion_modelout2weight"], a["model.diffusion_model.out.2.weight"])
    with pytest.raises(SystemExit, match=r"\.ckpt, \.pt or \.safetensors"):
        make.main([str(cfg), "--out", str(tmp_path / "m.bin")])


# ----------------------------------------------------------------------------------------
# ldm.scripting
# ----------------------------------------------------------------------------------------
def test_precision_scope():  # the one autocast table: ldm.perf.autocast
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        ctx = perf.autocast("fp16", "cpu")
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
    with perf.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with perf.autocast("fp32", "cpu"):
            assert not torch.is_autocast_enabled("cpu")


def test_generator_reproduces_draws():
    a = torch.randn(4, generator=S.seed_everything(7))
    b = torch.randn(4, generator=S.seed_everything(7))
    c = torch.randn(4, generator=S.seed_everything(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_read_prompts(tmp_path):
    assert S.read_prompts("a cat", None, 3) == [["a cat"] * 3]
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\nthree\n")
    assert S.read_prompts(None, f, 2) == [["one", "two"], ["three"]]
    assert S.read_prompts(None, f, 4, repeat=2) == [["one", "one", "two", "two"], ["three", "three"]]
    with pytest.raises(SystemExit, match="prompt file not found: '.*nope.txt'"):
        S.read_prompts("x", tmp_path / "nope.txt", 2)


def test_sample_writer_numbers_and_grid(tmp_path):
    w = S.SampleWriter(tmp_path)
    w.save(torch.rand(3, 3, 8, 8))
    grid = w.save_grid(n_rows=2)
    assert [p.name for p in w.written] == ["00000.png", "00001.png", "00002.png"]
    assert grid.name == "grid-0000.png" and image_array(grid).shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    w2 = S.SampleWriter(tmp_path)                           # a second run continues the numbering
    w2.save(torch.zeros(1, 3, 8, 8))
    assert w2.written[0].name == "00003.png" and w2.save_grid(1).name == "grid-0001.png"
    assert (image_array(w2.written[0]) == 0).all()
