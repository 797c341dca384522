"""The original DPM-Solver module's interface (`NoiseScheduleVP`, `model_wrapper`, `DPM_Solver`),
as thin adapters over `ldm.sampling.dpm_solver` (the one implementation of the update rules).

    ns = NoiseScheduleVP("discrete", alphas_cumprod=model.alphas_cumprod)
    model_fn = model_wrapper(lambda x, t, c: model.apply_model(x, t, c), ns, model_type="noise",
                             guidance_type="classifier-free", condition=c, unconditional_condition=uc,
                             guidance_scale=7.5)
    x0 = DPM_Solver(model_fn, ns, predict_x0=True).sample(x_T, steps=20, order=2, method="multistep")

Differences from the original: only the multistep method (the one SD's DPMSolverSampler uses)
is implemented, `method="singlestep"`/`"adaptive"` and `thresholding` raise; no prints.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ldm.sampling.dpm_solver import sample_dpm_solver
from ldm.sampling.schedule_view import DiscreteVPSchedule

Tensor = torch.Tensor


def interpolate_fn(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, yp) at x, extrapolating linearly at both ends;
    x: (N, C), xp/yp: (C, K) (one curve per channel), returns (N, C)."""
    n, k = x.shape[0], xp.shape[1]
    out = []
    for c in range(x.shape[1]):
        idx = torch.searchsorted(xp[c].contiguous(), x[:, c].contiguous()).clamp(1, k - 1)
        x0, x1, y0, y1 = xp[c][idx - 1], xp[c][idx], yp[c][idx - 1], yp[c][idx]
        out.append(y0 + (x[:, c] - x0) * (y1 - y0) / (x1 - x0))
    return torch.stack(out, dim=1).reshape(n, -1)


def expand_dims(v: Tensor, dims: int) -> Tensor:
    """(N,) -> (N, 1, ..., 1) with `dims` dimensions in all."""
    return v[(...,) + (None,) * (dims - 1)]


class NoiseScheduleVP(DiscreteVPSchedule):
    """The VP forward process q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) as a function of continuous t.

    schedule="discrete" (from `betas` or `alphas_cumprod` of a DDPM, t in [1/N, 1]), "linear"
    (beta(t) = beta_0 + t (beta_1 - beta_0), t in [1e-3, 1]) or "cosine" (Nichol & Dhariwal)."""

    def __init__(self, schedule: str = "discrete", betas: Optional[Tensor] = None,
                 alphas_cumprod: Optional[Tensor] = None, continuous_beta_0: float = 0.1,
                 continuous_beta_1: float = 20.0, dtype: torch.dtype = torch.float32):
        if schedule not in ("discrete", "linear", "cosine"):
            raise ValueError(f"Unsupported noise schedule {schedule}. The schedule needs to be 'discrete' or "
                             f"'linear' or 'cosine'")
        self.schedule = schedule
        if schedule == "discrete":
            if betas is not None:
                log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)
                alphas_cumprod = torch.exp(2 * log_alphas)
            elif alphas_cumprod is None:
                raise ValueError("schedule='discrete' needs betas or alphas_cumprod")
            super().__init__(alphas_cumprod.to(dtype))
            return
        self.total_N = 1000
        self.beta_0, self.beta_1 = continuous_beta_0, continuous_beta_1
        self.cosine_s, self.cosine_beta_max = 0.008, 999.0
        self.cosine_t_max = (math.atan(self.cosine_beta_max * (1.0 + self.cosine_s) / math.pi) * 2.0
                             * (1.0 + self.cosine_s) / math.pi - self.cosine_s)
        self.cosine_log_alpha_0 = math.log(math.cos(self.cosine_s / (1.0 + self.cosine_s) * math.pi / 2.0))
        self.T = 0.9946 if schedule == "cosine" else 1.0
        self.t_array = torch.zeros(1, dtype=dtype)   # dtype of the time grids (time_steps)

    @property
    def t_end(self) -> float:
        return 1.0 / self.total_N if self.schedule == "discrete" else 1e-3

    def model_time(self, t: Tensor) -> Tensor:
        return super().model_time(t) if self.schedule == "discrete" else 1000.0 * t

    def _cosine_log_alpha(self, s: Tensor) -> Tensor:
        return torch.log(torch.cos((s + self.cosine_s) / (1.0 + self.cosine_s) * math.pi / 2.0))

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        if self.schedule == "discrete":
            return super().marginal_log_mean_coeff(t)
        if self.schedule == "linear":
            return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        return self._cosine_log_alpha(t) - self.cosine_log_alpha_0

    def inverse_lambda(self, lamb: Tensor) -> Tensor:
        if self.schedule == "discrete":
            return super().inverse_lambda(lamb)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        if self.schedule == "linear":
            tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
            delta = self.beta_0 ** 2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        t = torch.arccos(torch.exp(log_alpha + self.cosine_log_alpha_0)) * 2.0 * (1.0 + self.cosine_s) / math.pi
        return t - self.cosine_s


