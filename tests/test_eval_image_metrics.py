"""PSNR / SSIM / LPIPS per image, against closed forms, a direct numpy SSIM and scikit-image."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from ldm.eval.image_metrics import mean_std, psnr, ssim, to_uint8


def _image(seed: int = 0, shape=(2, 48, 40, 3)) -> np.ndarray:
    rs = np.random.RandomState(seed)
    smooth = scipy.ndimage.gaussian_filter(rs.rand(*shape), sigma=(0, 3, 3, 0))   # natural-ish structure
    return np.clip((smooth - smooth.min()) / np.ptp(smooth) * 200 + 20, 0, 255).astype(np.uint8)


def ssim_wang2004_numpy(a: np.ndarray, b: np.ndarray, L: float = 255.0) -> float:
    """Direct implementation of Wang et al. 2004 (Gaussian 11x11, sigma 1.5) for one HWC image."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        filt = lambda t: scipy.ndimage.gaussian_filter(t, 1.5, truncate=3.5)  # noqa: E731 (radius 5 -> 11 taps)
        mx, my = filt(x), filt(y)
        sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
        vals.append(m[5:-5, 5:-5].mean())     # valid region only
    return float(np.mean(vals))


def test_to_uint8_inverts_dataset_scaling_exactly():
    k = np.arange(256, dtype=np.uint8)
    x = (k / 127.5 - 1.0).astype(np.float32)           # what the datasets hand out
    assert np.array_equal(to_uint8(x), k)
    assert torch.equal(to_uint8(torch.from_numpy(x)), torch.from_numpy(k))
    assert to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]   # clamped


def test_psnr_identical_and_known_perturbation():
    a = _image()
    assert np.all(np.isinf(psnr(a, a)))
    b = a.astype(np.int64) + 5                        # no clipping: values are in 20..220
    assert b.max() <= 255
    np.testing.assert_allclose(psnr(a, b.astype(np.uint8)), 20 * np.log10(255 / 5), rtol=1e-12)
    c = a.copy()
    c[0, :24] += 10                                  # half the rows of image 0: MSE = 100 / 2
    np.testing.assert_allclose(psnr(a, c), [10 * np.log10(255 ** 2 / 50), np.inf], rtol=1e-12)


def test_ssim_identical_is_one_and_constant_images_closed_form():
    a = _image()
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    x = np.full((1, 20, 20, 3), 100, np.uint8)
    y = np.full((1, 20, 20, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1)   # variance terms are (c2)/(c2) = 1
    np.testing.assert_allclose(ssim(x, y), expected, rtol=1e-10)


@pytest.mark.parametrize("kind", ["noise", "blur", "shift"])
def test_ssim_matches_direct_numpy_wang2004(kind):
    a = _image(1)
    rs = np.random.RandomState(2)
    if kind == "noise":
        b = np.clip(a + rs.randint(-25, 26, a.shape), 0, 255).astype(np.uint8)
    elif kind == "blur":
        b = scipy.ndimage.gaussian_filter(a.astype(float), sigma=(0, 1.2, 1.2, 0)).round().astype(np.uint8)
    else:
        b = np.roll(a, 2, axis=2)
    ours = ssim(a, b)
    ref = [ssim_wang2004_numpy(a[i], b[i]) for i in range(len(a))]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert np.all(ours < 1.0)
    # CHW layout and float input give the same numbers
    np.testing.assert_allclose(ssim(torch.from_numpy(a).permute(0, 3, 1, 2), b.astype(np.float32)), ours, rtol=1e-10)


def test_ssim_psnr_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a = _image(3)
    b = np.clip(a + np.random.RandomState(4).randint(-15, 16, a.shape), 0, 255).astype(np.uint8)
    ref_ssim = [metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, data_range=255,
                                              use_sample_covariance=False, channel_axis=-1) for i in range(2)]
    ref_psnr = [metrics.peak_signal_noise_ratio(a[i], b[i], data_range=255) for i in range(2)]
    np.testing.assert_allclose(ssim(a, b), ref_ssim, rtol=1e-10)
    np.testing.assert_allclose(psnr(a, b), ref_psnr, rtol=1e-10)


def test_mean_std_reports_population_std_and_nonfinite():
    out = mean_std([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == 2.5 and out["std"] == pytest.approx(np.sqrt(1.25)) and out["n"] == 4
    out = mean_std([30.0, np.inf, 40.0])
    assert out["n_nonfinite"] == 1 and out["mean_finite"] == 35.0


def test_lpips_random_weights_zero_on_identical_and_positive_otherwise():
    pytest.importorskip("ldm.modules.losses.lpips", reason="LPIPS (stage-1 module) not available yet")
    from ldm.eval.image_metrics import build_lpips, lpips_distance

    net = build_lpips(random_weights=True)
    a = _image(5, shape=(2, 64, 64, 3))
    b = np.clip(a + np.random.RandomState(6).randint(-40, 41, a.shape), 0, 255).astype(np.uint8)
    d_same, d_diff = lpips_distance(net, a, a), lpips_distance(net, a, b)
    np.testing.assert_allclose(d_same, 0.0, atol=1e-6)
    assert np.all(d_diff > 1e-4)
