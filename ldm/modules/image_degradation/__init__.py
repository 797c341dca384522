"""The original `ldm.modules.image_degradation` package: BSRGAN degradations (`bsrgan`,
`bsrgan_light`) and image utilities (`utils_image`), over `ldm.data.degradation`."""
from ldm.modules.image_degradation.bsrgan import degradation_bsrgan_variant as degradation_fn_bsr
from ldm.modules.image_degradation.bsrgan_light import degradation_bsrgan_variant as degradation_fn_bsr_light

__all__ = ["degradation_fn_bsr", "degradation_fn_bsr_light"]
