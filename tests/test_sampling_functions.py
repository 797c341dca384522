"""Samplers as functions of a denoiser: grids, exactness on analytic denoisers, guidance, seeds.

Analytic denoisers used below (x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = abar_t):
- a point mass at x0: eps(x, t) = (x - sqrt(a) x0) / sqrt(1 - a), so every x0_hat is x0;
- Gaussian data N(mu, s^2): eps(x, t) = sqrt(1 - a) (x - sqrt(a) mu) / (a s^2 + 1 - a), whose
  probability-flow ODE keeps z = (x - sqrt(a) mu) / sqrt(a s^2 + 1 - a) constant: the exact
  deterministic sample from level a_T to level a_0 is known in closed form.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.diffusion.schedule import make_beta_schedule, schedule_arrays
from ldm.sampling import (DiscreteVPSchedule, cfg_denoiser, ddim_coefficients, make_ddim_timesteps, sample_ddim,
                          sample_ddpm, sample_dpm_solver, sample_plms)

N = 1000
BETAS = make_beta_schedule("linear", N, 0.00085, 0.0120)
AC64 = schedule_arrays(BETAS)["alphas_cumprod"]
AC = torch.tensor(AC64, dtype=torch.float32)        # what a model registers
MU, S = 0.3, 0.5


def point_mass_eps(x0: torch.Tensor, ac: torch.Tensor = AC):
    def eps_fn(x, t):
        a = ac[t].double().view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x.dtype)
    return eps_fn


def gaussian_eps_at(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = a.double().view(-1, 1, 1, 1)
    return ((1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * S ** 2 + 1 - a)).to(x.dtype)


def gaussian_eps(x, t):
    return gaussian_eps_at(torch.as_tensor(AC64)[t], x)


def gaussian_ode_solution(x_T: torch.Tensor, a_T: float, a_0: float) -> torch.Tensor:
    z = (x_T.double() - a_T ** 0.5 * MU) / (a_T * S ** 2 + 1 - a_T) ** 0.5
    return a_0 ** 0.5 * MU + (a_0 * S ** 2 + 1 - a_0) ** 0.5 * z


def x_T(seed: int = 0, shape=(2, 3, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# grids and coefficients
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [1, 5, 50, 250, 500])
def test_ddim_timesteps_uniform_formula(S):
    got = make_ddim_timesteps("uniform", S, N, verbose=False)
    np.testing.assert_array_equal(got, np.arange(0, N, N // S) + 1)
    assert got[0] == 1 and got[-1] == N - N // S + 1


@pytest.mark.parametrize("S", [5, 50])
def test_ddim_timesteps_quad_formula(S):
    got = make_ddim_timesteps("quad", S, N, verbose=False)
    np.testing.assert_array_equal(got, (np.linspace(0, np.sqrt(N * .8), S) ** 2).astype(int) + 1)
    assert got[0] == 1 and got[-1] == 801


def test_ddim_timesteps_known_values_and_errors():
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 5, N, verbose=False), [1, 201, 401, 601, 801])
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 7, N, verbose=False)[-2:], [853, 995])  # 8 steps
    # the original's grid for S = 3 ended at 1000 = N and crashed: that step is dropped
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 3, N, verbose=False), [1, 334, 667])
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 999, N, verbose=False), np.arange(1, N))
    with pytest.raises(NotImplementedError):
        make_ddim_timesteps("cubic", 5, N)


def test_ddim_coefficients_closed_forms():
    ts = make_ddim_timesteps("uniform", 10, N, verbose=False)
    co = ddim_coefficients(AC, ts, eta=0.7)
    ac = AC.double()
    torch.testing.assert_close(co.alphas, ac[ts])
    assert co.alphas_prev[0] == ac[0]                       # the last DDIM step lands on abar_0
    torch.testing.assert_close(co.alphas_prev[1:], ac[ts[:-1]])
    a, ap = co.alphas, co.alphas_prev
    torch.testing.assert_close(co.sigmas, 0.7 * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt())
    # the full chain with eta = 1 is DDPM: sigma^2 = posterior variance beta~_t, and lands on clean data
    full = ddim_coefficients(AC64, np.arange(N), eta=1.0)
    assert full.alphas_prev[0] == 1.0
    np.testing.assert_allclose(full.sigmas.numpy() ** 2, schedule_arrays(BETAS)["posterior_variance"], rtol=1e-10)


# ----------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------
def test_ddim_eta0_perfect_denoiser_recovers_x0_and_ignores_noise():
    x0 = x_T(1) * 0.5
    ts = make_ddim_timesteps("uniform", 10, N, verbose=False)
    a, b = (sample_ddim(point_mass_eps(x0), x_T(0), AC, ts, 0.0, log_every_t=1,
                        generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    assert torch.equal(a[0], b[0])                          # eta = 0: the drawn noise does not matter
    assert len(a[1]["pred_x0"]) == 11 and torch.equal(a[1]["x_inter"][0], x_T(0))
    for p in a[1]["pred_x0"][1:]:
        torch.testing.assert_close(p, x0, atol=2e-5, rtol=0)
    # the final sample sits at abar_0 on the line to x0; on the full chain it is x0 itself
    a0 = float(AC[0])
    eps_last = (a[1]["x_inter"][-2] - x0 * float(AC[1]) ** .5) / (1 - float(AC[1])) ** .5
    torch.testing.assert_close(a[0], a0 ** .5 * x0 + (1 - a0) ** .5 * eps_last, atol=1e-4, rtol=0)
    full, _ = sample_ddim(point_mass_eps(x0), x_T(0), AC, np.arange(N), 0.0)
    torch.testing.assert_close(full, x0, atol=2e-5, rtol=0)


def test_ddim_draw_order_mask_before_model_and_noise_every_step(monkeypatch):
    events = []
    orig = torch.randn

    def spy(*args, **kwargs):
        events.append("draw")
        return orig(*args, **kwargs)
    monkeypatch.setattr(torch, "randn", spy)

    def eps_fn(x, t):
        events.append("model")
        return torch.zeros_like(x)
    x0, mask = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    sample_ddim(eps_fn, torch.ones(1, 1, 2, 2), AC, [1, 501], 0.0, mask=mask, x0=x0)
    assert events == ["draw", "model", "draw"] * 2


def test_ddim_mask_keeps_known_region():
    x0 = x_T(3)
    mask = torch.zeros_like(x0)
    mask[..., :2] = 1.0                                     # 1 = keep x0
    out, _ = sample_ddim(gaussian_eps, x_T(0), AC, np.arange(0, N, 50), 1.0, mask=mask, x0=x0,
                         generator=torch.Generator().manual_seed(0))
    # the last step re-noises x0 to abar_{50} and then takes one step to clean data: x0 + small
    assert (out - x0)[..., :2].abs().max() < 0.5 and (out - x0)[..., 2:].abs().max() > 0.5


# ----------------------------------------------------------------------------------------
# guidance
# ----------------------------------------------------------------------------------------
def toy_model(calls):
    def model_fn(x, t, c):
        calls.append(x.shape[0])
        if isinstance(c, dict):
            c = c["c_concat"][0] + c["c_crossattn"][0].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(x * 1.3 + c) * (t.view(-1, 1, 1, 1) / 1000.0) - 0.2 * x
    return model_fn


@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_cfg_batched_equals_two_calls(kind):
    x, t = x_T(0), torch.tensor([10, 900])
    if kind == "tensor":
        cond, uncond = x_T(1), x_T(2)
    else:
        cond = {"c_concat": [x_T(1)], "c_crossattn": [torch.randn(2, 7, 16)]}
        uncond = {"c_concat": [x_T(2)], "c_crossattn": [torch.zeros(2, 7, 16)]}
    calls = []
    got = cfg_denoiser(toy_model(calls), 7.5)(x, t, cond, uncond)
    assert calls == [4]                                     # ONE network call on the doubled batch
    ref_model = toy_model([])
    e_c, e_u = ref_model(x, t, cond), ref_model(x, t, uncond)
    torch.testing.assert_close(got, e_u + 7.5 * (e_c - e_u), rtol=0, atol=1e-6)
    calls.clear()
    torch.testing.assert_close(cfg_denoiser(toy_model(calls), 1.0)(x, t, cond, uncond), e_c, rtol=0, atol=0)
    assert calls == [2]                                     # scale 1: a plain conditional call


# ----------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generator_seed_reproduces_sample(sampler):
    def run(seed, global_seed):
        torch.manual_seed(global_seed)                      # the global RNG must not matter
        g = torch.Generator().manual_seed(seed)
        if sampler == "ddim":
            return sample_ddim(gaussian_eps, x_T(0), AC, np.arange(0, N, 100) + 1, 1.0, generator=g)[0]
        return sample_ddpm(gaussian_eps, x_T(0), BETAS[:200], generator=g, clip_denoised=False)[0]
    a, b, c = run(7, 0), run(7, 123), run(8, 0)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_ddpm_perfect_denoiser_ends_on_x0_and_draws_every_step(monkeypatch):
    x0, start = x_T(1).clamp(-1, 1), x_T(0)
    betas = BETAS[:100]
    ac = torch.tensor(schedule_arrays(betas)["alphas_cumprod"], dtype=torch.float32)
    draws = []
    orig = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(1) or orig(*a, **k))
    out, inter = sample_ddpm(point_mass_eps(x0, ac), start, betas, log_every_t=10)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert len(draws) == 100 and len(inter) == 1 + 10 + 1


# ----------------------------------------------------------------------------------------
# PLMS and DPM-Solver on the Gaussian ODE
# ----------------------------------------------------------------------------------------
def test_plms_more_accurate_than_ddim_at_equal_steps():
    ts = make_ddim_timesteps("uniform", 10, N, verbose=False)
    exact = gaussian_ode_solution(x_T(0), AC64[ts[-1]], AC64[0])
    err_ddim = (sample_ddim(gaussian_eps, x_T(0), AC64, ts, 0.0)[0] - exact).abs().max()
    err_plms = (sample_plms(gaussian_eps, x_T(0), AC64, ts)[0] - exact).abs().max()
    assert err_plms < err_ddim / 3, (err_plms, err_ddim)   # about 5x here
    # and it converges
    ts40 = make_ddim_timesteps("uniform", 40, N, verbose=False)
    exact40 = gaussian_ode_solution(x_T(0), AC64[ts40[-1]], AC64[0])
    assert (sample_plms(gaussian_eps, x_T(0), AC64, ts40)[0] - exact40).abs().max() < err_plms


def continuous_gaussian_eps(ns: DiscreteVPSchedule):
    return lambda x, t: gaussian_eps_at(ns.marginal_alpha(t) ** 2, x)


def dpm_errors(ns, exact, steps, **kw):
    eps_fn = continuous_gaussian_eps(ns)
    return [float((sample_dpm_solver(eps_fn, x_T(0).double(), ns, n, **kw) - exact).abs().max()) for n in steps]


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_dpm_solver_converges_to_ddim_solution(algorithm):
    """DDIM (= DPM-Solver-1) with many steps and DPM-Solver(++) reach the same ODE solution;
    the second-order multistep solver converges quadratically in the step size (uniform in
    lambda) and monotonically with SD2's time-uniform steps (whose last step, near t = 0, spans
    a lambda interval that only shrinks logarithmically)."""
    ns = DiscreteVPSchedule(torch.tensor(AC64))             # float64 view: measure the method, not rounding
    exact = gaussian_ode_solution(x_T(0), AC64[N - 1], AC64[0])
    ts = make_ddim_timesteps("uniform", 500, N, verbose=False)   # 1, 3, ..., 999: from abar_999 to abar_0
    ddim, _ = sample_ddim(gaussian_eps, x_T(0).double(), AC64, ts, 0.0)
    assert (ddim - exact).abs().max() < 1e-2
    log_snr = dpm_errors(ns, exact, (16, 32, 64), algorithm=algorithm, skip_type="logSNR")
    assert all(b < a / 3 for a, b in zip(log_snr, log_snr[1:])), log_snr
    dpm32 = sample_dpm_solver(continuous_gaussian_eps(ns), x_T(0).double(), ns, 32, algorithm=algorithm,
                              skip_type="logSNR")
    assert (dpm32 - ddim).abs().max() < 1.5e-2
    uniform = dpm_errors(ns, exact, (8, 16, 32, 64), algorithm=algorithm)
    assert all(b < a for a, b in zip(uniform, uniform[1:])) and uniform[-1] < 0.06, uniform


def test_dpm_solver_higher_orders_beat_order_one():
    ns = DiscreteVPSchedule(torch.tensor(AC64))
    exact = gaussian_ode_solution(x_T(0), AC64[N - 1], AC64[0])
    e1, e2, e3 = (dpm_errors(ns, exact, [16], order=o, skip_type="logSNR", lower_order_final=False)[0]
                  for o in (1, 2, 3))
    assert e2 < e1 / 5 and e3 < e1 / 5, (e1, e2, e3)


def test_vp_schedule_matches_discrete_steps():
    ns = DiscreteVPSchedule(torch.tensor(AC64))
    t = (torch.arange(N, dtype=torch.float64) + 1) / N      # t_n = (n + 1) / N
    torch.testing.assert_close(ns.marginal_alpha(t) ** 2, torch.tensor(AC64))
    torch.testing.assert_close(ns.model_time(t), torch.arange(N, dtype=torch.float64))
    lam = ns.marginal_lambda(t[[3, 500, 998]])
    torch.testing.assert_close(ns.inverse_lambda(lam), t[[3, 500, 998]])


def test_dynamic_threshold_caps_x0_rms():
    from ldm.sampling.guidance import norm_thresholding
    x0 = torch.cat([torch.full((1, 3, 4, 4), 5.0), torch.full((1, 3, 4, 4), 0.5)])
    out = norm_thresholding(x0, 2.0)
    assert torch.allclose(out[0], torch.full_like(out[0], 2.0)) and torch.equal(out[1], x0[1])
    ts = make_ddim_timesteps("uniform", 5, N, verbose=False)
    _, inter = sample_ddim(point_mass_eps(torch.full((1, 3, 4, 4), 5.0)), x_T(0), AC, ts, 0.0,
                           dynamic_threshold=2.0, log_every_t=1)
    assert all(torch.allclose(p, torch.full_like(p, 2.0)) for p in inter["pred_x0"][1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_seed_same_sample_on_cpu_and_gpu():
    def run(device):
        g = torch.Generator().manual_seed(11)                  # a CPU generator drives both devices
        ac = AC.to(device)
        out, _ = sample_ddim(gaussian_eps_on(device), x_T(0).to(device), ac, np.arange(0, N, 100) + 1, 1.0,
                             generator=g)
        return out.cpu()

    def gaussian_eps_on(device):
        return lambda x, t: gaussian_eps_at(torch.as_tensor(AC64, device=device)[t], x)
    torch.testing.assert_close(run("cpu"), run("cuda"), atol=1e-5, rtol=1e-5)


def test_ddpm_accepts_registered_schedule_buffers():
    from ldm.diffusion.schedule import schedule_tensors
    betas = BETAS[:60]
    buffers = schedule_tensors(betas, parameterization=None)
    a = sample_ddpm(gaussian_eps, x_T(0), betas, generator=torch.Generator().manual_seed(1))[0]
    b = sample_ddpm(gaussian_eps, x_T(0), buffers, generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
