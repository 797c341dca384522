"""Per-timestep loss weightings: the factor multiplying each sample's simple loss.

With x_t = alpha_t x0 + sigma_t eps (alpha_t^2 = abar_t, sigma_t^2 = 1 - abar_t) and
SNR_t = abar_t / (1 - abar_t), the squared errors of the three network targets at the same
prediction are proportional (x0_hat, eps_hat, v_hat all derived from one another at x_t):

    ||eps - eps_hat||^2 = SNR       ||x0 - x0_hat||^2
    ||v   - v_hat||^2   = (SNR + 1) ||x0 - x0_hat||^2       (v = alpha eps - sigma x0)

So a weighting defined on one target's loss is converted to another's by
w_b = w_a * f_a / f_b with f_x0 = 1, f_eps = SNR, f_v = SNR + 1 (`convert`). Each class below
states its weight on its native target and gives the closed form for all three.

Weightings are chosen in YAML (`build_loss_weighting`): `snr_gamma: 5.0` (min-SNR) or a
`{target, params}` mapping naming any `LossWeighting` subclass. None keeps the original's
unweighted simple loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from ldm.diffusion.schedule import PARAMETERIZATIONS

Tensor = torch.Tensor


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """SNR_t = abar_t / (1 - abar_t) at the timesteps t (B,), float64."""
    a = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
    return a / (1 - a)


def target_factor(snr_t: Tensor, parameterization: str) -> Tensor:
    """f_p with ||target_p error||^2 = f_p ||x0 error||^2 (see the module notes)."""
    if parameterization == "x0":
        return torch.ones_like(snr_t)
    if parameterization == "eps":
        return snr_t
    if parameterization == "v":
        return snr_t + 1
    raise NotImplementedError(f"parameterization '{parameterization}' not supported (expected {PARAMETERIZATIONS})")


def convert(weight: Tensor, snr_t: Tensor, source: str, target: str) -> Tensor:
    """A weight on the `source` target's loss -> the same weighting on the `target` target's loss."""
    return weight * target_factor(snr_t, source) / target_factor(snr_t, target)


class LossWeighting:
    """Base class: `weighting(t, alphas_cumprod, parameterization) -> (B,)` weights.

    Subclasses implement `weight(snr_t, parameterization)` on float64 SNRs; the result is
    returned in the dtype of `alphas_cumprod` (float32 for the registered buffers)."""

    def weight(self, snr_t: Tensor, parameterization: str) -> Tensor:
        raise NotImplementedError

    def __call__(self, t: Tensor, alphas_cumprod: Tensor, parameterization: str) -> Tensor:
        if parameterization not in PARAMETERIZATIONS:
            raise NotImplementedError(f"parameterization '{parameterization}' not supported "
                                      f"(expected {PARAMETERIZATIONS})")
        w = self.weight(snr(t, alphas_cumprod), parameterization)
        return w.to(alphas_cumprod.dtype if alphas_cumprod.is_floating_point() else torch.float32)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023, Eq. 7): min(SNR, gamma) on the x0 loss, i.e.

        x0: min(SNR, gamma)    eps: min(SNR, gamma) / SNR    v: min(SNR, gamma) / (SNR + 1)

    (eps at SNR = 0, a zero-terminal-SNR step: the limit 1.)"""

    def __init__(self, gamma: float = 5.0):
        if gamma <= 0:
            raise ValueError(f"MinSNRWeighting: gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)     # the SNR above which the x0 loss stops growing (paper: 5)

    def weight(self, snr_t: Tensor, parameterization: str) -> Tensor:
        if parameterization == "eps":     # = min(1, gamma / SNR), finite at SNR = 0
            return torch.clamp(self.gamma / snr_t, max=1.0)
        return convert(torch.clamp(snr_t, max=self.gamma), snr_t, "x0", parameterization)


class P2Weighting(LossWeighting):
    """Perception-prioritized weighting (Choi et al. 2022, Eq. 8): 1 / (k + SNR)^gamma on the
    eps loss (their simple loss), i.e.

        eps: (k + SNR)^-gamma    x0: SNR (k + SNR)^-gamma    v: SNR / (SNR + 1) (k + SNR)^-gamma

    gamma = 0 is the unweighted eps loss; the paper uses gamma in {0.5, 1}, k = 1."""

    def __init__(self, gamma: float = 1.0, k: float = 1.0):
        self.gamma = float(gamma)     # how strongly high-SNR (nearly clean) steps are down-weighted
        self.k = float(k)             # keeps the weight finite as SNR -> 0

    def weight(self, snr_t: Tensor, parameterization: str) -> Tensor:
        return convert((self.k + snr_t) ** -self.gamma, snr_t, "eps", parameterization)


class EDMWeighting(LossWeighting):
    """EDM's lambda(sigma) (Karras et al. 2022, Table 1) on the x0 loss, with the VE noise level
    sigma^2 = 1 / SNR of our x_t / alpha_t = x0 + sigma eps:

        lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = SNR + 1 / sigma_data^2      (x0)
        eps: 1 + 1 / (sigma_data^2 SNR)       v: (SNR + 1 / sigma_data^2) / (SNR + 1)

    (for sigma_data = 1 the v loss is unweighted: v-prediction is EDM's weighting). For eps the
    weight diverges at SNR = 0 (zero-terminal-SNR schedules need the v target anyway)."""

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"EDMWeighting: sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)   # the data's standard deviation (EDM: 0.5 for images in [-1, 1])

    def weight(self, snr_t: Tensor, parameterization: str) -> Tensor:
        inv_sd2 = 1.0 / self.sigma_data ** 2
        if parameterization == "eps":
            return 1.0 + inv_sd2 / snr_t
        return convert(snr_t + inv_sd2, snr_t, "x0", parameterization)


def build_loss_weighting(spec: Any) -> Optional[LossWeighting]:
    """A weighting from a config entry: None (unweighted, the original), a LossWeighting,
    `{"snr_gamma": g}` (min-SNR-g; g None = unweighted) or `{target: ..., params: {...}}`."""
    if spec is None or isinstance(spec, LossWeighting):
        return spec
    if isinstance(spec, Mapping):
        if "target" in spec:
            from ldm.util import instantiate_from_config
            obj = instantiate_from_config(spec)
            if not isinstance(obj, LossWeighting):
                raise TypeError(f"loss weighting target {spec['target']!r} built a {type(obj).__name__}, "
                                f"not a ldm.diffusion.weighting.LossWeighting")
            return obj
        if set(spec) == {"snr_gamma"}:
            return None if spec["snr_gamma"] is None else MinSNRWeighting(float(spec["snr_gamma"]))
    raise ValueError(f"loss weighting: expected None, {{snr_gamma: <float>}} or {{target: ..., params: ...}}, "
                     f"got {spec!r}")
