"""Per-image reconstruction metrics: PSNR, SSIM, LPIPS ("PSIM" in the model zoo table).

Images are compared as the uint8 pictures one would save: model outputs in [-1, 1] go through
`to_uint8` first (clamp, (x+1)*127.5, round), which also inverts the datasets' `x/127.5 - 1`
exactly. PSNR and SSIM use the 0..255 range; SSIM is Wang et al. 2004 with an 11x11 Gaussian
window (sigma 1.5), K1=0.01, K2=0.03, population covariances, averaged over the valid region
and the channels (= scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`).
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
ArrayLike = Union[np.ndarray, torch.Tensor]
LPIPS_RANDOM_NOTE = "PSIM/LPIPS: RANDOM-WEIGHT network — numbers are not comparable to the paper"


def to_uint8(x: ArrayLike) -> ArrayLike:
    """[-1, 1] floats -> uint8 0..255 (same layout and container type)."""
    if isinstance(x, np.ndarray):
        return np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return ((x.detach().double().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def _nchw_float(x: ArrayLike) -> torch.Tensor:
    """uint8/float images (B,H,W,C) or (B,C,H,W) [0..255] -> float64 (B,C,H,W)."""
    t = torch.as_tensor(x)
    if t.ndim == 3:
        t = t[None]
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t.double()


def psnr(img1: ArrayLike, img2: ArrayLike, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB (B,), on images in [0, data_range]; identical images give inf."""
    a, b = _nchw_float(img1), _nchw_float(img2)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(data_range ** 2 / mse.numpy()))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian (size, size), float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(img1: ArrayLike, img2: ArrayLike, data_range: float = 255.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Per-image SSIM (B,) of images in [0, data_range] (uint8 or float; HWC or CHW batches)."""
    a, b = _nchw_float(img1), _nchw_float(img2)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    c = a.shape[1]
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"images {tuple(a.shape[-2:])} smaller than the SSIM window {win_size}")
    w = gaussian_window(win_size, sigma).to(a)[None, None].repeat(c, 1, 1, 1)
    filt = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731  (valid region only)
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a ** 2
    s_bb = filt(b * b) - mu_b ** 2
    s_ab = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
    return (num / den).flatten(1).mean(1).numpy()


def mean_std(values: ArrayLike) -> dict[str, float]:
    """Mean and (population) std, the model zoo's `x +/- y`; counts non-finite values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    with np.errstate(invalid="ignore"):
        out = {"mean": float(v.mean()) if len(v) else math.nan, "std": float(v.std()) if len(v) else math.nan,
               "n": int(len(v))}
    if len(finite) != len(v):
        out.update(n_nonfinite=int(len(v) - len(finite)), mean_finite=float(finite.mean()) if len(finite) else math.nan,
                   std_finite=float(finite.std()) if len(finite) else math.nan)
    return out


def build_lpips(random_weights: bool = False, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """`ldm.modules.losses.lpips.LPIPS` (VGG16 + linear heads), eval mode, frozen.

    Pretrained weights are read by that class from local files (its error names them). With
    `random_weights=True` the same network is built without loading anything and then
    re-initialised from a fixed seed; results must then carry `LPIPS_RANDOM_NOTE`.
    """
    from ldm.modules.losses.lpips import LPIPS

    if not random_weights:
        net = LPIPS().eval()
        with torch.no_grad():  # fail now, not after hours of sampling, when weight files are missing
            net(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    else:
        net = _build_random_lpips(LPIPS)
    return net.to(device).eval().requires_grad_(False)


def _build_random_lpips(cls) -> torch.nn.Module:
    params = inspect.signature(cls).parameters
    kwargs = {}
    for name, value in (("pretrained", False), ("load_pretrained", False), ("pnet_rand", True),
                        ("use_dropout", True)):
        if name in params:
            kwargs[name] = value
    try:
        net = cls(**kwargs)
    except (FileNotFoundError, OSError, RuntimeError) as e:
        raise RuntimeError(
            f"cannot build {cls.__module__}.{cls.__name__} without its weight files ({e}); "
            "random-weight LPIPS needs the class to accept pretrained=False") from e
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            if p.ndim > 1 and "lin" in name:       # linear heads: positive weights, like trained LPIPS
                p.copy_(torch.rand(p.shape, generator=g) / fan_in)
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                p.zero_()
    return net


@torch.no_grad()
def lpips_distance(net: torch.nn.Module, img1: ArrayLike, img2: ArrayLike) -> np.ndarray:
    """Per-image LPIPS (B,) of uint8 images (converted to [-1, 1] as LPIPS expects)."""
    dev = next(net.parameters()).device
    a = _nchw_float(img1).float().to(dev) / 127.5 - 1.0
    b = _nchw_float(img2).float().to(dev) / 127.5 - 1.0
    return net(a, b).reshape(len(a), -1).mean(1).double().cpu().numpy()