def model_wrapper(model: Callable, noise_schedule: NoiseScheduleVP, model_type: str = "noise",
                  model_kwargs: Optional[dict] = None, guidance_type: str = "uncond", condition: Any = None,
                  unconditional_condition: Any = None, guidance_scale: float = 1.0,
                  classifier_fn: Optional[Callable] = None, classifier_kwargs: Optional[dict] = None) -> Callable:
    """A noise predictor `model_fn(x, t_continuous)` from a network `model(x, t_input, [cond], **kwargs)`.

    model_type: what the network predicts ("noise", "x_start", "v" or "score"); guidance_type:
    "uncond", "classifier" (gradient of `classifier_fn(x, t_input, condition)`'s log-prob) or
    "classifier-free" (cond and uncond batched in one call)."""
    model_kwargs, classifier_kwargs = model_kwargs or {}, classifier_kwargs or {}
    if model_type not in ("noise", "x_start", "v", "score"):
        raise ValueError(f"model_type must be noise, x_start, v or score, not {model_type!r}")
    if guidance_type not in ("uncond", "classifier", "classifier-free"):
        raise ValueError(f"guidance_type must be uncond, classifier or classifier-free, not {guidance_type!r}")
    ns = noise_schedule

    def noise_pred_fn(x: Tensor, t_continuous: Tensor, cond: Any = None) -> Tensor:
        t_vec = t_continuous.expand(x.shape[0]) if t_continuous.numel() == 1 else t_continuous
        t_input = ns.model_time(t_vec)
        out = model(x, t_input, **model_kwargs) if cond is None else model(x, t_input, cond, **model_kwargs)
        alpha_t, sigma_t = (expand_dims(f(t_vec), x.dim()) for f in (ns.marginal_alpha, ns.marginal_std))
        if model_type == "noise":
            return out
        if model_type == "x_start":
            return (x - alpha_t * out) / sigma_t
        if model_type == "v":
            return alpha_t * out + sigma_t * x
        return -sigma_t * out

    def model_fn(x: Tensor, t_continuous: Tensor) -> Tensor:
        if guidance_type == "uncond":
            return noise_pred_fn(x, t_continuous)
        if guidance_type == "classifier":
            if classifier_fn is None:
                raise ValueError("guidance_type='classifier' needs classifier_fn")
            t_input = ns.model_time(t_continuous)
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_prob = classifier_fn(x_in, t_input, condition, **classifier_kwargs)
                grad = torch.autograd.grad(log_prob.sum(), x_in)[0]
            sigma_t = expand_dims(ns.marginal_std(t_continuous), x.dim())
            return noise_pred_fn(x, t_continuous) - guidance_scale * sigma_t * grad
        if guidance_scale == 1.0 or unconditional_condition is None:
            return noise_pred_fn(x, t_continuous, cond=condition)
        x_in, t_in = torch.cat([x] * 2), torch.cat([t_continuous] * 2)
        if isinstance(condition, dict):
            c_in = {k: [torch.cat([u, c]) for u, c in zip(unconditional_condition[k], condition[k])]
                    if isinstance(condition[k], list) else torch.cat([unconditional_condition[k], condition[k]])
                    for k in condition}
        else:
            c_in = torch.cat([unconditional_condition, condition])
        noise_uncond, noise = noise_pred_fn(x_in, t_in, cond=c_in).chunk(2)
        return noise_uncond + guidance_scale * (noise - noise_uncond)

    return model_fn


class DPM_Solver:
    """DPM-Solver (predict_x0=False) / DPM-Solver++ (predict_x0=True) over a noise predictor
    `model_fn(x, t_continuous)` (from `model_wrapper`)."""

    def __init__(self, model_fn: Callable, noise_schedule: NoiseScheduleVP, predict_x0: bool = False,
                 thresholding: bool = False, max_val: float = 1.0):
        if thresholding:
            raise NotImplementedError("dynamic thresholding is not implemented")
        self.model = model_fn
        self.noise_schedule = noise_schedule
        self.predict_x0 = predict_x0
        self.max_val = max_val

    def noise_prediction_fn(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model(x, t)

    def data_prediction_fn(self, x: Tensor, t: Tensor) -> Tensor:
        ns = self.noise_schedule
        alpha_t, sigma_t = (expand_dims(f(t), x.dim()) for f in (ns.marginal_alpha, ns.marginal_std))
        return (x - sigma_t * self.noise_prediction_fn(x, t)) / alpha_t

    def model_fn(self, x: Tensor, t: Tensor) -> Tensor:
        return self.data_prediction_fn(x, t) if self.predict_x0 else self.noise_prediction_fn(x, t)

    def get_time_steps(self, skip_type: str, t_T: float, t_0: float, N: int, device: torch.device) -> Tensor:
        return self.noise_schedule.time_steps(skip_type, t_T, t_0, N, device)

    def sample(self, x: Tensor, steps: int = 20, t_start: Optional[float] = None, t_end: Optional[float] = None,
               order: int = 3, skip_type: str = "time_uniform", method: str = "singlestep",
               lower_order_final: bool = True, denoise_to_zero: bool = False, solver_type: str = "dpm_solver",
               atol: float = 0.0078, rtol: float = 0.05) -> Tensor:
        if method != "multistep":
            raise NotImplementedError(f"method={method!r}: only method='multistep' is implemented "
                                      f"(ldm.sampling.dpm_solver)")
        if denoise_to_zero:
            raise NotImplementedError("denoise_to_zero is not implemented")
        return sample_dpm_solver(self.model, x, self.noise_schedule, steps, order=order,
                                 algorithm="dpmsolver++" if self.predict_x0 else "dpmsolver",
                                 skip_type=skip_type, solver_type=solver_type,
                                 lower_order_final=lower_order_final, t_start=t_start, t_end=t_end)
