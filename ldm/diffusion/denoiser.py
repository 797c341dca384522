"""The denoiser: a network call under a parameterisation, seen as eps, x0 and v predictions.

With x_t = alpha x_0 + sigma eps (alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t); the discrete
schedule also stores recip = sqrt(1/abar_t), recipm1 = sqrt(1/abar_t - 1)):

    eps -> x0:  recip x_t - recipm1 eps              (DDPM `predict_start_from_noise`)
    x0  -> eps: (recip x_t - x0) / recipm1           (`_predict_eps_from_xstart`)
    v   -> x0:  alpha x_t - sigma v,  v -> eps: alpha v + sigma x_t      (Salimans & Ho 2022, §4)
    v         = alpha eps - sigma x0

These are the only copies of the conversions: the objectives, the Lightning modules and every
sampler adapter go through them. `Denoiser(network, coefficients, parameterization)` is built
by the models (`DDPM.denoiser()`), and wrappers change what it sees without touching sampler
loops: classifier-free guidance (`ldm.sampling.guidance.guided`, one batched call), the score
corrector (`with_score_corrector`), the shortened conditioning schedule (LatentDiffusion).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from ldm.diffusion.schedule import PARAMETERIZATIONS, Coefficients, Schedule

Tensor = torch.Tensor
Cond = Any   # a tensor, a list of tensors, or a dict {'c_concat': [...], 'c_crossattn': [...], 'c_adm': ...}
NetworkFn = Callable[[Tensor, Tensor, Cond], Tensor]
CoefficientsFn = Callable[[Tensor, Tensor], Coefficients]   # (t, x) -> Coefficients broadcasting against x
__all__ = ["PARAMETERIZATIONS", "Denoiser", "Prediction", "to_eps", "to_x0", "training_target", "with_score_corrector"]


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    return parameterization


# ----------------------------------------------------------------------------------------
# Conversions (closed forms; tested against direct computation)
# ----------------------------------------------------------------------------------------
def x0_from_eps(c: Coefficients, x_t: Tensor, eps: Tensor) -> Tensor:
    return c.recip * x_t - c.recipm1 * eps


def eps_from_x0(c: Coefficients, x_t: Tensor, x0: Tensor) -> Tensor:
    return (c.recip * x_t - x0) / c.recipm1


def x0_from_v(c: Coefficients, x_t: Tensor, v: Tensor) -> Tensor:
    return c.alpha * x_t - c.sigma * v


def eps_from_v(c: Coefficients, x_t: Tensor, v: Tensor) -> Tensor:
    return c.alpha * v + c.sigma * x_t


def v_from(c: Coefficients, x0: Tensor, eps: Tensor) -> Tensor:
    return c.alpha * eps - c.sigma * x0


def to_eps(output: Tensor, x_t: Tensor, c: Coefficients, parameterization: str) -> Tensor:
    """eps implied by a network output."""
    if parameterization == "eps":
        return output
    if parameterization == "v":
        return eps_from_v(c, x_t, output)
    if parameterization == "x0":
        return eps_from_x0(c, x_t, output)
    raise NotImplementedError(f"parameterization '{parameterization}' not supported (expected {PARAMETERIZATIONS})")


def to_x0(output: Tensor, x_t: Tensor, c: Coefficients, parameterization: str) -> Tensor:
    """x0 implied by a network output."""
    if parameterization == "eps":
        return x0_from_eps(c, x_t, output)
    if parameterization == "v":
        return x0_from_v(c, x_t, output)
    if parameterization == "x0":
        return output
    raise NotImplementedError(f"parameterization '{parameterization}' not supported (expected {PARAMETERIZATIONS})")


def training_target(c: Coefficients, parameterization: str, x0: Tensor, eps: Tensor) -> Tensor:
    """What the network regresses: eps, x0, or v."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from(c, x0, eps)
    raise NotImplementedError(f"parameterization '{parameterization}' not yet supported")


