"""k-diffusion samplers on a closed-form denoiser.

Data ~ N(mu, s^2 I) has the exact denoiser D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu).
Each sampler's steps are checked against the published update rule written out here, and the
samples' mean / variance against mu / s^2 as the number of steps grows.
"""
import math

import numpy as np
import pytest
import torch

from ldm.diffusion.schedule import make_beta_schedule, schedule_arrays
from ldm.sampling import k_diffusion as kd

MU, S = 1.5, 0.5


def gaussian_denoiser(x, sigma):
    s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S ** 2 / (S ** 2 + s2) * (x - MU)


def sd_alphas_cumprod():
    return schedule_arrays(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"]


# ----------------------------------------------------------------------------------------
# one step == the published update rule
# ----------------------------------------------------------------------------------------
SIGMAS = torch.tensor([14.6, 3.1, 0.7, 0.0], dtype=torch.float64)


def _x0(seed=0):
    return torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 14.6


def _run(sampler, n_steps, **kw):
    """Run the sampler over the first n_steps steps of SIGMAS (the schedule truncated; a
    truncated schedule must end at 0, so only n_steps = 3 is the full run; for fewer steps
    we check the intermediate through the callback)."""
    seen = []
    out = sampler(gaussian_denoiser, _x0(), SIGMAS, generator=torch.Generator().manual_seed(7),
                  callback=lambda d: seen.append(d["x"].clone()), **kw)
    return seen + [out]


def d(x, s):
    return (x - gaussian_denoiser(x, s)) / s


def test_euler_step_rule():
    xs = _run(kd.sample_euler, 3)
    for i in range(3):
        s0, s1 = float(SIGMAS[i]), float(SIGMAS[i + 1])
        expected = xs[i] + (s1 - s0) * d(xs[i], s0)            # EDM Alg. 2, Euler
        diff = (xs[i + 1] - expected).abs().max().item()
        print(f"euler step {i}: max diff {diff:.2e}")
        assert diff < 1e-6


def test_heun_step_rule():
    xs = _run(kd.sample_heun, 3)
    for i in range(3):
        s0, s1 = float(SIGMAS[i]), float(SIGMAS[i + 1])
        x_e = xs[i] + (s1 - s0) * d(xs[i], s0)
        expected = x_e if s1 == 0 else xs[i] + (s1 - s0) * 0.5 * (d(xs[i], s0) + d(x_e, s1))   # EDM Alg. 1
        diff = (xs[i + 1] - expected).abs().max().item()
        print(f"heun step {i}: max diff {diff:.2e}")
        assert diff < 1e-6


def test_heun_churn_matches_edm_alg2():
    """With s_churn, step i first raises sigma to sigma_hat = sigma (1 + gamma) with fresh noise."""
    x = _x0()
    gamma = min(2.0 / 3, 2 ** 0.5 - 1)
    g = torch.Generator().manual_seed(3)
    out = kd.sample_heun(gaussian_denoiser, x, SIGMAS[[0, 3]], generator=g, s_churn=2.0)   # one step, to 0
    g = torch.Generator().manual_seed(3)
    s0 = float(SIGMAS[0])
    s_hat = s0 * (1 + gamma)
    x_hat = x + torch.randn(x.shape, generator=g).double() * math.sqrt(s_hat ** 2 - s0 ** 2)
    expected = x_hat - s_hat * d(x_hat, s_hat)
    assert (out - expected).abs().max().item() < 1e-6


def test_euler_ancestral_step_rule():
    xs = _run(kd.sample_euler_ancestral, 3, eta=1.0)
    g = torch.Generator().manual_seed(7)
    for i in range(3):
        s0, s1 = float(SIGMAS[i]), float(SIGMAS[i + 1])
        # DDPM posterior noise in the VE view: sigma_up^2 = s1^2 (s0^2 - s1^2) / s0^2
        s_up = math.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2)
        s_down = math.sqrt(s1 ** 2 - s_up ** 2)
        expected = xs[i] + (s_down - s0) * d(xs[i], s0)
        if s1 > 0:
            expected = expected + s_up * torch.randn(xs[i].shape, generator=g).double()
        diff = (xs[i + 1] - expected).abs().max().item()
        print(f"euler_ancestral step {i}: max diff {diff:.2e}")
        assert diff < 1e-6


