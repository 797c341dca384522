"""The original `ldm.modules.image_degradation.bsrgan` interface (BSRGAN, Zhang et al. 2021): the
kernels, single degradations and pipelines at their original names and signatures, over our
implementation in `ldm.data.degradation` (what the super-resolution datasets use).

Images are HWC float32 in [0, 1] ("single") unless a docstring says uint8. Randomness: every
random function takes a keyword `rng` (a numpy Generator or a seed; None: a fresh OS-seeded
one) instead of drawing from numpy's global state, so a seed reproduces a degradation.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.linalg import orth

from ldm.data._image import as_rng
from ldm.data.degradation import bsrgan as _ours
from ldm.data.degradation import utils_image as _resize
from ldm.data.degradation.bsrgan import FULL, BSRSettings
from ldm.modules.image_degradation import utils_image as util

Rng = Optional[np.random.Generator | int]
SETTINGS: BSRSettings = FULL   # bsrgan_light rebinds its own


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
def modcrop_np(img: np.ndarray, sf: int) -> np.ndarray:
    """Crop H and W to multiples of sf."""
    h, w = img.shape[:2]
    return np.copy(img[: h - h % sf, : w - w % sf, ...])


def analytic_kernel(k: np.ndarray) -> np.ndarray:
    """The X4 kernel equivalent to applying the X2 kernel `k` twice (KernelGAN)."""
    n = k.shape[0]
    big = np.zeros((3 * n - 2, 3 * n - 2))
    for r in range(n):
        for c in range(n):
            big[2 * r:2 * r + n, 2 * c:2 * c + n] += k[r, c] * k
    crop = n // 2
    cropped = big[crop:-crop, crop:-crop]
    return cropped / cropped.sum()


def anisotropic_Gaussian(ksize: int = 15, theta: float = np.pi, l1: float = 6, l2: float = 6) -> np.ndarray:
    """Gaussian kernel with covariance eigenvalues l1, l2, rotated by theta."""
    return _ours.anisotropic_gaussian(ksize, theta, l1, l2)


def gm_blur_kernel(mean: Any, cov: Any, size: int = 15) -> np.ndarray:
    """A size x size kernel of the 2D normal density N(mean, cov), normalised."""
    from scipy.stats import multivariate_normal
    center = size / 2.0 + 0.5
    r = np.arange(size) - center + 1
    cx, cy = np.meshgrid(r, r)
    k = multivariate_normal.pdf(np.stack([cx, cy], -1), mean=mean, cov=cov)
    return k / np.sum(k)


def shift_pixel(x: np.ndarray, sf: int, upper_left: bool = True) -> np.ndarray:
    """Shift an (H, W[, C]) array by (sf - 1) / 2 pixels (bilinear), towards the upper left or not."""
    h, w = x.shape[:2]
    shift = (sf - 1) * 0.5 * (1 if upper_left else -1)
    xs, ys = np.clip(np.arange(w) + shift, 0, w - 1), np.clip(np.arange(h) + shift, 0, h - 1)

    def one(ch: np.ndarray) -> np.ndarray:
        rows = np.stack([np.interp(xs, np.arange(w), ch[i]) for i in range(h)])
        return np.stack([np.interp(ys, np.arange(h), rows[:, j]) for j in range(w)], axis=1)
    if x.ndim == 2:
        return one(x)
    return np.stack([one(x[..., c]) for c in range(x.shape[-1])], axis=-1)


def blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Blur each image of x (N, C, H, W) with its own kernel k (N, 1, h, w), replicate padding."""
    n, c = x.shape[:2]
    p1, p2 = (k.shape[-2] - 1) // 2, (k.shape[-1] - 1) // 2
    x = F.pad(x, (p1, p2, p1, p2), mode="replicate")
    k = k.repeat(1, c, 1, 1).view(-1, 1, k.shape[2], k.shape[3])
    x = F.conv2d(x.view(1, -1, x.shape[2], x.shape[3]), k, groups=n * c)
    return x.view(n, c, x.shape[2], x.shape[3])


