"""Low-resolution inputs for super-resolution data: BSRGAN degradations and plain resizes.

`make_degradation(name, sf, lr_size)` returns `fn(image_uint8_hwc, rng) -> lr_uint8_hwc` for
the names `ImageNetSR(degradation=...)` accepts:

* "bsrgan", "bsrgan_light": the BSRGAN pipeline (`bsrgan.py`, `bsrgan_light.py`), output H / sf;
* "pil_nearest", "pil_bilinear", "pil_bicubic", "pil_box", "pil_hamming", "pil_lanczos":
  PIL resize of the smaller side to `lr_size` (antialiased, as torchvision's resize of a PIL image);
* "cv_nearest", "cv_bilinear", "cv_bicubic", "cv_area", "cv_lanczos": OpenCV `cv2.resize`
  semantics (no antialiasing) of the smaller side to `lr_size`, without needing OpenCV.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ldm.data.degradation import utils_image
from ldm.data.degradation.bsrgan import degradation_bsrgan_variant as degradation_fn_bsr
from ldm.data.degradation.bsrgan import degrade
from ldm.data.degradation.bsrgan_light import LIGHT
from ldm.data.degradation.bsrgan_light import degradation_bsrgan_variant as degradation_fn_bsr_light

Degradation = Callable[[np.ndarray, Optional[np.random.Generator]], np.ndarray]

PIL_FILTERS = {
    "pil_nearest": Image.NEAREST, "pil_bilinear": Image.BILINEAR, "pil_bicubic": Image.BICUBIC,
    "pil_box": Image.BOX, "pil_hamming": Image.HAMMING, "pil_lanczos": Image.LANCZOS,
}
CV_FLAGS = {
    "cv_nearest": utils_image.INTER_NEAREST, "cv_bilinear": utils_image.INTER_LINEAR,
    "cv_bicubic": utils_image.INTER_CUBIC, "cv_area": utils_image.INTER_AREA, "cv_lanczos": utils_image.INTER_LANCZOS4,
}
NAMES = ("bsrgan", "bsrgan_light", *PIL_FILTERS, *CV_FLAGS)


def _smaller_side_hw(hw: tuple[int, int], size: int) -> tuple[int, int]:
    h, w = hw
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _bsrgan(img: np.ndarray, rng: Optional[np.random.Generator] = None, *, sf: int, light: bool) -> np.ndarray:
    return degrade(img, sf=sf, rng=rng, settings=LIGHT) if light else degrade(img, sf=sf, rng=rng)


def _pil(img: np.ndarray, rng: Optional[np.random.Generator] = None, *, size: int, resample: int) -> np.ndarray:
    h, w = _smaller_side_hw(img.shape[:2], size)
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def _cv(img: np.ndarray, rng: Optional[np.random.Generator] = None, *, size: int, flag: int) -> np.ndarray:
    h, w = _smaller_side_hw(img.shape[:2], size)
    return utils_image.cv_resize(img, (w, h), flag)


def make_degradation(name: str, sf: int, lr_size: int) -> Degradation:
    """The LR-image function for a degradation name (see module docstring); picklable."""
    if name in ("bsrgan", "bsrgan_light"):
        return partial(_bsrgan, sf=sf, light=name == "bsrgan_light")
    if name in PIL_FILTERS:
        return partial(_pil, size=lr_size, resample=PIL_FILTERS[name])
    if name in CV_FLAGS:
        return partial(_cv, size=lr_size, flag=CV_FLAGS[name])
    raise ValueError(f"unknown degradation '{name}'; expected one of {', '.join(NAMES)}")


__all__ = ["make_degradation", "degradation_fn_bsr", "degradation_fn_bsr_light", "NAMES", "PIL_FILTERS", "CV_FLAGS"]
