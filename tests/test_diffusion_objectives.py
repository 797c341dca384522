"""ldm.diffusion.objectives and the DDPM / LatentDiffusion losses built on them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ldm.diffusion import objectives as O
from ldm.diffusion.schedule import make_beta_schedule, schedule_tensors
from ldm.util import instantiate_from_config


class Sched:
    """A bare schedule holder (what the objective functions read)."""

    def __init__(self, schedule="linear", T=1000, **kw):
        for k, v in schedule_tensors(make_beta_schedule(schedule, T, **kw), 0.0, "eps").items():
            setattr(self, k, v)


class ConstNet(nn.Module):
    """A 'UNet' returning a fixed tensor (set as .out) and recording its inputs."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.out = None
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((x, t, kwargs))
        return self.out + 0 * self.p


def _ddpm(parameterization="eps", **kw):
    cfg = {"target": "ldm.models.diffusion.ddpm.DDPM",
           "params": dict(unet_config={"target": f"{__name__}.ConstNet"}, timesteps=100, image_size=4, channels=3,
                          use_ema=False, parameterization=parameterization, **kw)}
    return instantiate_from_config(cfg)


def test_q_sample_marginal_statistics():
    s = Sched()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    t = torch.full((200_000,), 400, dtype=torch.long)
    xt = O.q_sample(s, x0, t, noise=torch.randn(x0.shape, generator=g))
    abar = float(s.alphas_cumprod[400])
    assert float(xt.mean()) == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
    assert float(xt.var()) == pytest.approx(1 - abar, rel=1e-2)
    mean, var, logvar = O.q_mean_variance(s, x0[:2].view(2, 1), t[:2])
    assert float(mean[0]) == pytest.approx(math.sqrt(abar) * 0.7, rel=1e-6)
    assert float(var[0]) == pytest.approx(1 - abar, rel=1e-6)
    assert float(logvar[0]) == pytest.approx(math.log(1 - abar), rel=1e-5)


def test_q_sample_draws_noise_when_none_given():
    s = Sched(T=10)
    torch.manual_seed(3)
    a = O.q_sample(s, torch.zeros(2, 3), torch.tensor([9, 9]))
    torch.manual_seed(3)
    b = math.sqrt(1 - float(s.alphas_cumprod[9])) * torch.randn(2, 3)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_conversions_round_trip(t):
    s = Sched()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    ts = torch.full((3,), t, dtype=torch.long)
    xt = O.q_sample(s, x0, ts, eps)
    tol = dict(atol=2e-4 * (1 + float(s.sqrt_recip_alphas_cumprod[t])), rtol=1e-5)
    # eps <-> x0
    assert torch.allclose(O.predict_start_from_noise(s, xt, ts, eps), x0, **tol)
    assert torch.allclose(O.predict_eps_from_xstart(s, xt, ts, x0), eps, **tol) if t > 0 else True
    # v: v = sqrt(abar) eps - sqrt(1 - abar) x0, and back
    v = O.get_v(s, x0, eps, ts)
    a, b = math.sqrt(float(s.alphas_cumprod[t])), math.sqrt(1 - float(s.alphas_cumprod[t]))
    assert torch.allclose(v, a * eps - b * x0, atol=1e-5)
    assert torch.allclose(O.predict_start_from_z_and_v(s, xt, ts, v), x0, atol=1e-5)
    assert torch.allclose(O.predict_eps_from_z_and_v(s, xt, ts, v), eps, atol=1e-5)
    for p, out in (("eps", eps), ("x0", x0), ("v", v)):
        assert torch.allclose(O.predict_start(s, p, xt, ts, out), x0, **tol)


