"""ldm.diffusion.schedule: every beta schedule and derived buffer against a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import schedule as S


def test_linear_is_linear_in_sqrt_beta():
    betas = S.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    s0, s1 = math.sqrt(0.00085), math.sqrt(0.012)
    for i in (0, 1, 500, 998, 999):
        assert betas[i] == pytest.approx((s0 + i * (s1 - s0) / 999) ** 2, rel=1e-12)
    # not linear in beta: the midpoint is below the arithmetic mean
    assert betas[499] < 0.5 * (0.00085 + 0.012)


def test_cosine_matches_nichol_dhariwal():
    T, s = 1000, 8e-3
    betas = S.make_beta_schedule("cosine", T, cosine_s=s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2   # noqa: E731
    for i in (0, 1, 10, 500, 990):
        assert betas[i] == pytest.approx(min(1 - f(i + 1) / f(i), 0.999), rel=1e-10)
    assert betas[-1] == 0.999   # clipped
    assert (betas >= 0).all()
    # abar_t = f(t)/f(0)
    abar = np.cumprod(1 - betas)
    assert abar[499] == pytest.approx(f(500) / f(0), rel=1e-9)


@pytest.mark.parametrize("name,fn", [
    ("sqrt_linear", lambda i: 1e-4 + i * (2e-2 - 1e-4) / 99),
    ("sqrt", lambda i: math.sqrt(1e-4 + i * (2e-2 - 1e-4) / 99)),
])
def test_sqrt_schedules(name, fn):
    betas = S.make_beta_schedule(name, 100, linear_start=1e-4, linear_end=2e-2)
    for i in (0, 37, 99):
        assert betas[i] == pytest.approx(fn(i), rel=1e-12)


def test_squaredcos_cap_v2():
    betas = S.make_beta_schedule("squaredcos_cap_v2", 1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2   # noqa: E731
    assert betas[10] == pytest.approx(1 - f(11 / 1000) / f(10 / 1000), rel=1e-12)
    assert betas[-1] == 0.999


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown"):
        S.make_beta_schedule("quadratic", 10)


@pytest.mark.parametrize("v_posterior", [0.0, 0.3])
def test_derived_buffers_direct(v_posterior):
    betas = S.make_beta_schedule("linear", 50, linear_start=1e-3, linear_end=0.05)
    a = S.schedule_arrays(betas, v_posterior)
    for t in (0, 1, 25, 49):
        abar = math.prod(1 - b for b in betas[:t + 1])
        abar_prev = math.prod(1 - b for b in betas[:t]) if t else 1.0
        beta, alpha = betas[t], 1 - betas[t]
        assert a["alphas_cumprod"][t] == pytest.approx(abar, rel=1e-12)
        assert a["alphas_cumprod_prev"][t] == pytest.approx(abar_prev, rel=1e-12)
        assert a["sqrt_alphas_cumprod"][t] == pytest.approx(math.sqrt(abar), rel=1e-12)
        assert a["sqrt_one_minus_alphas_cumprod"][t] == pytest.approx(math.sqrt(1 - abar), rel=1e-12)
        assert a["log_one_minus_alphas_cumprod"][t] == pytest.approx(math.log(1 - abar), rel=1e-12)
        assert a["sqrt_recip_alphas_cumprod"][t] == pytest.approx(1 / math.sqrt(abar), rel=1e-12)
        assert a["sqrt_recipm1_alphas_cumprod"][t] == pytest.approx(math.sqrt(1 / abar - 1), rel=1e-12)
        # posterior q(x_{t-1} | x_t, x_0) from Bayes' rule (precision form), independent of the code's formula
        tilde = 1 / (1 / (1 - abar_prev) + alpha / beta) if t else 0.0
        var = (1 - v_posterior) * tilde + v_posterior * beta
        assert a["posterior_variance"][t] == pytest.approx(var, rel=1e-10, abs=1e-18)
        assert a["posterior_log_variance_clipped"][t] == pytest.approx(math.log(max(var, 1e-20)), rel=1e-10)
        c1 = tilde * math.sqrt(abar_prev) / (1 - abar_prev) if t else 1.0
        c2 = tilde * math.sqrt(alpha) / beta
        assert a["posterior_mean_coef1"][t] == pytest.approx(c1, rel=1e-10)
        assert a["posterior_mean_coef2"][t] == pytest.approx(c2, rel=1e-10, abs=1e-15)


def test_tensors_are_float32_of_float64_values():
    betas = S.make_beta_schedule("cosine", 100)
    tensors = S.schedule_tensors(betas, 0.0, "eps")
    arrays = S.schedule_arrays(betas)
    assert set(tensors) == set(S.SCHEDULE_BUFFERS) | {"lvlb_weights"}
    for k in S.SCHEDULE_BUFFERS:
        assert tensors[k].dtype == torch.float32
        assert torch.equal(tensors[k], torch.tensor(arrays[k]).float())   # one cast from float64


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_lvlb_weights_finite_and_closed_form(schedule, parameterization):
    betas = S.make_beta_schedule(schedule, 200)
    a = S.schedule_arrays(betas)
    w = S.lvlb_weights(a, parameterization)
    assert np.isfinite(w).all() and (w > 0).all()
    assert w[0] == w[1]
    t = 57
    if parameterization == "eps":   # beta^2 / (2 sigma^2 alpha (1 - abar)) = beta / (2 alpha (1 - abar_prev))
        expect = betas[t] / (2 * (1 - betas[t]) * (1 - a["alphas_cumprod_prev"][t]))
    elif parameterization == "x0":
        expect = 0.5 * math.sqrt(a["alphas_cumprod"][t]) / (2 - a["alphas_cumprod"][t])
    else:
        expect = 1.0
    assert w[t] == pytest.approx(expect, rel=1e-5)


def test_extract_into_tensor():
    a = torch.arange(10.0)
    out = S.extract_into_tensor(a, torch.tensor([3, 7]), (2, 4, 5, 5))
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 7.0]


def test_given_betas_override_schedule():
    betas = S.betas_from_config([0.1, 0.2, 0.3], "cosine", 1000, 1e-4, 2e-2, 8e-3)
    assert betas.tolist() == [0.1, 0.2, 0.3] and betas.dtype == np.float64


def test_betas_for_alpha_bar():
    betas = S.betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.5)
    assert betas[0] == pytest.approx(0.1) and betas[-1] == 0.5
