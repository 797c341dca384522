"""scripts/inpaint.py, superres.py and img2img.py on tiny random-weight checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from test_scripts_common import image_array, png_bytes, script, tiny  # noqa: F401

LDM_INPAINT = "configs/ldm/inpainting.yaml"
SD2_INPAINT = "configs/stable-diffusion/v2-inpainting.yaml"
BSR = "configs/ldm/sr_bsr.yaml"
X4 = "configs/stable-diffusion/x4-upscaling.yaml"
SD1 = "configs/stable-diffusion/v1-inference.yaml"


def write_image(path, h, w, seed=0):
    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_pair(folder, name, h=64, w=64, mask_hw=None):
    folder.mkdir(parents=True, exist_ok=True)
    arr = write_image(folder / f"{name}.png", h, w)
    mh, mw = mask_hw or (h, w)
    mask = np.zeros((mh, mw), np.uint8)
    mask[mh // 4: mh // 2, mw // 4: mw // 2] = 255                   # white = hole
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return arr, mask > 127


def inpaint(cfg, ckpt, indir, out, *args):
    return script("inpaint").main(["--config", str(cfg), "--ckpt", str(ckpt), "--indir", str(indir),
                                   "--outdir", str(out), "--steps", "3", *args])


def test_ldm_inpainting_keeps_known_pixels_and_reproduces(tiny, tmp_path):
    cfg, ckpt = tiny(LDM_INPAINT)
    image, hole = write_pair(tmp_path / "in", "example")
    write_pair(tmp_path / "in", "other", h=32, w=64)
    a = inpaint(cfg, ckpt, tmp_path / "in", tmp_path / "a")
    b = inpaint(cfg, tiny(LDM_INPAINT, "safetensors")[1], tmp_path / "in", tmp_path / "b")
    assert [p.name for p in a] == ["example.png", "other.png"] and png_bytes(a) == png_bytes(b)
    out = image_array(a[0]).astype(int)
    assert np.abs(out[~hole] - image[~hole].astype(int)).max() <= 1     # outside the hole: the input
    assert np.abs(out[hole] - image[hole].astype(int)).mean() > 10      # inside: generated
    assert image_array(a[1]).shape == (32, 64, 3)


def test_sd2_inpainting_with_prompt(tiny, tmp_path):
    cfg, ckpt = tiny(SD2_INPAINT, "safetensors")
    write_pair(tmp_path / "in", "room")
    a = inpaint(cfg, ckpt, tmp_path / "in", tmp_path / "a", "--prompt", "a red sofa", "--n_samples", "2")
    b = inpaint(cfg, ckpt, tmp_path / "in", tmp_path / "b", "--prompt", "a red sofa", "--n_samples", "2")
    c = inpaint(cfg, ckpt, tmp_path / "in", tmp_path / "c", "--prompt", "a green lamp", "--n_samples", "2")
    assert [p.name for p in a] == ["room_0.png", "room_1.png"]
    assert png_bytes(a) == png_bytes(b) and png_bytes(a) != png_bytes(c)


def test_inpainting_bad_inputs(tiny, tmp_path):
    cfg, ckpt = tiny(LDM_INPAINT)
    write_pair(tmp_path / "bad", "photo", h=64, w=64, mask_hw=(32, 48))
    with pytest.raises(SystemExit, match=r"mask '.*photo_mask\.png' is 48x32 \(WxH\) but its image "
                                         r"'.*photo\.png' is 64x64"):
        inpaint(cfg, ckpt, tmp_path / "bad", tmp_path / "o")
    write_pair(tmp_path / "odd", "odd", h=40, w=64)
    with pytest.raises(SystemExit, match=r"image '.*odd\.png' size = 40x64 must be positive multiples of the "
                                         r"downsampling factor 32"):
        inpaint(cfg, ckpt, tmp_path / "odd", tmp_path / "o")
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit, match=r"no '<name>_mask.png' files in"):
        inpaint(cfg, ckpt, tmp_path / "none", tmp_path / "o")
    with pytest.raises(SystemExit, match=r"checkpoint not found: '.*absent\.ckpt'"):
        inpaint(cfg, tmp_path / "absent.ckpt", tmp_path / "odd", tmp_path / "o")


def superres(cfg, ckpt, out, *args):
    return script("superres").main(["--config", str(cfg), "--ckpt", str(ckpt), "--outdir", str(out),
                                    "--steps", "3", *args])


def test_superres_bsr_and_x4(tiny, tmp_path):
    lr = tmp_path / "lr.png"
    write_image(lr, 16, 24)
    a = superres(*tiny(BSR), tmp_path / "a", "--input", str(lr))
    b = superres(*tiny(BSR), tmp_path / "b", "--input", str(lr))
    assert image_array(a[0]).shape == (64, 96, 3) and png_bytes(a) == png_bytes(b)
    cfg, ckpt = tiny(X4, "safetensors")
    c = superres(cfg, ckpt, tmp_path / "c", "--input", str(lr), "--prompt", "a cat", "--noise_level", "20")
    d = superres(cfg, ckpt, tmp_path / "d", "--input", str(lr), "--prompt", "a cat", "--noise_level", "100")
    assert image_array(c[0]).shape == (64, 96, 3) and png_bytes(c) != png_bytes(d)
    with pytest.raises(SystemExit, match=r"--noise_level must be in \[0, 350\), got 350"):
        superres(cfg, ckpt, tmp_path / "e", "--input", str(lr), "--noise_level", "350")
    odd = tmp_path / "odd.png"
    write_image(odd, 12, 16)
    with pytest.raises(SystemExit, match=r"low-res image '.*odd\.png' is 16x12 \(WxH\): its sides must be "
                                         r"multiples of the UNet's downsampling factor 8"):
        superres(cfg, ckpt, tmp_path / "e", "--input", str(odd))
    with pytest.raises(SystemExit, match=r"not a super-resolution model"):
        superres(*tiny(SD1), tmp_path / "e", "--input", str(lr))


def img2img(cfg, ckpt, out, *args):
    return script("img2img").main(["--config", str(cfg), "--ckpt", str(ckpt), "--outdir", str(out),
                                   "--steps", "4", *args])


def test_img2img_strength(tiny, tmp_path):
    cfg, ckpt = tiny(SD1)
    init = tmp_path / "init.png"
    write_image(init, 70, 140)                                       # resized down to 64 x 128
    a = img2img(cfg, ckpt, tmp_path / "a", "--init-img", str(init), "--strength", "0.5", "--n_samples", "2")
    b = img2img(cfg, tiny(SD1, "safetensors")[1], tmp_path / "b", "--init-img", str(init), "--strength", "0.5",
                "--n_samples", "2")
    assert image_array(a[0]).shape == (64, 128, 3) and png_bytes(a) == png_bytes(b)
    full = img2img(cfg, ckpt, tmp_path / "c", "--init-img", str(init), "--strength", "1.0", "--H", "64", "--W", "64")
    assert image_array(full[0]).shape == (64, 64, 3)
    with pytest.raises(SystemExit, match=r"--strength must be in \[0, 1\], got 1.5"):
        img2img(cfg, ckpt, tmp_path / "d", "--init-img", str(init), "--strength", "1.5")
    with pytest.raises(SystemExit, match=r"input image not found: '.*nothing\.png'"):
        img2img(cfg, ckpt, tmp_path / "d", "--init-img", str(tmp_path / "nothing.png"))
    with pytest.raises(SystemExit, match=r"DDIM only"):
        img2img(cfg, ckpt, tmp_path / "d", "--init-img", str(init), "--plms")   # --sampler offers ddim only