def test_q_posterior_is_the_bayes_posterior():
    s = Sched(T=20)
    x0, xt = torch.randn(1, 2), torch.randn(1, 2)
    t = torch.tensor([7])
    mean, var, logvar = O.q_posterior(s, x0, xt, t)
    abar, abar_prev = float(s.alphas_cumprod[7]), float(s.alphas_cumprod[6])
    beta = float(s.betas[7])
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    expect_mean = (math.sqrt(abar_prev) / (1 - abar_prev) * x0 + math.sqrt(1 - beta) / beta * xt) / prec
    assert torch.allclose(mean, expect_mean, atol=1e-5)
    assert float(var) == pytest.approx(1 / prec, rel=1e-5)
    assert float(logvar) == pytest.approx(math.log(1 / prec), rel=1e-5)


def test_get_loss_types():
    p, q = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert float(O.get_loss(p, q, "l2")) == pytest.approx(2.5)
    assert O.get_loss(p, q, "l2", mean=False).tolist() == [[1.0, 4.0]]
    assert float(O.get_loss(p, q, "l1")) == pytest.approx(1.5)
    with pytest.raises(NotImplementedError):
        O.get_loss(p, q, "huber")


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_ddpm_p_losses_target(parameterization):
    model = _ddpm(parameterization, original_elbo_weight=0.5, l_simple_weight=2.0)
    g = torch.Generator().manual_seed(2)
    x0, noise, out = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([5, 80])
    model.model.diffusion_model.out = out
    model.train()
    loss, d = model.p_losses(x0, t, noise=noise)
    abar = model.alphas_cumprod.double()[t].view(2, 1, 1, 1)
    target = {"eps": noise, "x0": x0,
              "v": (abar.sqrt() * noise - (1 - abar).sqrt() * x0).float()}[parameterization]
    per = ((out - target) ** 2).mean(dim=(1, 2, 3))
    vlb = (model.lvlb_weights[t] * per).mean()
    assert set(d) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    assert float(d["train/loss_simple"]) == pytest.approx(float(per.mean()), rel=1e-5)
    assert float(d["train/loss_vlb"]) == pytest.approx(float(vlb), rel=1e-5)
    assert float(loss) == pytest.approx(float(2.0 * per.mean() + 0.5 * vlb), rel=1e-5)
    # the network saw x_t = q_sample(x0, t, noise)
    x_seen, t_seen, _ = model.model.diffusion_model.calls[-1]
    assert torch.allclose(x_seen, model.q_sample(x0, t, noise)) and torch.equal(t_seen, t)
    model.eval()
    assert set(model.p_losses(x0, t, noise=noise)[1]) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_ldm_loss_with_learned_logvar():
    loss_simple = torch.tensor([1.0, 3.0])
    logvar = torch.nn.Parameter(torch.tensor([0.0, 0.5, 1.0]))
    t = torch.tensor([1, 2])
    lvlb = torch.tensor([1.0, 2.0, 4.0])
    loss, d = O.diffusion_loss(loss_simple, t, lvlb, 1.5, 0.1, "train", logvar=logvar, learn_logvar=True)
    gamma = torch.tensor([1.0 / math.exp(0.5) + 0.5, 3.0 / math.exp(1.0) + 1.0])
    vlb = float((torch.tensor([2.0, 4.0]) * loss_simple).mean())
    assert list(d) == ["train/loss_simple", "train/loss_gamma", "logvar", "train/loss_vlb", "train/loss"]
    assert float(d["train/loss_gamma"]) == pytest.approx(float(gamma.mean()))
    assert float(d["logvar"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(1.5 * float(gamma.mean()) + 0.1 * vlb, rel=1e-6)
    loss.backward()
    assert logvar.grad is not None and float(logvar.grad[1]) != 0.0


def test_ddpm_logvar_buffer_or_parameter():
    fixed = _ddpm()
    assert "logvar" not in fixed.state_dict() and fixed.logvar.shape == (100,)
    learned = _ddpm(learn_logvar=True, logvar_init=-1.0)
    assert isinstance(learned.logvar, nn.Parameter) and "logvar" in learned.state_dict()
    assert float(learned.logvar[3]) == -1.0
    assert any(p is learned.logvar for p in learned.trainable_parameters())
