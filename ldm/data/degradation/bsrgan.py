"""The BSRGAN degradation model (Zhang et al. 2021, "Designing a Practical Degradation Model
for Deep Blind Image Super-Resolution"), in the variant LDM's super-resolution data used.

`degradation_bsrgan_variant(image, sf)` takes an (H, W, 3) uint8 image and returns
{"image": (H / sf, W / sf, 3) uint8}. It applies, in a random order (downsample2 always
before downsample3):

  0, 1  blur: anisotropic Gaussian (random eigenvalues and angle) or isotropic Gaussian
        kernel, 50/50, mirror borders (`BSRSettings.second_blur`: the full model blurs twice)
  2     downsample2: cv2-style resize by 1/U(1, 2 sf) with a random linear / cubic / area
        filter, or (otherwise) blur with a pixel-shifted Gaussian and nearest subsampling
  3     downsample3: resize to exactly 1/sf of the size before downsample2
  4     Gaussian noise: color, grayscale or channel-correlated, sigma in noise_levels / 255
  5     JPEG compression with probability 0.9
  6     camera-sensor (ISP) noise: needs an `isp_model`, none ships, so skipped as in LDM
with, first, a 1/2 downscale with probability 0.25 (then sf = 2 for the rest), and last
a final JPEG compression. `bsrgan_light` uses the same code with milder `BSRSettings`.

Randomness: every draw comes from the `rng` argument (a numpy Generator or a seed): the
same seed gives the same degradation; the global random state is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from scipy import ndimage
from scipy.linalg import orth

from ldm.data._image import as_rng
from ldm.data.degradation import utils_image as util


@dataclass(frozen=True)
class BSRSettings:
    second_blur: bool = True  # step 1 blurs again (full model); the light variant skips it
    blur_scale: float = 1.0  # kernel widths are divided by this (light: 4)
    aniso_ksize: tuple[int, int, int] = (2, 2, 11)  # anisotropic kernel side = a * U{b..c} + 3
    iso_ksize: tuple[int, int, int] = (2, 2, 11)  # isotropic kernel side = a * U{b..c} + 3
    resize_down2_p: float = 0.75  # downsample2: probability of a resize (else shifted blur + subsample)
    noise_levels: tuple[int, int] = (2, 25)  # Gaussian noise sigma, in 1/255, uniform integer range
    jpeg_quality: tuple[int, int] = (30, 95)  # JPEG quality factor range (inclusive)
    jpeg_p: float = 0.9  # probability of the in-sequence JPEG step
    scale2_p: float = 0.25  # probability of the initial 1/2 downscale (sf == 4 only)


FULL = BSRSettings()


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
def anisotropic_gaussian(ksize: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """Gaussian kernel with covariance eigenvalues l1, l2 rotated by theta (sums to 1)."""
    v = np.array([np.cos(theta), np.sin(theta)])
    V = np.array([[v[0], v[1]], [v[1], -v[0]]])
    sigma = V @ np.diag([max(l1, 1e-6), max(l2, 1e-6)]) @ np.linalg.inv(V)
    r = np.arange(ksize) - (ksize - 1) / 2.0
    cx, cy = np.meshgrid(r, r)
    pts = np.stack([cx, cy], axis=-1)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", pts, np.linalg.inv(sigma), pts))
    return k / k.sum()


def isotropic_gaussian(ksize: int, sigma: float) -> np.ndarray:
    """MATLAB `fspecial('gaussian', ksize, sigma)`."""
    r = np.arange(ksize) - (ksize - 1) / 2.0
    x, y = np.meshgrid(r, r)
    h = np.exp(-(x * x + y * y) / (2 * max(sigma, 1e-6) ** 2))
    h[h < np.finfo(float).eps * h.max()] = 0
    return h / h.sum()


def shift_pixel(k: np.ndarray, sf: int) -> np.ndarray:
    """Resample a kernel at coordinates shifted by (sf - 1) / 2 (bilinear, clamped), as BSRGAN."""
    h, w = k.shape
    shift = (sf - 1) * 0.5
    ys, xs = np.clip(np.arange(h) + shift, 0, h - 1), np.clip(np.arange(w) + shift, 0, w - 1)
    rows = np.stack([np.interp(xs, np.arange(w), k[i]) for i in range(h)])
    return np.stack([np.interp(ys, np.arange(h), rows[:, j]) for j in range(w)], axis=1)


def _convolve(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ndimage.convolve(img, k[..., None], mode="mirror")


# ------------------------------------------------------------------------------------------
# single degradations (float32 [0, 1] HWC in, same out)
# ------------------------------------------------------------------------------------------
def add_blur(img: np.ndarray, sf: int, rng: np.random.Generator, s: BSRSettings = FULL) -> np.ndarray:
    wd2 = (4.0 + sf) / s.blur_scale
    wd = (2.0 + 0.2 * sf) / s.blur_scale
    if rng.random() < 0.5:
        a, lo, hi = s.aniso_ksize
        l1, l2 = wd2 * rng.random(), wd2 * rng.random()
        k = anisotropic_gaussian(a * int(rng.integers(lo, hi + 1)) + 3, rng.random() * np.pi, l1, l2)
    else:
        a, lo, hi = s.iso_ksize
        k = isotropic_gaussian(a * int(rng.integers(lo, hi + 1)) + 3, wd * rng.random())
    return _convolve(img, k)


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, levels: tuple[int, int] = (2, 25)) -> np.ndarray:
    noise_level = int(rng.integers(levels[0], levels[1] + 1))
    rnum = rng.random()
    if rnum > 0.6:  # color
        img = img + rng.normal(0, noise_level / 255.0, img.shape).astype(np.float32)
    elif rnum < 0.4:  # grayscale
        img = img + rng.normal(0, noise_level / 255.0, (*img.shape[:2], 1)).astype(np.float32)
    else:  # channel-correlated
        L = levels[1] / 255.0
        D = np.diag(rng.random(3))
        U = orth(rng.random((3, 3)))
        cov = np.abs(L ** 2 * (U.T @ D @ U))
        img = img + rng.multivariate_normal(np.zeros(3), cov, img.shape[:2]).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def add_jpeg_noise(img: np.ndarray, rng: np.random.Generator, quality: tuple[int, int] = (30, 95)) -> np.ndarray:
    return util.jpeg_roundtrip(img, int(rng.integers(quality[0], quality[1] + 1)))


def _random_resize(img: np.ndarray, wh: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    flag = int(rng.choice([util.INTER_LINEAR, util.INTER_CUBIC, util.INTER_AREA]))
    return np.clip(util.cv_resize(img, wh, flag), 0.0, 1.0)


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------
def degrade(image: np.ndarray, sf: int = 4, rng: Optional[np.random.Generator | int] = None,
            settings: BSRSettings = FULL, isp_model: Any = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (H // sf, W // sf, 3) uint8 low-resolution image."""
    rng = as_rng(rng)
    s = settings
    img = util.uint2single(image)
    h1, w1 = img.shape[:2]
    img = img[: h1 - h1 % sf, : w1 - w1 % sf].copy()  # mod crop
    if min(img.shape[:2]) < sf:
        raise ValueError(f"image {image.shape[:2]} smaller than the scale factor {sf}")

    if sf == 4 and rng.random() < s.scale2_p:  # downsample1
        if rng.random() < 0.5:
            img = _random_resize(img, (img.shape[1] // 2, img.shape[0] // 2), rng)
        else:
            img = np.clip(util.imresize_np(img, 1 / 2, True), 0.0, 1.0)
        sf = 2

    order = list(rng.permutation(7))
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # keep downsample3 after downsample2
        order[i2], order[i3] = order[i3], order[i2]

    a = b = 0
    for step in order:
        if step == 0 or (step == 1 and s.second_blur):
            img = add_blur(img, sf, rng, s)
        elif step == 2:  # downsample2
            a, b = img.shape[1], img.shape[0]
            if rng.random() < s.resize_down2_p:
                sf1 = rng.uniform(1, 2 * sf)
                img = _random_resize(img, (max(1, int(a / sf1)), max(1, int(b / sf1))), rng)
            else:
                k = shift_pixel(isotropic_gaussian(25, rng.uniform(0.1, 0.6 * sf)), sf)
                img = _convolve(img, k / k.sum())[0::sf, 0::sf]
            img = np.clip(img, 0.0, 1.0)
        elif step == 3:  # downsample3: exactly 1/sf of the size before downsample2
            img = _random_resize(img, (int(a / sf), int(b / sf)), rng)
        elif step == 4:
            img = add_gaussian_noise(img, rng, s.noise_levels)
        elif step == 5:
            if rng.random() < s.jpeg_p:
                img = add_jpeg_noise(img, rng, s.jpeg_quality)
        elif step == 6 and isp_model is not None:  # camera sensor noise (optional)
            if rng.random() < 0.25:
                import torch
                with torch.no_grad():
                    img, _ = isp_model.forward(img.copy(), img.copy())

    img = add_jpeg_noise(img, rng, s.jpeg_quality)  # final JPEG
    return util.single2uint(img)


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None,
                               rng: Optional[np.random.Generator | int] = None) -> dict:
    """Original interface: uint8 HWC in, {"image": uint8 LR} out (full BSRGAN settings)."""
    return {"image": degrade(image, sf=sf, rng=rng, settings=FULL, isp_model=isp_model)}
