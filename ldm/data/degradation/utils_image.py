"""Image helpers for the degradation pipeline, with no OpenCV dependency.

* `uint2single` / `single2uint`: uint8 [0, 255] <-> float32 [0, 1];
* `imresize_np`: MATLAB `imresize` (bicubic, a = -0.5, antialiased when shrinking), the
  resize BSRGAN's authors used (`utils_image.imresize_np` in their code);
* `cv_resize`: OpenCV `cv2.resize` semantics (half-pixel centers, no antialiasing) for the
  flags BSRGAN draws from (0 nearest, 1 linear, 2 cubic a = -0.75, 3 area, 4 lanczos),
  computed with `torch.nn.functional.interpolate` (lanczos falls back to PIL's, which is
  antialiased);
* `jpeg_roundtrip`: encode / decode with PIL at a JPEG quality (4:2:0 chroma, as cv2's default).
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

INTER_NEAREST, INTER_LINEAR, INTER_CUBIC, INTER_AREA, INTER_LANCZOS4 = 0, 1, 2, 3, 4


def uint2single(img: np.ndarray) -> np.ndarray:
    return np.float32(img / 255.0)


def single2uint(img: np.ndarray) -> np.ndarray:
    return np.uint8((img.clip(0, 1) * 255.0).round())


# ------------------------------------------------------------------------------------------
# MATLAB imresize (bicubic)
# ------------------------------------------------------------------------------------------
def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_matrix(in_len: int, out_len: int, scale: float, antialiasing: bool) -> np.ndarray:
    """(out_len, in_len) weights of MATLAB's bicubic resize along one axis (symmetric borders)."""
    kernel_width = 4.0
    shrink = scale < 1 and antialiasing
    if shrink:
        kernel_width /= scale
    j = np.arange(1, out_len + 1, dtype=np.float64)
    u = j / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate of each output pixel
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # 1-based input indices
    dist = u[:, None] - idx
    w = scale * _cubic(dist * scale) if shrink else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    # symmetric ("mirror with edge repeat") border handling, 0-based
    i0 = idx - 1
    period = 2 * in_len
    i0 = np.mod(i0, period)
    i0 = np.where(i0 >= in_len, period - 1 - i0, i0).astype(np.int64)
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), i0.ravel()), w.ravel())
    return mat


def imresize_np(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """MATLAB-style bicubic resize of an (H, W[, C]) float image by `scale` (output ceil(H * scale))."""
    h, w = img.shape[:2]
    out_h, out_w = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    mh = _resize_matrix(h, out_h, scale, antialiasing)
    mw = _resize_matrix(w, out_w, scale, antialiasing)
    x = img.astype(np.float64)
    out = np.einsum("oh,hw...->ow...", mh, x)
    out = np.einsum("pw,ow...->op...", mw, out)
    return out.astype(img.dtype if img.dtype.kind == "f" else np.float32)


# ------------------------------------------------------------------------------------------
# cv2.resize semantics
# ------------------------------------------------------------------------------------------
def cv_resize(img: np.ndarray, wh: tuple[int, int], interpolation: int) -> np.ndarray:
    """`cv2.resize(img, (w, h), interpolation=...)` for (H, W, C) / (H, W) float or uint8 arrays."""
    w, h = int(wh[0]), int(wh[1])
    if w < 1 or h < 1:
        raise ValueError(f"resize target {wh} is empty (input {img.shape[:2]})")
    if img.shape[:2] == (h, w):
        return img.copy()
    if interpolation == INTER_LANCZOS4:
        return _pil_resize(img, (w, h), Image.LANCZOS)
    is_uint8 = img.dtype == np.uint8
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    x = x[..., None] if x.ndim == 2 else x
    x = x.permute(2, 0, 1)[None]
    upscaling = h >= img.shape[0] and w >= img.shape[1]
    if interpolation == INTER_NEAREST:
        y = F.interpolate(x, size=(h, w), mode="nearest")
    elif interpolation == INTER_LINEAR or (interpolation == INTER_AREA and upscaling):
        y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    elif interpolation == INTER_CUBIC:
        y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    elif interpolation == INTER_AREA:
        y = F.interpolate(x, size=(h, w), mode="area")
    else:
        raise ValueError(f"unknown interpolation flag {interpolation}")
    out = y[0].permute(1, 2, 0).numpy()
    out = out[..., 0] if img.ndim == 2 else out
    if is_uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out.astype(img.dtype)


def _pil_resize(img: np.ndarray, wh: tuple[int, int], resample: int) -> np.ndarray:
    if img.dtype == np.uint8:
        return np.asarray(Image.fromarray(img).resize(wh, resample=resample))
    chans = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(wh, resample=resample))
             for c in range(img.shape[2])] if img.ndim == 3 else None
    if chans is None:
        return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(wh, resample=resample))
    return np.stack(chans, axis=-1).astype(img.dtype)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress an (H, W, 3) float [0, 1] image at `quality` and decode it again (float32)."""
    buf = io.BytesIO()
    Image.fromarray(single2uint(img)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as dec:
        return uint2single(np.asarray(dec.convert("RGB")))
