"""scripts/sample_diffusion.py (unconditional, -r logdir or checkpoint) and
scripts/sample_class_conditional.py on tiny random-weight checkpoints."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from test_scripts_common import image_array, png_bytes, script, tiny  # noqa: F401

CELEBA = "configs/ldm/celebahq.yaml"
CIN = "configs/ldm/cin256.yaml"


def sample_diffusion(*args):
    return script("sample_diffusion").main(["--n_samples", "2", "--steps", "3", "--device", "cpu", *args])


def test_released_folder_and_main_logdir_layouts(tiny, tmp_path):
    cfg, ckpt = tiny(CELEBA)
    released = tmp_path / "models" / "ldm" / "celeba256"          # config.yaml + model.ckpt
    released.mkdir(parents=True)
    shutil.copy(cfg, released / "config.yaml")
    shutil.copy(ckpt, released / "model.ckpt")
    logdir = tmp_path / "logs" / "2024-01-01T00-00-00_celebahq"   # main.py: configs/*-project.yaml + last.ckpt
    (logdir / "configs").mkdir(parents=True)
    (logdir / "checkpoints").mkdir()
    shutil.copy(cfg, logdir / "configs" / "2024-01-01T00-00-00-project.yaml")
    shutil.copy(ckpt, logdir / "checkpoints" / "last.ckpt")

    a = sample_diffusion("-r", str(released / "model.ckpt"), "--outdir", str(tmp_path / "a"))
    b = sample_diffusion("-r", str(logdir), "--outdir", str(tmp_path / "b"))
    c = sample_diffusion("-r", str(logdir / "checkpoints" / "last.ckpt"), "--seed", "5", "--npz")
    assert len(a) == 2 and png_bytes(a) == png_bytes(b)            # same model, same seed: same bytes
    assert image_array(a[0]).shape == (32, 32, 3) and (tmp_path / "a" / "grid-0000.png").is_file()
    assert c[0].parent.parent.parent == logdir / "samples"          # default outdir: LOGDIR/samples/<date>
    assert png_bytes(c) != png_bytes(a)
    npz = np.load(next((c[0].parent.parent / "numpy").glob("*.npz")))["arr_0"]
    assert npz.shape == (2, 32, 32, 3) and npz.dtype == np.uint8 and (npz[0] == image_array(c[0])).all()


def test_samplers_and_convolutional_size(tiny, tmp_path):
    cfg, ckpt = tiny(CELEBA, "safetensors")
    for sampler in ("plms", "dpm"):
        out = sample_diffusion("--config", str(cfg), "--ckpt", str(ckpt), "--sampler", sampler, "--eta", "0",
                               "--H", "64", "--W", "32", "--outdir", str(tmp_path / sampler))
        assert image_array(out[0]).shape == (64, 32, 3)
    # ancestral DDPM runs every training step (-v as the original): a 50-step model keeps it short
    from conftest import ROOT
    short = tmp_path / "short" / "model.safetensors"
    cfg = script("make_tiny_checkpoint").main([str(ROOT / CELEBA), "--tiny", "--set", "model.params.timesteps=50",
                                               "--out", str(short)])
    a = sample_diffusion("--config", str(cfg), "--ckpt", str(short), "-v", "--n_samples", "1",
                         "--outdir", str(tmp_path / "ddpm_a"))
    b = sample_diffusion("--config", str(cfg), "--ckpt", str(short), "--sampler", "ddpm", "--n_samples", "1",
                         "--outdir", str(tmp_path / "ddpm_b"))
    assert png_bytes(a) == png_bytes(b)


def test_sample_diffusion_bad_inputs(tiny, tmp_path):
    cfg, ckpt = tiny(CELEBA)
    with pytest.raises(SystemExit, match=r"cannot find -r '.*nowhere'"):
        sample_diffusion("-r", str(tmp_path / "nowhere"))
    empty = tmp_path / "empty_logdir"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"no checkpoint in logdir '.*empty_logdir'"):
        sample_diffusion("-r", str(empty))
    with pytest.raises(SystemExit, match=r"this model is conditional"):
        sample_diffusion("--config", str(tiny(CIN)[0]), "--ckpt", str(tiny(CIN)[1]))
    with pytest.raises(SystemExit, match=r"32x36 must be positive multiples of the downsampling factor 32 "
                                         r"\(first stage f=4 x UNet 8\)"):
        sample_diffusion("--config", str(cfg), "--ckpt", str(ckpt), "--W", "36", "--H", "32")


def class_cond(cfg, ckpt, out, *args):
    return script("sample_class_conditional").main(["--config", str(cfg), "--ckpt", str(ckpt), "--outdir", str(out),
                                                    "--steps", "3", "--n_samples", "2", *args])


def test_class_conditional(tiny, tmp_path):
    cfg, ckpt = tiny(CIN)
    a = class_cond(cfg, ckpt, tmp_path / "a", "--classes", "25,187", "--scale", "3.0")
    b = class_cond(cfg, tiny(CIN, "safetensors")[1], tmp_path / "b", "--classes", "25,187", "--scale", "3.0")
    assert [p.name for p in a] == ["00000-class25.png", "00001-class25.png", "00002-class187.png",
                                   "00003-class187.png"]
    assert png_bytes(a) == png_bytes(b)
    grid = image_array(tmp_path / "a" / "grid-0000.png")
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)                 # one row per class, 2 per row
    # the class matters (same seed, other class)
    c = class_cond(cfg, ckpt, tmp_path / "c", "--classes", "26,187", "--scale", "3.0")
    assert png_bytes(c[:2]) != png_bytes(a[:2])
    assert png_bytes(c[2:]) == png_bytes(a[2:])     # class 187 got the same noise draws as before
    # the null class (1000 of cin256-v2's 1001 embeddings) is not one of the model's classes
    with pytest.raises(SystemExit, match=r"class indices \[1000\] out of range: the model has 1000 classes, "
                                         r"0..999 \(class 1000 is the null class of guidance\)"):
        class_cond(cfg, ckpt, tmp_path / "d", "--classes", "3,1000")
    with pytest.raises(SystemExit, match="not a class-conditional model"):
        class_cond(*tiny(CELEBA), tmp_path / "e")