def test_euler_ancestral_eta0_is_euler():
    a = kd.sample_euler_ancestral(gaussian_denoiser, _x0(), SIGMAS, eta=0.0)
    b = kd.sample_euler(gaussian_denoiser, _x0(), SIGMAS)
    assert torch.equal(a, b)


def test_dpmpp_2m_step_rule():
    xs = _run(kd.sample_dpmpp_2m, 3)
    lam = -torch.log(SIGMAS[:3])
    D = [gaussian_denoiser(xs[i], float(SIGMAS[i])) for i in range(3)]
    # step 0: first order, DPM-Solver++(1) = DDIM: x1 = (s1/s0) x0 + (1 - e^{-h}) D0
    h0 = float(lam[1] - lam[0])
    e0 = float(SIGMAS[1] / SIGMAS[0]) * xs[0] + (1 - math.exp(-h0)) * D[0]
    # step 1: second order, Lu et al. 2022 Alg. 2: D' = (1 + 1/2r) D1 - 1/2r D0, r = h0 / h1
    h1 = float(lam[2] - lam[1])
    r = h0 / h1
    e1 = float(SIGMAS[2] / SIGMAS[1]) * xs[1] + (1 - math.exp(-h1)) * ((1 + 1 / (2 * r)) * D[1] - D[0] / (2 * r))
    # last step to sigma = 0: x = D
    for i, expected in enumerate([e0, e1, D[2]]):
        diff = (xs[i + 1] - expected).abs().max().item()
        print(f"dpmpp_2m step {i}: max diff {diff:.2e}")
        assert diff < 1e-6


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_step_rule(solver_type):
    eta = 1.0
    xs = _run(kd.sample_dpmpp_2m_sde, 3, eta=eta, solver_type=solver_type)
    g = torch.Generator().manual_seed(7)
    D = [gaussian_denoiser(xs[i], float(SIGMAS[i])) for i in range(3)]
    hs = [math.log(SIGMAS[i] / SIGMAS[i + 1]) for i in range(2)]
    for i in range(2):
        s0, s1, h = float(SIGMAS[i]), float(SIGMAS[i + 1]), hs[i]
        # exact solution of the linear part of the SDE in lambda, with data prediction D
        expected = s1 / s0 * math.exp(-eta * h) * xs[i] + (1 - math.exp(-(1 + eta) * h)) * D[i]
        if i == 1:
            r = hs[0] / h
            if solver_type == "midpoint":
                c = 0.5 * (1 - math.exp(-(1 + eta) * h))
            else:
                c = (1 - math.exp(-(1 + eta) * h)) / (-(1 + eta) * h) + 1
            expected = expected + c / r * (D[1] - D[0])
        expected = expected + s1 * math.sqrt(1 - math.exp(-2 * eta * h)) * torch.randn(xs[i].shape, generator=g).double()
        diff = (xs[i + 1] - expected).abs().max().item()
        print(f"dpmpp_2m_sde[{solver_type}] step {i}: max diff {diff:.2e}")
        assert diff < 1e-6
    assert (xs[3] - D[2]).abs().max().item() < 1e-6


def test_dpmpp_2m_sde_eta0_is_dpmpp_2m_midpoint_free_of_noise():
    """eta = 0: no noise drawn; the generator state is untouched."""
    g = torch.Generator().manual_seed(1)
    kd.sample_dpmpp_2m_sde(gaussian_denoiser, _x0(), SIGMAS, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())


# ----------------------------------------------------------------------------------------
# convergence to the data distribution
# ----------------------------------------------------------------------------------------
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde"]


def _moments(name, n_steps):
    sigmas = kd.get_sigmas_karras(n_steps, 0.002, 80.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50_000, dtype=torch.float64, generator=g)
    z = (z - z.mean()) / z.std(correction=0)                  # exact N(0, 1) moments: no MC error for ODEs
    x = MU + math.sqrt(S ** 2 + float(sigmas[0]) ** 2) * z      # the exact marginal at sigma_max
    out = kd.K_SAMPLERS[name](gaussian_denoiser, x[:, None], sigmas, generator=g)
    return out.mean().item(), out.var(correction=0).item()


