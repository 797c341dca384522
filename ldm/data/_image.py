"""Small helpers every dataset of `ldm.data` shares.

* where data lives: the original classes read paths relative to the working directory
  (`data/lsun/...`); `data_path` keeps that and lets `$LDM_DATA_ROOT` replace the leading
  `data/` so a run can point at another disk without editing configs;
* reading images: `load_image` turns any failure (missing, truncated, not an image) into a
  `BadImage` naming the file; alpha is composited onto white, 16-bit samples are scaled to
  8 bits and images smaller than the training size are upscaled, each counted in
  `IMAGE_FIXES` and logged (1st, 10th, 100th, ... time); `SkipBadImages` makes `__getitem__` log it, count it and move
  to the next index instead of crashing mid-epoch;
* the original preprocessing: smallest side to `size`, then a center or random square crop,
  then `x / 127.5 - 1` as float32, HWC;
* randomness: `process_rng` gives each process / DataLoader worker its own numpy Generator
  derived from torch's seed (which `DataLoader` sets per worker and per epoch), so crops,
  flips and degradations follow `seed_everything` without touching numpy's global state.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("ldm.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".npy")

# PIL resampling filters by the names configs use.
PIL_INTERPOLATION = {
    "nearest": Image.NEAREST,
    "linear": Image.BILINEAR,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
}


class BadImage(Exception):
    """An image file that could not be read; `path` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


# ------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------
def data_path(original: str, data_root: Optional[str] = None) -> str:
    """The original's path `data/<rest>`, moved under `data_root` or `$LDM_DATA_ROOT` if set."""
    root = data_root or os.environ.get("LDM_DATA_ROOT")
    if not root:
        return original
    rest = original[len("data/"):] if original.startswith("data/") else original
    return os.path.join(root, rest)


def read_split_file(path: str, what: str = "relative image paths, one per line") -> list[str]:
    """Non-empty lines of a split / file-list text file; a missing file is named in the error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"split file not found: {path} (expected a text file of {what}; "
            f"set $LDM_DATA_ROOT or data_root= if the data lives elsewhere)")
    with open(path, "r") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def require_nonempty(items: Sequence[Any], where: str, pattern: str) -> None:
    """Raise a clear error for a dataset that found nothing."""
    if len(items) == 0:
        raise RuntimeError(f"empty dataset: no files matching '{pattern}' in {where}")


def list_images(root: str, recursive: bool = True) -> list[str]:
    """Sorted image files under `root` (relative paths)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
        if not recursive:
            break
    found.sort()
    require_nonempty(found, root, "*" + "|*".join(IMAGE_EXTENSIONS))
    return found


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
def load_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an image file or a CelebA-HQ style `.npy` (1, 3, H, W)."""
    try:
        if path.endswith(".npy"):
            arr = np.load(path)
            arr = arr.reshape(arr.shape[-3:]) if arr.ndim == 4 else arr
            if arr.ndim != 3 or arr.shape[0] != 3:
                raise ValueError(f"expected an array (1, 3, H, W) or (3, H, W), got {arr.shape}")
            return np.ascontiguousarray(arr.transpose(1, 2, 0)).astype(np.uint8)
        with Image.open(path) as img:
            img.load()
            return to_rgb8(img, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(path, f"{type(e).__name__}: {e}") from None


def decode_image(data: bytes, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes (tar shards); `name` is used in errors."""
    import io
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb8(img, name)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(name, f"{type(e).__name__}: {e}") from None


# What reading had to change, per kind, in this process (logged at the 1st, 10th, 100th, ... time).
IMAGE_FIXES: dict[str, int] = {}
_FIX_TEXT = {
    "alpha": "has an alpha channel: composited onto a white background",
    "16bit": "has 16-bit (or 32-bit) samples: scaled to 8 bits (x / 257), not clipped",
    "upscaled": "is smaller than the training size: upscaled (bicubic) to it",
}


def note_fix(kind: str, name: str) -> None:
    """Count (and now and then log) a documented change made to an image while reading it."""
    n = IMAGE_FIXES[kind] = IMAGE_FIXES.get(kind, 0) + 1
    if n == 1 or n in (10, 100, 1000, 10000):
        log.warning("image %s %s (%d image(s) so far in this process)", name, _FIX_TEXT[kind], n)