def gen_kernel(k_size: np.ndarray = np.array([15, 15]), scale_factor: np.ndarray = np.array([4, 4]),
               min_var: float = 0.6, max_var: float = 10.0, noise_level: float = 0, *, rng: Rng = None) -> np.ndarray:
    """A random anisotropic Gaussian kernel centred for downscaling by scale_factor, with
    multiplicative noise (KernelGAN's kernel model)."""
    rng = as_rng(rng)
    l1, l2 = min_var + rng.random() * (max_var - min_var), min_var + rng.random() * (max_var - min_var)
    theta = rng.random() * np.pi
    noise = -noise_level + rng.random(tuple(k_size)) * noise_level * 2
    q = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inv_sigma = np.linalg.inv(q @ np.diag([l1, l2]) @ q.T)
    mu = k_size // 2 - 0.5 * (scale_factor - 1)
    xx, yy = np.meshgrid(range(k_size[0]), range(k_size[1]))
    zz = np.stack([xx, yy], -1) - mu
    raw = np.exp(-0.5 * np.einsum("...i,ij,...j->...", zz, inv_sigma, zz)) * (1 + noise)
    return raw / np.sum(raw)


def fspecial_gaussian(hsize: Any, sigma: float) -> np.ndarray:
    """MATLAB fspecial('gaussian', hsize, sigma); hsize an int or [h, w]."""
    h, w = (hsize, hsize) if np.isscalar(hsize) else hsize
    y, x = np.meshgrid(np.arange(h) - (h - 1) / 2.0, np.arange(w) - (w - 1) / 2.0, indexing="ij")
    k = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    k[k < np.finfo(float).eps * k.max()] = 0
    s = k.sum()
    return k / s if s != 0 else k


def fspecial_laplacian(alpha: float) -> np.ndarray:
    """MATLAB fspecial('laplacian', alpha)."""
    alpha = max(0.0, min(alpha, 1.0))
    h1, h2 = alpha / (alpha + 1), (1 - alpha) / (alpha + 1)
    return np.array([[h1, h2, h1], [h2, -4 / (alpha + 1), h2], [h1, h2, h1]])


def fspecial(filter_type: str, *args: Any, **kwargs: Any) -> np.ndarray:
    if filter_type == "gaussian":
        return fspecial_gaussian(*args, **kwargs)
    if filter_type == "laplacian":
        return fspecial_laplacian(*args, **kwargs)
    raise ValueError(f"filter_type must be 'gaussian' or 'laplacian', not {filter_type!r}")


# ----------------------------------------------------------------------------------------
# classical degradation models (kernel k, scale sf)
# ----------------------------------------------------------------------------------------
def bicubic_degradation(x: np.ndarray, sf: int = 3) -> np.ndarray:
    return util.imresize_np(x, scale=1 / sf)


def srmd_degradation(x: np.ndarray, k: np.ndarray, sf: int = 3) -> np.ndarray:
    """Blur (circular borders), then bicubic downsampling (SRMD)."""
    return bicubic_degradation(ndimage.convolve(x, np.expand_dims(k, axis=2), mode="wrap"), sf=sf)


def dpsr_degradation(x: np.ndarray, k: np.ndarray, sf: int = 3) -> np.ndarray:
    """Bicubic downsampling, then blur (circular borders) (DPSR)."""
    return ndimage.convolve(bicubic_degradation(x, sf=sf), np.expand_dims(k, axis=2), mode="wrap")


def classical_degradation(x: np.ndarray, k: np.ndarray, sf: int = 3) -> np.ndarray:
    """Blur (circular borders), then take every sf-th pixel."""
    return ndimage.convolve(x, np.expand_dims(k, axis=2), mode="wrap")[0::sf, 0::sf, ...]


def _gaussian_blur(img: np.ndarray, ksize: int) -> np.ndarray:
    """cv2.GaussianBlur(img, (ksize, ksize), 0): sigma from the size, reflect-101 borders."""
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    k = fspecial_gaussian(ksize, sigma)
    k = k[..., None] if img.ndim == 3 else k
    return ndimage.convolve(img, k, mode="mirror")


