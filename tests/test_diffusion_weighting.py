"""Loss weightings over all t: the papers' closed forms and diffusers' min-SNR weights."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.diffusion import weighting as W
from ldm.diffusion.schedule import make_beta_schedule, schedule_arrays

T = 1000


def _diffusers_scheduler(kind):
    from diffusers import DDPMScheduler
    if kind == "scaled_linear":      # SD: linear in sqrt(beta), our "linear"
        return DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear")


def _ours_alphas_cumprod(kind):
    betas = (make_beta_schedule("linear", T, 0.00085, 0.012) if kind == "scaled_linear"
             else make_beta_schedule("sqrt_linear", T, 1e-4, 2e-2))     # LDM's "sqrt_linear" = linear in beta
    return torch.tensor(schedule_arrays(betas)["alphas_cumprod"])


def _diffusers_min_snr(sch, t, gamma, prediction_type):
    """The weights of diffusers' train_text_to_image.py for --snr_gamma (the reference recipe)."""
    from diffusers.training_utils import compute_snr
    snr = compute_snr(sch, t)
    w = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return w / snr
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    return w


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
@pytest.mark.parametrize("param,dname", [("eps", "epsilon"), ("v", "v_prediction"), ("x0", "sample")])
def test_min_snr_equals_diffusers(kind, param, dname):
    sch = _diffusers_scheduler(kind)
    t = torch.arange(T)
    ours_ac = _ours_alphas_cumprod(kind)
    # our schedule is diffusers' schedule (theirs is accumulated in float32)
    assert (ours_ac.float() - sch.alphas_cumprod).abs().max().item() < 1e-5
    # 1) on the scheduler's own float32 abar
    ref = _diffusers_min_snr(sch, t, 5.0, dname)
    w32 = W.MinSNRWeighting(5.0)(t, sch.alphas_cumprod, param)
    assert w32.shape == (T,) and w32.dtype == torch.float32
    d_same = ((w32 - ref).abs() / ref).max().item()
    # 2) on our float64 abar, handed to diffusers' compute_snr through the same scheduler object
    sch.alphas_cumprod = ours_ac
    ref = _diffusers_min_snr(sch, t, 5.0, dname)
    ours = W.MinSNRWeighting(5.0)(t, ours_ac, param).float()
    d_ours = ((ours - ref).abs() / ref).max().item()
    print(f"min-SNR-5 {kind:13s} {param:3s}: max rel diff vs diffusers {d_same:.2e} (diffusers' abar), "
          f"{d_ours:.2e} (our abar)")
    assert d_same < 1e-6 and d_ours < 1e-6


def _closed_forms(snr):
    g, k, p, sd = 5.0, 1.0, 1.0, 0.5
    sigma2 = 1 / snr
    edm_x0 = (sigma2 + sd ** 2) / (sigma2 * sd ** 2)         # Karras et al. 2022 lambda(sigma)
    p2_eps = 1 / (k + snr) ** p                               # Choi et al. 2022 Eq. 8
    min_x0 = np.minimum(snr, g)                               # Hang et al. 2023
    return {
        "min": {"x0": min_x0, "eps": min_x0 / snr, "v": min_x0 / (snr + 1)},
        "p2": {"eps": p2_eps, "x0": p2_eps * snr, "v": p2_eps * snr / (snr + 1)},
        "edm": {"x0": edm_x0, "eps": edm_x0 / snr, "v": edm_x0 / (snr + 1)},
    }


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_closed_forms(param):
    ac = _ours_alphas_cumprod("scaled_linear")
    snr = (ac / (1 - ac)).numpy()
    ref = _closed_forms(snr)
    t = torch.arange(T)
    for name, obj in (("min", W.MinSNRWeighting(5.0)), ("p2", W.P2Weighting(1.0, 1.0)), ("edm", W.EDMWeighting(0.5))):
        w = obj(t, ac, param).numpy()                          # float64 abar -> float64 weights
        rel = np.abs(w - ref[name][param]) / np.abs(ref[name][param])
        print(f"{name:3s} {param:3s}: max rel diff vs closed form {rel.max():.2e}")
        assert rel.max() < 1e-6


def test_weights_are_the_same_weighting_across_targets():
    """w_eps * ||eps err||^2 == w_x0 * ||x0 err||^2 == w_v * ||v err||^2 for one prediction."""
    ac = _ours_alphas_cumprod("linear")
    t = torch.tensor([0, 10, 300, 999])
    a = ac[t].sqrt()[:, None]
    s = (1 - ac[t]).sqrt()[:, None]
    g = torch.Generator().manual_seed(0)
    x0, eps, x0_hat = (torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    xt = a * x0 + s * eps
    eps_hat = (xt - a * x0_hat) / s
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    err = {"x0": (x0 - x0_hat).pow(2).sum(1), "eps": (eps - eps_hat).pow(2).sum(1), "v": (v - v_hat).pow(2).sum(1)}
    for obj in (W.MinSNRWeighting(5.0), W.P2Weighting(0.5), W.EDMWeighting(0.5)):
        losses = [obj(t, ac, p) * err[p] for p in ("x0", "eps", "v")]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
        torch.testing.assert_close(losses[2], losses[0], rtol=1e-9, atol=0)


def test_edm_sigma_data_one_is_unweighted_v():
    ac = _ours_alphas_cumprod("scaled_linear")
    w = W.EDMWeighting(1.0)(torch.arange(T), ac, "v")
    assert torch.allclose(w, torch.ones_like(w), atol=1e-12)


def test_min_snr_at_zero_terminal_snr_is_finite():
    ac = _ours_alphas_cumprod("scaled_linear").clone()
    ac[-1] = 0.0
    t = torch.tensor([T - 1])
    assert W.MinSNRWeighting(5.0)(t, ac, "eps").item() == 1.0
    assert W.MinSNRWeighting(5.0)(t, ac, "v").item() == 0.0


def test_build_loss_weighting():
    assert W.build_loss_weighting(None) is None
    assert W.build_loss_weighting({"snr_gamma": None}) is None
    w = W.build_loss_weighting(OmegaConf.create({"snr_gamma": 5}))
    assert isinstance(w, W.MinSNRWeighting) and w.gamma == 5.0
    w = W.build_loss_weighting(OmegaConf.create({"target": "ldm.diffusion.weighting.P2Weighting",
                                                 "params": {"gamma": 0.5, "k": 1.0}}))
    assert isinstance(w, W.P2Weighting) and w.gamma == 0.5
    e = W.EDMWeighting()
    assert W.build_loss_weighting(e) is e
    with pytest.raises(ValueError, match="snr_gamma"):
        W.build_loss_weighting({"snr_gama": 5})
    with pytest.raises(TypeError, match="not a ldm.diffusion.weighting.LossWeighting"):
        W.build_loss_weighting({"target": "torch.nn.Identity"})
    with pytest.raises(NotImplementedError, match="parameterization"):
        W.MinSNRWeighting()(torch.tensor([0]), torch.tensor([0.5]), "score")
