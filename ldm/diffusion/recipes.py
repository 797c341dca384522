"""Opt-in training recipes of the diffusion objective (none of them in the original; all off by default).

* `TrainingNoise`: offset noise (eps + offset * randn(B, C, 1, 1), diffusers' `noise_offset`)
  and input perturbation (the network sees q_sample(x0, eps + gamma * randn_like(eps)) while
  the target stays eps; Ning et al. 2023, diffusers' `input_perturbation`). Disabled, they draw
  nothing beyond the original's one `randn_like`, so the random stream is the original's.
* `build_weighting`: the loss-weighting seam's config entry (`loss_weighting: {target, params}`,
  or the short form `snr_gamma: 5.0` = min-SNR-gamma) -> a callable w(t, alphas_cumprod,
  parameterization) -> (B,) multiplying the per-sample simple loss (`ldm.diffusion.weighting`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

Tensor = torch.Tensor
LossWeighting = Callable[[Tensor, Tensor, str], Tensor]

MIN_SNR_TARGET = "ldm.diffusion.weighting.MinSNRWeighting"


@dataclass(frozen=True)
class TrainingNoise:
    noise_offset: float = 0.0          # scale of the per-(sample, channel) constant added to eps
    input_perturbation: float = 0.0    # scale of the extra noise on the network input only

    def draw(self, x_start: Tensor) -> Tensor:
        """The training noise eps (the regression target of eps models)."""
        noise = torch.randn_like(x_start)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                (x_start.shape[0], x_start.shape[1], *([1] * (x_start.ndim - 2))), device=x_start.device,
                dtype=x_start.dtype)
        return noise

    def perturb(self, noise: Tensor) -> Tensor:
        """The noise x_t is built from (the target stays `noise`)."""
        if not self.input_perturbation:
            return noise
        return noise + self.input_perturbation * torch.randn_like(noise)


def build_weighting(loss_weighting: Optional[Mapping[str, Any]] = None,
                    snr_gamma: Optional[float] = None) -> Optional[LossWeighting]:
    """None (the original objective) unless `loss_weighting` or `snr_gamma` is set."""
    if loss_weighting is not None and snr_gamma is not None:
        raise ValueError("set either loss_weighting or its short form snr_gamma, not both")
    if snr_gamma is not None:
        loss_weighting = {"target": MIN_SNR_TARGET, "params": {"gamma": float(snr_gamma)}}
    if loss_weighting is None:
        return None
    from ldm.diffusion.weighting import build_loss_weighting
    return build_loss_weighting(loss_weighting)