# relative variance error allowed at 200 Karras steps: first-order vs second-order methods
TOLERANCE_200 = {"euler": 0.04, "euler_ancestral": 0.08, "heun": 0.005, "dpmpp_2m": 0.005, "dpmpp_2m_sde": 0.02}


@pytest.mark.parametrize("name", SAMPLERS)
def test_converges_to_data_distribution(name):
    errs = {}
    for n in (5, 10, 50, 200):
        m, v = _moments(name, n)
        errs[n] = abs(v - S ** 2) / S ** 2
        print(f"{name:16s} steps={n:3d} mean={m:.5f} (mu {MU}) var={v:.5f} (s^2 {S ** 2}) rel.err {errs[n]:.4f}")
        assert abs(m - MU) < 5e-3          # ODE samplers: exact (linear map); SDE ones: MC error ~ 2e-3
    assert errs[200] < errs[50] < errs[5]
    assert errs[200] < TOLERANCE_200[name]


# ----------------------------------------------------------------------------------------
# schedules and the discrete VP wrapper
# ----------------------------------------------------------------------------------------
def test_karras_sigmas_closed_form():
    s = kd.get_sigmas_karras(10, 0.03, 14.6, rho=7.)
    assert s.shape == (11,) and s[-1] == 0
    assert math.isclose(float(s[0]), 14.6, rel_tol=1e-12) and math.isclose(float(s[-2]), 0.03, rel_tol=1e-12)
    i = 4
    expected = (14.6 ** (1 / 7) + i / 9 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert math.isclose(float(s[i]), expected, rel_tol=1e-12)


def test_uniform_and_trailing_sigmas():
    ac = sd_alphas_cumprod()
    sig = np.sqrt((1 - ac) / ac)
    u = kd.get_sigmas_uniform(ac, 10)
    assert u.shape == (11,) and u[-1] == 0 and bool((u[:-1] > u[1:]).all())
    assert math.isclose(float(u[0]), sig[-1], rel_tol=1e-12) and math.isclose(float(u[-2]), sig[0], rel_tol=1e-12)
    # interior point at fractional t: log-sigma interpolation
    t = 999 * 8 / 9
    lo = int(math.floor(t))
    w = t - lo
    assert math.isclose(float(u[1]), math.exp((1 - w) * math.log(sig[lo]) + w * math.log(sig[lo + 1])), rel_tol=1e-9)
    tr = kd.get_sigmas_trailing(ac, 10)
    assert tr[-1] == 0 and math.isclose(float(tr[0]), sig[999], rel_tol=1e-12)
    np.testing.assert_allclose(tr[:-1].numpy(), sig[np.arange(999, -1, -100)], rtol=1e-12)


def test_trailing_sigmas_equal_diffusers_euler():
    from diffusers import EulerDiscreteScheduler
    sch = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 timestep_spacing="trailing")
    sch.set_timesteps(25)
    ours = kd.get_sigmas_trailing(sch.alphas_cumprod.double(), 25)
    diff = (ours.float() - sch.sigmas).abs().max().item()
    print("trailing sigmas vs diffusers EulerDiscreteScheduler: max diff", diff)
    assert diff < 1e-5 * float(ours[0])


def test_zero_terminal_snr_sigma_is_finite():
    ac = sd_alphas_cumprod().copy()
    ac[-1] = 0.0
    s = kd.get_sigmas_trailing(ac, 10)
    assert math.isfinite(float(s[0])) and math.isclose(float(s[0]), math.sqrt((1 - 2 ** -24) / 2 ** -24))


def _vp_eps_fn(den, calls):
    """The exact eps predictor of the Gaussian data at VP input x_t, timestep t."""
    def eps_fn(x_vp, t):
        calls.append(t)
        sigma = den.t_to_sigma(t.double()).reshape(-1, 1, 1, 1)
        x_ve = x_vp * (1 + sigma ** 2).sqrt()
        return (x_ve - gaussian_denoiser(x_ve, sigma.flatten())) / sigma
    return eps_fn