def to_rgb8(img: Image.Image, name: str = "") -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image: alpha is composited onto white, 16/32-bit samples
    are scaled to 8 bits (PIL's convert('RGB') would drop alpha, showing whatever the RGB
    under transparent pixels is, and clip 16-bit values to 255: a white image)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        note_fix("16bit", name)
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        elif img.mode != "F":
            arr = arr / 257.0
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is not opaque
            note_fix("alpha", name)
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
        return np.asarray(rgba.convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class SkipBadImages:
    """Mixin: `self._get_example(i)` may raise `BadImage`; `__getitem__` logs, counts, moves on.

    The replacement is the next readable index (so an epoch may show one image twice).
    `self.skipped` counts skips in this process (each DataLoader worker has its own count).
    """

    skipped: int = 0
    max_consecutive_bad: int = 64

    def _get_example(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)  # type: ignore[arg-type]
        last: Optional[BadImage] = None
        for attempt in range(min(n, self.max_consecutive_bad)):
            try:
                return self._get_example((i + attempt) % n)
            except BadImage as e:
                self.skipped += 1
                last = e
                log.warning("skipping unreadable image %s (%s); %d skipped so far by %s",
                            e.path, e.reason, self.skipped, type(self).__name__)
        raise RuntimeError(f"{type(self).__name__}: {min(n, self.max_consecutive_bad)} consecutive "
                           f"unreadable images starting at index {i}; last: {last}")


# ------------------------------------------------------------------------------------------
# geometry (HWC uint8 arrays)
# ------------------------------------------------------------------------------------------
def resize_to(img: np.ndarray, hw: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """Resize an (H, W, C) uint8 (or (H, W) label) array to `hw` with a PIL filter."""
    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        raise ValueError(f"resize_to expects 1, 3 or 4 channels, got {img.shape}")
    pil = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    out = np.asarray(pil.resize((w, h), resample=resample))
    return out[..., None] if img.ndim == 3 and img.shape[2] == 1 else out


def smallest_side_to(img: np.ndarray, size: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """Scale so that the smaller side equals `size` (albumentations `SmallestMaxSize`)."""
    h, w = img.shape[:2]
    scale = size / min(h, w)
    if scale > 1:
        note_fix("upscaled", f"of {w}x{h}")
    hw = (size, max(size, int(round(w * scale)))) if h <= w else (max(size, int(round(h * scale))), size)
    return resize_to(img, hw, resample)


def crop_box(hw: tuple[int, int], crop: tuple[int, int], rng: Optional[np.random.Generator]) -> tuple[int, int]:
    """Top-left corner of a `crop` window in an image of size `hw`: centered, or random with `rng`."""
    (h, w), (ch, cw) = hw, crop
    if ch > h or cw > w:
        raise ValueError(f"crop {crop} larger than image {hw}: resize first (e.g. smallest_side_to), or use "
                         f"a dataset `size` no larger than the smallest image")
    if rng is None:
        return (h - ch) // 2, (w - cw) // 2
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))


def crop(img: np.ndarray, top: int, left: int, ch: int, cw: int) -> np.ndarray:
    return img[top:top + ch, left:left + cw]


def square_crop(img: np.ndarray, size: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """A `size` x `size` crop: centered when `rng` is None, else uniformly random."""
    top, left = crop_box(img.shape[:2], (size, size), rng)
    return crop(img, top, left, size, size)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the original's `x / 127.5 - 1`."""
    return (img / 127.5 - 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# randomness
# ------------------------------------------------------------------------------------------
_RNGS: dict[tuple[int, int], np.random.Generator] = {}


def process_rng() -> np.random.Generator:
    """numpy Generator of this process / DataLoader worker, seeded from `torch.initial_seed()`.

    DataLoader gives every worker `base_seed + worker_id` with a fresh base seed per epoch
    (from torch's generator, hence from `seed_everything`), so workers never share a stream.
    """
    key = (os.getpid(), torch.initial_seed())
    rng = _RNGS.get(key)
    if rng is None:
        _RNGS.clear()
        rng = _RNGS[key] = np.random.default_rng(torch.initial_seed() % (2 ** 63))
    return rng


def as_rng(rng: Optional[np.random.Generator | int]) -> np.random.Generator:
    """A Generator from a Generator, a seed, or None (fresh, OS-seeded)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
