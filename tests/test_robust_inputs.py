"""Inputs handled as documented, not silently changed: images with alpha are composited onto
white, 16-bit images are scaled (not clipped to white), images smaller than the training size
are upscaled, each counted; sampling scripts refuse `--n_samples 0`, `--n_iter 0`, `--eta -1`."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import _image
from ldm.scripting import add_common_args


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    monkeypatch.setattr(_image, "IMAGE_FIXES", {})


def test_alpha_is_composited_onto_white_and_counted(tmp_path: Path, caplog) -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 0
    a[0, 0, 3] = 255
    a[0, 1, 3] = 128
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    x = _image.load_image(str(tmp_path / "a.png"))
    assert x.shape == (4, 4, 3) and x.dtype == np.uint8
    assert x[0, 0].tolist() == [200, 0, 0]          # opaque: unchanged
    assert x[1, 1].tolist() == [255, 255, 255]      # transparent: the white background
    assert abs(int(x[0, 1, 0]) - (200 * 128 + 255 * 127) // 255) <= 1 and abs(int(x[0, 1, 1]) - 127) <= 1
    # an opaque RGBA is just RGB: no fix counted
    a[..., 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "b.png")
    assert _image.load_image(str(tmp_path / "b.png"))[1, 1].tolist() == [200, 0, 0]
    assert _image.IMAGE_FIXES == {"alpha": 1} and "alpha channel" in caplog.text and "a.png" in caplog.text


def test_16bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    g = (np.arange(16).reshape(4, 4) * 4369).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(g).save(tmp_path / "g.png")
    x = _image.load_image(str(tmp_path / "g.png"))
    np.testing.assert_array_equal(x[..., 0], np.round(g / 257.0).astype(np.uint8))
    assert (x[..., 0] == x[..., 2]).all() and x.max() == 255 and x.min() == 0
    assert _image.IMAGE_FIXES == {"16bit": 1}


def test_smaller_than_size_is_upscaled_and_counted_and_crop_says_why() -> None:
    out = _image.smallest_side_to(np.zeros((3, 5, 3), np.uint8), 8)
    assert out.shape == (8, 13, 3) and _image.IMAGE_FIXES == {"upscaled": 1}
    assert _image.smallest_side_to(np.zeros((16, 16, 3), np.uint8), 8).shape == (8, 8, 3)
    assert _image.IMAGE_FIXES == {"upscaled": 1}  # downscaling is the normal case: not counted
    with pytest.raises(ValueError, match=r"crop \(8, 8\) larger than image \(3, 5\): resize first"):
        _image.square_crop(np.zeros((3, 5, 3), np.uint8), 8)


@pytest.mark.parametrize("argv,words", [(["--n_samples", "0"], "--n_samples: must be >= 1, got 0"),
                                        (["--n_iter", "0"], "--n_iter: must be >= 1, got 0"),
                                        (["--eta", "-1"], "--eta/--ddim_eta: must be >= 0, got -1"),
                                        (["--steps", "0"], "--steps/--ddim_steps: must be >= 1, got 0")])
def test_sampling_arguments_out_of_range_are_errors(argv, words, capsys) -> None:
    p = add_common_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        p.parse_args(argv)
    assert words in capsys.readouterr().err
    ok = p.parse_args(["--eta", "0.5", "--n_samples", "1", "--n_iter", "2"])
    assert (ok.eta, ok.n_samples, ok.n_iter) == (0.5, 1, 2)