def add_sharpening(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: int = 10) -> np.ndarray:
    """Unsharp masking, applied where the detail exceeds `threshold` (in 1/255), softly masked."""
    if radius % 2 == 0:
        radius += 1
    residual = img - _gaussian_blur(img, radius)
    mask = (np.abs(residual) * 255 > threshold).astype("float32")
    soft_mask = _gaussian_blur(mask, radius)
    sharp = np.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# ----------------------------------------------------------------------------------------
# single random degradations
# ----------------------------------------------------------------------------------------
def add_blur(img: np.ndarray, sf: int = 4, *, rng: Rng = None) -> np.ndarray:
    return _ours.add_blur(img, sf, as_rng(rng), SETTINGS)


def add_resize(img: np.ndarray, sf: int = 4, *, rng: Rng = None) -> np.ndarray:
    """Random rescale: up by U(1, 2) (p 0.2), down by U(0.5 / sf, 1) (p 0.7), else kept."""
    rng = as_rng(rng)
    rnum = rng.random()
    sf1 = rng.uniform(1, 2) if rnum > 0.8 else rng.uniform(0.5 / sf, 1) if rnum < 0.7 else 1.0
    flag = int(rng.choice([_resize.INTER_LINEAR, _resize.INTER_CUBIC, _resize.INTER_AREA]))
    img = _resize.cv_resize(img, (int(sf1 * img.shape[1]), int(sf1 * img.shape[0])), flag)
    return np.clip(img, 0.0, 1.0)


def add_Gaussian_noise(img: np.ndarray, noise_level1: int = 2, noise_level2: int = 25, *, rng: Rng = None) -> np.ndarray:
    return _ours.add_gaussian_noise(img, as_rng(rng), (noise_level1, noise_level2))


def add_speckle_noise(img: np.ndarray, noise_level1: int = 2, noise_level2: int = 25, *, rng: Rng = None) -> np.ndarray:
    """Multiplicative Gaussian noise: color, grayscale or channel-correlated."""
    rng = as_rng(rng)
    level = int(rng.integers(noise_level1, noise_level2 + 1)) / 255.0
    img = np.clip(img, 0.0, 1.0)
    rnum = rng.random()
    if rnum > 0.6:
        img = img + img * rng.normal(0, level, img.shape).astype(np.float32)
    elif rnum < 0.4:
        img = img + img * rng.normal(0, level, (*img.shape[:2], 1)).astype(np.float32)
    else:
        L = noise_level2 / 255.0
        u = orth(rng.random((3, 3)))
        cov = np.abs(L ** 2 * (u.T @ np.diag(rng.random(3)) @ u))
        img = img + img * rng.multivariate_normal([0, 0, 0], cov, img.shape[:2]).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def add_Poisson_noise(img: np.ndarray, *, rng: Rng = None) -> np.ndarray:
    """Shot noise at a random photon count 10^U(2, 4), on RGB or on the luminance."""
    rng = as_rng(rng)
    img = np.clip((img * 255.0).round(), 0, 255) / 255.0
    vals = 10 ** (2 * rng.random() + 2.0)
    if rng.random() < 0.5:
        img = rng.poisson(img * vals).astype(np.float32) / vals
    else:
        gray = np.clip((img[..., :3] @ np.array([0.299, 0.587, 0.114]) * 255.0).round(), 0, 255) / 255.0
        img = img + (rng.poisson(gray * vals).astype(np.float32) / vals - gray)[:, :, None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def add_JPEG_noise(img: np.ndarray, *, rng: Rng = None) -> np.ndarray:
    return _ours.add_jpeg_noise(img, as_rng(rng), SETTINGS.jpeg_quality)


def random_crop(lq: np.ndarray, hq: np.ndarray, sf: int = 4, lq_patchsize: int = 64, *,
                rng: Rng = None) -> tuple[np.ndarray, np.ndarray]:
    """Aligned random crops: lq_patchsize from `lq`, sf times that from `hq`."""
    rng = as_rng(rng)
    h, w = lq.shape[:2]
    top, left = int(rng.integers(0, h - lq_patchsize + 1)), int(rng.integers(0, w - lq_patchsize + 1))
    lq = lq[top:top + lq_patchsize, left:left + lq_patchsize]
    hq = hq[top * sf:(top + lq_patchsize) * sf, left * sf:(left + lq_patchsize) * sf]
    return lq, hq


# ----------------------------------------------------------------------------------------
# pipelines
# ----------------------------------------------------------------------------------------
def degradation_bsrgan(img: np.ndarray, sf: int = 4, lq_patchsize: int = 72, isp_model: Any = None, *,
                       rng: Rng = None, _settings: Optional[BSRSettings] = None) -> tuple[np.ndarray, np.ndarray]:
    """(LQ patch, aligned HQ patch), both float [0, 1], from a float [0, 1] image: the BSRGAN
    pipeline of `degradation_bsrgan_variant` then a random crop. (The input is read at 8 bits,
    like the uint8 image files it comes from; the output is 8-bit-valued after the final JPEG.)"""
    rng = as_rng(rng)
    h1, w1 = img.shape[:2]
    img = modcrop_np(img, sf)
    if img.shape[0] < lq_patchsize * sf or img.shape[1] < lq_patchsize * sf:
        raise ValueError(f"img size ({h1}X{w1}) is too small!")
    hq = img.copy()
    lq = util.uint2single(_ours.degrade(util.single2uint(img), sf=sf, rng=rng, settings=_settings or SETTINGS,
                                        isp_model=isp_model))
    return random_crop(lq, hq, sf, lq_patchsize, rng=rng)


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None, *, rng: Rng = None) -> dict:
    """uint8 HWC in, {"image": uint8 LR} out (what LDM's super-resolution data uses)."""
    return {"image": _ours.degrade(image, sf=sf, rng=rng, settings=SETTINGS, isp_model=isp_model)}