class Prediction(NamedTuple):
    """A denoiser's answer at (x_t, t): the raw network output and what it implies."""
    output: Tensor
    eps: Tensor
    x0: Tensor


def discrete_coefficients(schedule: Schedule) -> CoefficientsFn:
    """(t, x) -> Coefficients at integer timesteps t of a discrete schedule (its float32 buffers)."""
    return lambda t, x: schedule.coefficients(t, x.shape)


# ----------------------------------------------------------------------------------------
# The denoiser
# ----------------------------------------------------------------------------------------
class Denoiser:
    """network(x_t, t, cond) under `parameterization`, answering eps / x0 / v.

    network: the model call (`LatentDiffusion.apply_model`, or `DiffusionWrapper` for DDPM),
      possibly wrapped (guidance, score corrector);
    coefficients: (t, x) -> Coefficients at the times t the samplers pass (integer steps of
      the discrete schedule, or DPM-Solver's continuous times);
    model_time: the timestep the network is given for sampler time t (identity for discrete
      samplers; DPM-Solver's (t - 1/N) N).
    """

    def __init__(self, network: NetworkFn, coefficients: CoefficientsFn, parameterization: str = "eps",
                 model_time: Optional[Callable[[Tensor], Tensor]] = None):
        self.network = network
        self.coefficients = coefficients
        self.parameterization = check_parameterization(parameterization)
        self.model_time = model_time

    @classmethod
    def discrete(cls, network: NetworkFn, schedule: Schedule, parameterization: str = "eps") -> "Denoiser":
        return cls(network, discrete_coefficients(schedule), parameterization)

    def with_network(self, wrap: Callable[[NetworkFn], NetworkFn]) -> "Denoiser":
        """The same denoiser around `wrap(network)` (guidance, score corrector, ...)."""
        return Denoiser(wrap(self.network), self.coefficients, self.parameterization, self.model_time)

    def eps_denoiser(self) -> "Denoiser":
        """This denoiser seen as an eps model (its network returns eps): wrappers then act on eps."""
        return Denoiser(self.eps, self.coefficients, "eps")

    def output(self, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.network(x, t if self.model_time is None else self.model_time(t), cond)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond = None) -> Prediction:
        out = self.output(x, t, cond)
        c = self.coefficients(t, x)
        return Prediction(out, to_eps(out, x, c, self.parameterization), to_x0(out, x, c, self.parameterization))

    def eps(self, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        out = self.output(x, t, cond)
        return to_eps(out, x, self.coefficients(t, x), self.parameterization)

    def x0(self, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        out = self.output(x, t, cond)
        return to_x0(out, x, self.coefficients(t, x), self.parameterization)

    def v(self, x: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        out = self.output(x, t, cond)
        if self.parameterization == "v":
            return out
        c = self.coefficients(t, x)
        return v_from(c, to_x0(out, x, c, self.parameterization), to_eps(out, x, c, self.parameterization))

    def eps_fn(self, cond: Cond = None) -> Callable[[Tensor, Tensor], Union[Tensor, tuple[Tensor, Tensor]]]:
        """The noise predictor the discrete samplers take: eps for eps models, (eps, x0) for x0 / v
        models (DDIM then uses the network's own x0, as SD2 did for v)."""
        def eps_fn(x: Tensor, t: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
            out = self.output(x, t, cond)
            if self.parameterization == "eps":
                return out
            c = self.coefficients(t, x)
            return to_eps(out, x, c, self.parameterization), to_x0(out, x, c, self.parameterization)
        return eps_fn


def with_score_corrector(model: Any, score_corrector: Any, corrector_kwargs: Optional[dict] = None
                         ) -> Callable[[NetworkFn], NetworkFn]:
    """Wrapper: eps <- score_corrector.modify_score(model, eps, x, t, c, **kwargs) (eps models, as the original)."""
    def wrap(network: NetworkFn) -> NetworkFn:
        def corrected(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
            return score_corrector.modify_score(model, network(x, t, cond), x, t, cond, **(corrector_kwargs or {}))
        return corrected
    return wrap
