"""Super-resolution degradations: LR sizes and ranges, seeding, and the resize primitives."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.degradation import NAMES, make_degradation
from ldm.data.degradation import utils_image as util
from ldm.data.degradation.bsrgan import anisotropic_gaussian, isotropic_gaussian, shift_pixel

torch.set_num_threads(1)


def smooth_image(h: int = 64, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([200 * x + 30, 180 * y + 40, 120 + 60 * np.sin(6 * x) * np.cos(4 * y)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", NAMES)
def test_lr_size_dtype_and_content(name):
    hr = smooth_image()
    fn = make_degradation(name, 4, 16)
    lr = fn(hr, np.random.default_rng(0))
    assert lr.shape == (16, 16, 3) and lr.dtype == np.uint8
    # the LR image is a degraded copy of the HR one, not noise: close to its area downsampling
    ref = util.cv_resize(hr.astype(np.float32), (16, 16), util.INTER_AREA)
    err = np.abs(lr.astype(np.float32) - ref).mean() / 255
    assert err < {"bsrgan": 0.1, "bsrgan_light": 0.05}.get(name, 0.03), err


@pytest.mark.parametrize("name", ["bsrgan", "bsrgan_light"])
def test_bsrgan_seeded_and_no_global_rng(name):
    hr = smooth_image(96, 80)
    fn = make_degradation(name, 4, 24)
    np_state, py_state = np.random.get_state(), random.getstate()
    a = [fn(hr, np.random.default_rng(s)) for s in range(6)]
    b = [fn(hr, np.random.default_rng(s)) for s in range(6)]
    assert all(x.shape == (24, 20, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed, same degradation
    assert len({x.tobytes() for x in a}) == 6  # different seeds, different degradations
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state


def test_bsrgan_light_is_milder():
    """bsrgan_light (bsr_sr's training degradation) keeps LR images closer to a clean downsample."""
    hr = smooth_image()
    ref = util.cv_resize(hr.astype(np.float32), (16, 16), util.INTER_AREA)
    errs = {}
    for name in ("bsrgan", "bsrgan_light"):
        fn = make_degradation(name, 4, 16)
        errs[name] = np.mean([np.abs(fn(hr, np.random.default_rng(s)).astype(np.float32) - ref).mean()
                              for s in range(12)])
    assert errs["bsrgan_light"] < errs["bsrgan"]


def test_imresize_np_matches_matlab_bicubic():
    # interior pixels of MATLAB's antialiased bicubic (a = -0.5) = PIL's BICUBIC on float images
    rng = np.random.default_rng(0)
    img = rng.random((40, 48)).astype(np.float32)
    ours = util.imresize_np(img, 0.5)
    pil = np.asarray(Image.fromarray(img, mode="F").resize((24, 20), Image.BICUBIC))
    assert ours.shape == (20, 24)
    np.testing.assert_allclose(ours[3:-3, 3:-3], pil[3:-3, 3:-3], atol=1e-5)
    # symmetric borders: upscaling a ramp [0, 1, 2, 3] by 2 starts at -0.09375 (hand-computed)
    up = util.imresize_np(np.arange(4.0)[None, :].repeat(4, 0), 2.0)
    assert up.shape == (8, 8) and up[0, 0] == pytest.approx(-0.09375)
    assert util.imresize_np(np.full((9, 7, 3), 0.3), 0.5) == pytest.approx(0.3)


def test_cv_resize_semantics():
    ramp = np.arange(8, dtype=np.float32)[None, :].repeat(2, 0)
    # cv2 INTER_LINEAR / INTER_AREA halving of a ramp: pairwise means (half-pixel centers)
    assert util.cv_resize(ramp, (4, 2), util.INTER_LINEAR)[0] == pytest.approx([0.5, 2.5, 4.5, 6.5])
    assert util.cv_resize(ramp, (4, 2), util.INTER_AREA)[0] == pytest.approx([0.5, 2.5, 4.5, 6.5])
    assert util.cv_resize(ramp, (4, 2), util.INTER_NEAREST)[0] == pytest.approx([0, 2, 4, 6])
    u8 = util.cv_resize(np.full((8, 8, 3), 200, np.uint8), (3, 5), util.INTER_CUBIC)
    assert u8.dtype == np.uint8 and u8.shape == (5, 3, 3) and np.all(u8 == 200)


def test_kernels():
    iso = isotropic_gaussian(7, 1.2)
    assert iso.shape == (7, 7) and iso.sum() == pytest.approx(1) and np.allclose(iso, iso.T)
    aniso = anisotropic_gaussian(15, np.pi / 4, 6.0, 0.5)
    assert aniso.sum() == pytest.approx(1) and np.allclose(aniso, aniso.T)  # rotated 45 degrees
    assert aniso[2, 2] > aniso[2, 12]  # elongated along the diagonal
    k = isotropic_gaussian(25, 2.0)
    shifted = shift_pixel(k, 4)  # moved by (sf - 1) / 2 = 1.5 px towards the top-left
    cy, cx = np.unravel_index(np.argmax(shifted), shifted.shape)
    assert (cy, cx) in {(10, 10), (10, 11), (11, 10), (11, 11)}