def degradation_bsrgan_plus(img: np.ndarray, sf: int = 4, shuffle_prob: float = 0.5, use_sharp: bool = True,
                            lq_patchsize: int = 64, isp_model: Any = None, *,
                            rng: Rng = None) -> tuple[np.ndarray, np.ndarray]:
    """The extended BSRGAN+ model: sharpening, two rounds of blur / resize / Gaussian, Poisson,
    speckle (and ISP) noise / JPEG, shuffled with probability `shuffle_prob` (noise steps shuffled
    locally otherwise), then a 1/sf resize, a last JPEG and aligned random crops."""
    rng = as_rng(rng)
    h1, w1 = img.shape[:2]
    img = modcrop_np(img, sf)
    if img.shape[0] < lq_patchsize * sf or img.shape[1] < lq_patchsize * sf:
        raise ValueError(f"img size ({h1}X{w1}) is too small!")
    if use_sharp:
        img = add_sharpening(img)
    hq = img.copy()
    if rng.random() < shuffle_prob:
        order = list(rng.permutation(13))
    else:
        order = list(range(13))
        order[2:6] = list(rng.permutation(order[2:6]))
        order[9:13] = list(rng.permutation(order[9:13]))
    for i in order:
        if i in (0, 7):
            img = add_blur(img, sf=sf, rng=rng)
        elif i in (1, 8):
            img = add_resize(img, sf=sf, rng=rng)
        elif i in (2, 9):
            img = add_Gaussian_noise(img, noise_level1=2, noise_level2=25, rng=rng)
        elif i in (3, 10):
            if rng.random() < 0.1:
                img = add_Poisson_noise(img, rng=rng)
        elif i in (4, 11):
            if rng.random() < 0.1:
                img = add_speckle_noise(img, rng=rng)
        elif i in (5, 12):
            if isp_model is not None and rng.random() < 0.1:
                with torch.no_grad():
                    img, hq = isp_model.forward(img.copy(), hq)
        elif i == 6:
            img = add_JPEG_noise(img, rng=rng)
    flag = int(rng.choice([_resize.INTER_LINEAR, _resize.INTER_CUBIC, _resize.INTER_AREA]))
    img = np.clip(_resize.cv_resize(img, (int(hq.shape[1] / sf), int(hq.shape[0] / sf)), flag), 0.0, 1.0)
    img = add_JPEG_noise(img, rng=rng)
    return random_crop(img, hq, sf, lq_patchsize, rng=rng)
