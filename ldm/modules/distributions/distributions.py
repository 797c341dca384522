"""The KL autoencoder's posterior q(z|x) = N(mean, diag(exp(logvar))), and a Gaussian KL helper.

`DiagonalGaussianDistribution.sample()` draws `torch.randn(mean.shape)` (looked up at call
time, then moved to the parameters' device), exactly one draw per call, as the original.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch


class AbstractDistribution:
    def sample(self) -> torch.Tensor:
        raise NotImplementedError()

    def mode(self) -> torch.Tensor:
        raise NotImplementedError()


class DiracDistribution(AbstractDistribution):
    """A point mass at `value`."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def sample(self) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class DiagonalGaussianDistribution(AbstractDistribution):
    """Split `parameters` (B, 2C, ...) along dim 1 into mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        # parameters: the encoder's moments, (B, 2C, H, W); deterministic: zero variance (sample == mean)
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn as `torch.randn(mean.shape)`."""
        eps = torch.randn(self.mean.shape).to(device=self.parameters.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other) summed over (C, H, W) -> (B,); `other` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))

    def mode(self) -> torch.Tensor:
        return self.mean


def normal_kl(mean1: Union[torch.Tensor, float], logvar1: Union[torch.Tensor, float],
              mean2: Union[torch.Tensor, float], logvar2: Union[torch.Tensor, float]) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)); scalars broadcast against the tensor argument."""
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))