def test_discrete_vp_denoiser_equals_closed_form():
    ac = sd_alphas_cumprod()
    calls = []
    den = kd.DiscreteVPDenoiser(None, ac)
    den.eps_fn = _vp_eps_fn(den, calls)
    x = _x0().double()
    # at the discrete sigmas (t integer) and between them (fractional t, log-sigma interpolated)
    for sigma in (den.sigmas[500].item(), den.sigmas[37].item(), 3.3, 0.1):
        s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        diff = (den(x, s) - gaussian_denoiser(x, s)).abs().max().item()
        assert diff < 1e-4 * (1 + sigma), (sigma, diff)
    assert abs(calls[0][0].item() - 500) < 1e-3 and abs(calls[1][0].item() - 37) < 1e-3
    # sigma -> t -> sigma round trip
    s = torch.tensor([0.05, 0.5, 3.0, 14.0])
    np.testing.assert_allclose(den.t_to_sigma(den.sigma_to_t(s)).numpy(), s.numpy(), rtol=1e-4)


def test_discrete_vp_denoiser_quantize_gives_nearest_long_timestep():
    ac = sd_alphas_cumprod()
    seen = []
    den = kd.DiscreteVPDenoiser(lambda x, t: (seen.append(t), torch.zeros_like(x))[1], ac, quantize=True)
    sig = torch.tensor([den.sigmas[10].item() * 1.0001, den.sigmas[900].item() * 0.9999])
    den(torch.zeros(2, 1, 2, 2), sig)
    assert seen[0].dtype == torch.long and seen[0].tolist() == [10, 900]


def test_discrete_vp_denoiser_uses_the_networks_x0():
    den = kd.DiscreteVPDenoiser(lambda x, t: (torch.zeros_like(x), torch.full_like(x, 2.0)), sd_alphas_cumprod())
    out = den(torch.ones(1, 1, 2, 2), torch.tensor([1.0]))
    assert torch.equal(out, torch.full((1, 1, 2, 2), 2.0))


def test_bad_sigmas_raise():
    with pytest.raises(ValueError, match="decrease to a final 0"):
        kd.sample_euler(gaussian_denoiser, torch.zeros(1, 1), torch.tensor([1.0, 0.5]))


# ----------------------------------------------------------------------------------------
# oracle: diffusers' schedulers on a discrete VP eps model, through DiscreteVPDenoiser
# ----------------------------------------------------------------------------------------
def _smooth_eps(x, t):
    """An arbitrary eps model, smooth in x and t (t: a tensor of shape () or (B,))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    t = t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t
    return (0.3 * x * torch.cos(t / 300.0) + 0.1 * torch.sin(x)).to(x.dtype)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_full_run_equals_diffusers_scheduler(name):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    for n in (10, 25):
        if name == "euler":
            sch = EulerDiscreteScheduler(**common)
        elif name == "euler_ancestral":     # same noise draws: one randn per step from the generator
            sch = EulerAncestralDiscreteScheduler(**common)
        else:      # DPM-Solver++(2M), first order on the last step, which lands on sigma = 0
            sch = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                              lower_order_final=True, **common)
        sch.set_timesteps(n)
        sigmas = kd.get_sigmas_trailing(sch.alphas_cumprod.double(), n)
        # float32 for the ancestral sampler: both draw float32 noise
        dtype = torch.float32 if name == "euler_ancestral" else torch.float64
        z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
        x = z * float(sigmas[0])                                                  # VE start
        ref = x / (1 + sigmas[0] ** 2) ** 0.5 if name == "dpmpp_2m" else x.clone()   # diffusers' DPM runs in VP space
        g = torch.Generator().manual_seed(5)
        for t in sch.timesteps:
            ref = sch.step(_smooth_eps(sch.scale_model_input(ref, t), t), t, ref, generator=g).prev_sample
        ours = kd.K_SAMPLERS[name](kd.DiscreteVPDenoiser(_smooth_eps, sch.alphas_cumprod.double()), x, sigmas,
                                   generator=torch.Generator().manual_seed(5))
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        print(f"{name} {n} steps vs diffusers {type(sch).__name__}: max rel diff {rel:.1e}")
        assert rel < 1e-6          # diffusers keeps its sigmas in float32
