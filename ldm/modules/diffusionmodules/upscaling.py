"""Low-resolution conditioning for the SD2 x4 upscaler (`low_scale_config`).

The low-res image is concatenated to the latent after being noised with its own forward
process at a random level (noise augmentation); the level is passed to the UNet as its
class label (`c_adm`). Only the forward-process buffers of the schedule are registered
(`low_scale_model.betas` ... `low_scale_model.sqrt_recipm1_alphas_cumprod`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn as nn

from ldm.diffusion import objectives
from ldm.diffusion.schedule import FORWARD_BUFFERS, make_beta_schedule, schedule_tensors


class AbstractLowScaleModel(nn.Module):
    """Base: identity on the low-res image, optionally owning a forward noise schedule."""

    def __init__(self, noise_schedule_config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        # noise_schedule_config: kwargs of register_schedule (beta_schedule, timesteps, linear_start, ...)
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                          linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                   cosine_s=cosine_s)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        for name, value in schedule_tensors(betas, parameterization=None, names=FORWARD_BUFFERS).items():
            self.register_buffer(name, value)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return objectives.q_sample(self, x_start, t, noise)

    def forward(self, x: torch.Tensor):
        return x, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """No noise augmentation; the noise level is always 0."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x: torch.Tensor):
        return x, torch.zeros(x.shape[0], device=x.device).long()


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """Noise the low-res image to a level drawn uniformly from [0, max_noise_level) (or given)."""

    def __init__(self, noise_schedule_config: Mapping[str, Any], max_noise_level: int = 1000, to_cuda: bool = False):
        # noise_schedule_config: the image-space forward schedule used for the augmentation
        # max_noise_level: levels are drawn from [0, max_noise_level)
        # to_cuda: accepted for config compatibility; devices follow the module
        super().__init__(noise_schedule_config=noise_schedule_config)
        self.max_noise_level = max_noise_level

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None):
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(f"noise_level must be a tensor, got {type(noise_level).__name__}")
        z = self.q_sample(x, noise_level)
        return z, noise_level
