"""Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022a, 2022b) as a function of a noise predictor.

The diffusion ODE is integrated in lambda = log(alpha_t / sigma_t) (see `DiscreteVPSchedule`).
With h = lambda_t - lambda_s, data prediction D = (x - sigma eps) / alpha (DPM-Solver++):

    order 1:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s               (= DDIM)
    order 2:  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D_s + D1 / 2),
              D1  = (D_s - D_{s'}) h / h_prev   (the previous step's model value D_{s'})

and the noise-prediction variants ("dpmsolver") with alpha, sigma, e^{h} swapped in.
Multistep: the first steps warm up with lower orders, and with `lower_order_final` the last
steps (fewer than 15 in all) drop back to lower orders, as the original.  One network
evaluation per step; the final model value is not computed.  Deterministic: no draws.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ldm.diffusion.denoiser import Denoiser, NetworkFn
from ldm.diffusion.schedule import Coefficients
from ldm.sampling.guidance import batch_view
from ldm.sampling.schedule_view import DiscreteVPSchedule

Tensor = torch.Tensor
# eps_fn(x, t): noise prediction at the continuous times t (B,) in [1/N, 1]
ContinuousEpsFn = Callable[[Tensor, Tensor], Tensor]

ALGORITHMS = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("dpm_solver", "taylor")


def continuous_denoiser(network: NetworkFn, ns: DiscreteVPSchedule, parameterization: str = "eps") -> Denoiser:
    """The denoiser at DPM-Solver's continuous times t in [1/N, 1]: the network sees the
    fractional DDPM timestep (t - 1/N) N; alpha_t, sigma_t come from the interpolated schedule."""
    def coefficients(t: Tensor, x: Tensor) -> Coefficients:
        return Coefficients.from_alpha_sigma(batch_view(ns.marginal_alpha(t), x), batch_view(ns.marginal_std(t), x))
    return Denoiser(network, coefficients, parameterization, model_time=ns.model_time)


class _Solver:
    """The update rules; holds the schedule and caches nothing."""

    def __init__(self, eps_fn: ContinuousEpsFn, ns: DiscreteVPSchedule, predict_x0: bool, solver_type: str):
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got '{solver_type}'")
        self.eps_fn, self.ns, self.predict_x0, self.solver_type = eps_fn, ns, predict_x0, solver_type

    def model_fn(self, x: Tensor, t: Tensor) -> Tensor:
        """eps (DPM-Solver) or x0 (DPM-Solver++) at (x, t)."""
        eps = self.eps_fn(x, t)
        if not self.predict_x0:
            return eps
        alpha_t, sigma_t = self.ns.marginal_alpha(t), self.ns.marginal_std(t)
        return (x - batch_view(sigma_t, x) * eps) / batch_view(alpha_t, x)

    def first_update(self, x: Tensor, s: Tensor, t: Tensor, model_s: Tensor) -> Tensor:
        ns, v = self.ns, (lambda a: batch_view(a, x))
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        log_alpha_s, log_alpha_t = ns.marginal_log_mean_coeff(s), ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
        if self.predict_x0:
            return v(sigma_t / sigma_s) * x - v(torch.exp(log_alpha_t) * torch.expm1(-h)) * model_s
        return v(torch.exp(log_alpha_t - log_alpha_s)) * x - v(sigma_t * torch.expm1(h)) * model_s

    def second_update(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor) -> Tensor:
        ns, v = self.ns, (lambda a: batch_view(a, x))
        m1, m0 = model_prev
        t1, t0 = t_prev
        lam1, lam0, lam_t = ns.marginal_lambda(t1), ns.marginal_lambda(t0), ns.marginal_lambda(t)
        log_alpha_0, log_alpha_t = ns.marginal_log_mean_coeff(t0), ns.marginal_log_mean_coeff(t)
        sigma_0, sigma_t = ns.marginal_std(t0), ns.marginal_std(t)
        alpha_t = torch.exp(log_alpha_t)
        h_0, h = lam0 - lam1, lam_t - lam0
        d1 = v(1.0 / (h_0 / h)) * (m0 - m1)
        if self.predict_x0:
            phi = alpha_t * (torch.exp(-h) - 1.0)
            base = v(sigma_t / sigma_0) * x - v(phi) * m0
            if self.solver_type == "dpm_solver":
                return base - 0.5 * v(phi) * d1
            return base + v(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        phi = sigma_t * (torch.exp(h) - 1.0)
        base = v(torch.exp(log_alpha_t - log_alpha_0)) * x - v(phi) * m0
        if self.solver_type == "dpm_solver":
            return base - 0.5 * v(phi) * d1
        return base - v(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1

    def third_update(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor) -> Tensor:
        ns, v = self.ns, (lambda a: batch_view(a, x))
        m2, m1, m0 = model_prev
        lam2, lam1, lam0, lam_t = (ns.marginal_lambda(s) for s in (*t_prev, t))
        log_alpha_0, log_alpha_t = ns.marginal_log_mean_coeff(t_prev[-1]), ns.marginal_log_mean_coeff(t)
        sigma_0, sigma_t = ns.marginal_std(t_prev[-1]), ns.marginal_std(t)
        alpha_t = torch.exp(log_alpha_t)
        h_1, h_0, h = lam1 - lam2, lam0 - lam1, lam_t - lam0
        r0, r1 = h_0 / h, h_1 / h
        d1_0 = v(1.0 / r0) * (m0 - m1)
        d1_1 = v(1.0 / r1) * (m1 - m2)
        d1 = d1_0 + v(r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = v(1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if self.predict_x0:
            return (v(sigma_t / sigma_0) * x - v(alpha_t * (torch.exp(-h) - 1.0)) * m0
                    + v(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                    - v(alpha_t * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)
        return (v(torch.exp(log_alpha_t - log_alpha_0)) * x - v(sigma_t * (torch.exp(h) - 1.0)) * m0
                - v(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
                - v(sigma_t * ((torch.exp(h) - 1.0 - h) / h ** 2 - 0.5)) * d2)

    def update(self, x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int) -> Tensor:
        if order == 1:
            return self.first_update(x, t_prev[-1], t, model_prev[-1])
        if order == 2:
            return self.second_update(x, model_prev[-2:], t_prev[-2:], t)
        return self.third_update(x, model_prev[-3:], t_prev[-3:], t)


def sample_dpm_solver(eps_fn: ContinuousEpsFn, x_T: Tensor, schedule: DiscreteVPSchedule, steps: int, *,
                      order: int = 2, algorithm: str = "dpmsolver++", skip_type: str = "time_uniform",
                      solver_type: str = "dpm_solver", lower_order_final: bool = True,
                      t_start: Optional[float] = None, t_end: Optional[float] = None,
                      callback: Optional[Callable[[dict[str, Any]], None]] = None,
                      timesteps: Optional[Tensor] = None) -> Tensor:
    """Multistep DPM-Solver(++) of `order` (1-3) in `steps` network evaluations, from t_start
    (default T = 1) to t_end (default 1/N, i.e. training step 0). `timesteps`: the steps + 1
    decreasing continuous times to visit instead of `skip_type`'s (e.g. a diffusers spacing).

    eps_fn(x, t) takes continuous times; `schedule.model_time(t)` gives the network's timestep.
    callback({'i', 't', 'x', 'model'}) after every step ('model': the D or eps it used last).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got '{algorithm}'")
    if order not in (1, 2, 3) or steps < order:
        raise ValueError(f"need 1 <= order <= 3 and steps >= order, got order={order}, steps={steps}")
    solver = _Solver(eps_fn, schedule, predict_x0=algorithm == "dpmsolver++", solver_type=solver_type)
    t_0 = schedule.t_end if t_end is None else t_end
    t_T = schedule.T if t_start is None else t_start
    x = x_T
    if timesteps is None:
        timesteps = schedule.time_steps(skip_type, t_T, t_0, steps, x.device)
    elif len(timesteps) != steps + 1:
        raise ValueError(f"timesteps must hold steps + 1 = {steps + 1} times, got {len(timesteps)}")
    vec_t = timesteps[0].expand(x.shape[0])
    model_prev, t_prev = [solver.model_fn(x, vec_t)], [vec_t]
    for step in range(1, steps + 1):
        vec_t = timesteps[step].expand(x.shape[0])
        if step < order:                                     # warm-up with lower orders
            step_order = step
        elif lower_order_final and steps < 15:
            step_order = min(order, steps + 1 - step)
        else:
            step_order = order
        x = solver.update(x, model_prev, t_prev, vec_t, step_order)
        t_prev.append(vec_t)
        if step < steps:                                     # the final model value is never used
            model_prev.append(solver.model_fn(x, vec_t))
        t_prev, model_prev = t_prev[-order:], model_prev[-order:]
        if callback is not None:
            callback({"i": step - 1, "t": vec_t, "x": x, "model": model_prev[-1]})
    return x
