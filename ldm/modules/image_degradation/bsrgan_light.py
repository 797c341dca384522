"""The original `ldm.modules.image_degradation.bsrgan_light`: the BSRGAN functions with the light
settings LDM's `bsr_sr` model was trained with (one blur step with 4x narrower kernels, noise
sigma 1-2 / 255, JPEG quality 80-95; see `ldm.data.degradation.bsrgan_light`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ldm.data._image import as_rng
from ldm.data.degradation import bsrgan as _ours
from ldm.data.degradation.bsrgan_light import LIGHT
from ldm.modules.image_degradation import bsrgan as _full
from ldm.modules.image_degradation.bsrgan import (  # noqa: F401  (the same functions in both modules)
    Rng, add_Gaussian_noise, add_Poisson_noise, add_resize, add_sharpening, add_speckle_noise, analytic_kernel,
    anisotropic_Gaussian, bicubic_degradation, blur, classical_degradation, dpsr_degradation, fspecial,
    fspecial_gaussian, fspecial_laplacian, gen_kernel, gm_blur_kernel, modcrop_np, random_crop, shift_pixel,
    srmd_degradation)
from ldm.modules.image_degradation.bsrgan import util  # noqa: F401

SETTINGS = LIGHT


def add_blur(img: np.ndarray, sf: int = 4, *, rng: Rng = None) -> np.ndarray:
    return _ours.add_blur(img, sf, as_rng(rng), LIGHT)


def add_JPEG_noise(img: np.ndarray, *, rng: Rng = None) -> np.ndarray:
    return _ours.add_jpeg_noise(img, as_rng(rng), LIGHT.jpeg_quality)


def degradation_bsrgan(img: np.ndarray, sf: int = 4, lq_patchsize: int = 72, isp_model: Any = None, *,
                       rng: Rng = None) -> tuple[np.ndarray, np.ndarray]:
    return _full.degradation_bsrgan(img, sf, lq_patchsize, isp_model, rng=rng, _settings=LIGHT)


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None, *, rng: Rng = None) -> dict:
    """uint8 HWC in, {"image": uint8 LR} out, light settings (the bsr_sr training data)."""
    return {"image": _ours.degrade(image, sf=sf, rng=rng, settings=LIGHT, isp_model=isp_model)}
