"""The lighter BSRGAN degradation LDM's `bsr_sr` model was trained with ("bsrgan_light").

Same pipeline as `bsrgan.degrade`, with milder settings (as latent-diffusion's
`image_degradation/bsrgan_light.py`): a single blur step with kernel widths divided by 4
(isotropic kernels 5-7 px, anisotropic 5-14 px), downsample2 by resize with probability 0.8,
Gaussian noise sigma 1-2 / 255, JPEG quality 80-95.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ldm.data.degradation.bsrgan import BSRSettings, degrade

LIGHT = BSRSettings(
    second_blur=False,
    blur_scale=4.0,
    aniso_ksize=(1, 2, 11),
    iso_ksize=(1, 2, 4),
    resize_down2_p=0.8,
    noise_levels=(1, 2),
    jpeg_quality=(80, 95),
)


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None,
                               rng: Optional[np.random.Generator | int] = None) -> dict:
    """Original interface: uint8 HWC in, {"image": uint8 LR} out (light settings)."""
    return {"image": degrade(image, sf=sf, rng=rng, settings=LIGHT, isp_model=isp_model)}
