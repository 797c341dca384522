"""DDIMSampler / PLMSSampler / DPMSolverSampler: the original interfaces on a stand-in model.

The stand-in has the attributes the samplers use (num_timesteps, schedule buffers,
parameterization, apply_model, q_sample, device) and predicts analytically, so results can
be checked against closed forms; the golden cases check the real LatentDiffusion.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.diffusion.schedule import make_beta_schedule, schedule_tensors
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling.schedule_view import DiscreteVPSchedule

N = 1000
SHAPE = (3, 4, 4)


class StandIn(torch.nn.Module):
    """Predicts eps / x0 / v exactly for a point mass at `x0` shifted by the conditioning c
    (target = x0 + c), at integer or (DPM-Solver) fractional timesteps."""

    def __init__(self, x0: torch.Tensor, parameterization: str = "eps"):
        super().__init__()
        self.num_timesteps = N
        self.parameterization = parameterization
        for k, v in schedule_tensors(make_beta_schedule("linear", N, 0.00085, 0.0120)).items():
            self.register_buffer(k, v)
        self.x0 = x0
        self.calls: list[int] = []
        self.vp = DiscreteVPSchedule(self.alphas_cumprod.double())

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.long:
            return self.alphas_cumprod.double()[t]
        return self.vp.marginal_alpha((t.double() + 1) / N) ** 2        # fractional model time

    def apply_model(self, x, t, c):
        self.calls.append(x.shape[0])
        if isinstance(c, dict):
            c = c["c_crossattn"][0]
        target = self.x0.double() + c.double().view(-1, 1, 1, 1)
        a = self._abar(t).view(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * target) / (1 - a).sqrt()
        out = {"eps": eps, "x0": target, "v": a.sqrt() * eps - (1 - a).sqrt() * target}[self.parameterization]
        return out.to(x.dtype)

    def q_sample(self, x_start, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x_start
                + self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x0():
    return torch.randn((1, *SHAPE), generator=gen(5)) * 0.5


def cond(value: float, b: int = 2) -> torch.Tensor:
    return torch.full((b,), value)


def test_ddim_sampler_attributes_match_original_formulas(x0):
    s = DDIMSampler(StandIn(x0))
    assert s.device == torch.device("cpu")                  # the model's device, never forced CUDA
    s.make_schedule(10, ddim_eta=0.5, verbose=False)
    ac = s.model.alphas_cumprod
    np.testing.assert_array_equal(s.ddim_timesteps, np.arange(0, N, 100) + 1)
    torch.testing.assert_close(s.ddim_alphas, ac[s.ddim_timesteps])
    assert isinstance(s.ddim_alphas_prev, np.ndarray) and s.ddim_alphas_prev[0] == float(ac[0])
    a, ap = s.ddim_alphas.double(), torch.from_numpy(s.ddim_alphas_prev)
    torch.testing.assert_close(s.ddim_sigmas, 0.5 * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt())
    torch.testing.assert_close(s.ddim_sqrt_one_minus_alphas, (1 - s.ddim_alphas).sqrt())
    assert s.ddim_sigmas_for_original_num_steps.shape == (N,)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_ddim_sampler_recovers_target_with_cfg(x0, parameterization):
    model = StandIn(x0, parameterization)
    s = DDIMSampler(model)
    samples, inter = s.sample(8, 2, SHAPE, conditioning=cond(1.0), unconditional_conditioning=cond(0.0),
                              unconditional_guidance_scale=3.0, verbose=False, log_every_t=2,
                              x_T=torch.randn((2, *SHAPE), generator=gen()))
    assert set(model.calls) == {4} and len(model.calls) == 8     # cond + uncond in one call per step
    # guidance extrapolates the target: uncond (x0) + 3 (x0 + 1 - x0) = x0 + 3
    for p in inter["pred_x0"][1:]:
        torch.testing.assert_close(p, (x0 + 3.0).expand_as(p), atol=1e-4, rtol=1e-4)
    assert len(inter["x_inter"]) == 1 + 4 + 1                # x_T, indices 6, 4, 2, 0 and the first (7)


def test_ddim_use_original_steps_works_and_lands_on_clean_data(x0):
    s = DDIMSampler(StandIn(x0))
    s.make_schedule(10, ddim_eta=0.0, verbose=False)
    out, inter = s.ddim_sampling(cond(0.0), (2, *SHAPE), x_T=torch.randn((2, *SHAPE), generator=gen()),
                                 ddim_use_original_steps=True, timesteps=200, log_every_t=100)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=0)
    assert len(inter["x_inter"]) == 1 + 2 + 1                 # x_T, t = 199 (first), 100, 0
    x = torch.randn((2, *SHAPE), generator=gen(1))
    x_prev, pred = s.p_sample_ddim(x, cond(0.0), torch.full((2,), 500), index=500, use_original_steps=True)
    torch.testing.assert_close(pred, x0.expand_as(pred), atol=1e-4, rtol=0)


def test_ddim_sampler_generator_and_callbacks(x0):
    s = DDIMSampler(StandIn(x0))
    seen = []
    kw = dict(conditioning=cond(0.0), eta=1.0, verbose=False, img_callback=lambda p, i: seen.append(i))
    a, _ = s.sample(5, 2, SHAPE, generator=gen(3), **kw)
    b, _ = s.sample(5, 2, SHAPE, generator=gen(3), **kw)
    c, _ = s.sample(5, 2, SHAPE, generator=gen(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert seen == [0, 1, 2, 3, 4] * 3


def test_ddim_dict_conditioning_and_ucg_schedule(x0):
    model = StandIn(x0)
    s = DDIMSampler(model)
    c = {"c_concat": [torch.zeros(2, 1, 4, 4)], "c_crossattn": [cond(1.0)]}
    uc = {"c_concat": [torch.zeros(2, 1, 4, 4)], "c_crossattn": [cond(0.0)]}
    _, inter = s.sample(4, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, verbose=False,
                        log_every_t=1, ucg_schedule=[1.0, 2.0, 3.0, 4.0])
    for scale, p in zip([1.0, 2.0, 3.0, 4.0], inter["pred_x0"][1:]):
        torch.testing.assert_close(p, (x0 + scale).expand_as(p), atol=1e-4, rtol=1e-4)
    assert model.calls == [2, 4, 4, 4]                         # scale 1: a plain conditional call


def test_img2img_stochastic_encode_then_decode(x0):
    torch.manual_seed(0)   # stochastic_encode draws its noise from the global RNG
    s = DDIMSampler(StandIn(x0))
    s.make_schedule(20, ddim_eta=0.0, verbose=False)
    t_enc = 12
    z = s.stochastic_encode(x0.expand(2, *SHAPE), torch.tensor([t_enc] * 2))
    out = s.decode(z, cond(0.0), t_enc)
    a0 = float(s.model.alphas_cumprod[0])
    # back at x0, up to the noise left at the abar_0 level: sqrt(1 - abar_0) * |eps| with |eps| < 6
    assert (out - a0 ** 0.5 * x0).abs().max() < 6 * (1 - a0) ** 0.5
    enc, info = s.encode(x0.expand(2, *SHAPE), cond(0.0), t_enc)
    assert enc.shape == (2, *SHAPE) and info["x_encoded"] is enc


def test_plms_sampler(x0):
    model = StandIn(x0)
    s = PLMSSampler(model)
    with pytest.raises(ValueError, match="ddim_eta must be 0"):
        s.sample(5, 2, SHAPE, conditioning=cond(0.0), eta=0.5, verbose=False)
    model.calls.clear()
    out, inter = s.sample(5, 2, SHAPE, conditioning=cond(1.0), unconditional_conditioning=cond(0.0),
                          unconditional_guidance_scale=2.0, verbose=False, log_every_t=1)
    assert model.calls == [4] * 6                              # the first step evaluates twice
    for p in inter["pred_x0"][1:]:
        torch.testing.assert_close(p, (x0 + 2.0).expand_as(p), atol=1e-4, rtol=1e-4)
    s.make_schedule(5, verbose=False)
    out, _ = s.plms_sampling(cond(0.0), (2, *SHAPE), ddim_use_original_steps=True, timesteps=30)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpm_solver_sampler_reaches_target(x0, parameterization):
    model = StandIn(x0, parameterization)
    s = DPMSolverSampler(model, device=torch.device("cpu"))
    out, inter = s.sample(S=10, batch_size=2, shape=SHAPE, conditioning=cond(1.0),
                          unconditional_conditioning=cond(0.0), unconditional_guidance_scale=2.0, verbose=False,
                          x_T=torch.randn((2, *SHAPE), generator=gen()))
    assert inter is None and model.calls == [4] * 10
    # a point mass: the ODE ends at alpha_0 * target + sigma_0 * eps with |eps| ~ 1, sigma_0 ~ 0.03
    assert (out - (x0 + 2.0)).abs().max() < 0.15
    with pytest.raises(NotImplementedError):
        s.sample(S=4, batch_size=2, shape=SHAPE, conditioning=cond(1.0), mask=torch.ones(2, *SHAPE), x0=out)
