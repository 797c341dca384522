"""The model layer's seams: the denoiser (eps / x0 / v against closed forms), the schedule value,
the loss-weighting seam (default = the original objective, min-SNR wired), the opt-in training
noise recipes, zero-terminal-SNR with v, the conditioning routing table and ucg_rate dropout."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from ldm.diffusion import denoiser as D
from ldm.diffusion.conditioning import (COND_ROUTES, WRAPPER_KEYS, WRAPPER_ROUTES, ConditioningDropout, CondRoute,
                                        cond_route)
from ldm.diffusion.schedule import Coefficients, Schedule, make_beta_schedule
from ldm.util import instantiate_from_config
from test_diffusion_models import _cfg, _images, _ldm

HERE = __name__


def _schedule(T=50):
    return Schedule.from_betas(make_beta_schedule("linear", T, 1e-3, 0.05))


# ----------------------------------------------------------------------------------------
# Denoiser and schedule value
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_denoiser_conversions_match_the_closed_forms(parameterization):
    sched = _schedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    t = torch.tensor([0, 5, 17, 30, 42, 49])
    a = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
    v = (a.sqrt() * eps - (1 - a).sqrt() * x0).float()
    truth = {"eps": eps, "x0": x0, "v": v}
    den = D.Denoiser.discrete(lambda x, tt, c: truth[parameterization], sched, parameterization)
    pred = den(x_t, t)
    torch.testing.assert_close(pred.eps, eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(pred.x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(den.v(x_t, t), v, atol=2e-4, rtol=1e-4)
    # the sampler view: eps for eps models, (eps, x0) otherwise
    out = den.eps_fn(None)(x_t, t)
    assert isinstance(out, tuple) == (parameterization != "eps")
    # continuous-time coefficients from (alpha, sigma) agree with the buffers
    c = Coefficients.from_alpha_sigma(a.sqrt().float(), (1 - a).sqrt().float())
    torch.testing.assert_close(D.to_x0(truth[parameterization], x_t, c, parameterization), x0, atol=2e-4, rtol=1e-4)


def test_schedule_value_is_a_view_with_snr_quantities():
    model = _ldm()
    view = model.schedule
    assert view.alphas_cumprod is model.alphas_cumprod and view.num_timesteps == 20   # the buffers, not copies
    ac = model.alphas_cumprod.double()
    torch.testing.assert_close(view.snr, ac / (1 - ac))
    torch.testing.assert_close(view.sigmas, torch.sqrt((1 - ac) / ac))
    torch.testing.assert_close(view.log_snr, torch.log(ac / (1 - ac)))
    with pytest.raises(Exception):
        view.betas = None                                                               # frozen


# ----------------------------------------------------------------------------------------
# Loss weighting seam and training noise
# ----------------------------------------------------------------------------------------
def _loss(model, x, t, noise):
    return model.p_losses(x, None, t, noise=noise)


def test_loss_weighting_default_is_the_original_and_min_snr_is_wired():
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 4, 9, 17])
    base = _ldm()
    loss0, log0 = _loss(base, x, t, noise)
    per_sample = ((base.apply_model(base.q_sample(x, t, noise), t, None) - noise) ** 2).mean(dim=(1, 2, 3))
    assert float(loss0) == pytest.approx(float(per_sample.mean()), rel=1e-6)     # the original objective
    for kw in ({"snr_gamma": 5.0},
               {"loss_weighting": {"target": "ldm.diffusion.weighting.MinSNRWeighting", "params": {"gamma": 5.0}}}):
        m = _ldm(**kw)
        m.load_state_dict(base.state_dict())
        loss, log = _loss(m, x, t, noise)
        snr = base.alphas_cumprod[t].double() / (1 - base.alphas_cumprod[t].double())
        w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr                 # min-SNR-5 for eps (Hang et al.)
        assert float(loss) == pytest.approx(float((w * per_sample.double()).mean()), rel=1e-5)
        assert float(log["train/loss_simple"]) == pytest.approx(float(log0["train/loss_simple"]))   # unweighted
    with pytest.raises(ValueError, match="either loss_weighting or its short form snr_gamma"):
        _ldm(snr_gamma=5.0, loss_weighting={"target": "ldm.diffusion.weighting.MinSNRWeighting"})


def test_noise_offset_and_input_perturbation_draw_only_when_enabled():
    x = torch.randn(3, 3, 2, 2)
    t = torch.tensor([2, 5, 7])
    torch.manual_seed(0)
    _loss(_ldm(), x, t, None)
    after_default = torch.randn(1)
    torch.manual_seed(0)
    base_noise = torch.randn_like(x)
    assert float(torch.randn(1)) == float(after_default)          # defaults draw exactly one randn_like

    m = _ldm(noise_offset=0.1)
    torch.manual_seed(0)
    eps = m.training_noise.draw(x)
    torch.manual_seed(0)
    expect = torch.randn_like(x) + 0.1 * torch.randn(3, 3, 1, 1)  # diffusers' noise_offset
    torch.testing.assert_close(eps, expect)

    m = _ldm(input_perturbation=0.2)
    seen = []
    m.apply_model = lambda xn, tt, c: seen.append(xn) or xn
    torch.manual_seed(0)
    _loss(m, x, t, None)
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    perturbed = noise + 0.2 * torch.randn_like(noise)
    torch.testing.assert_close(seen[0], m.q_sample(x, t, perturbed))   # the input sees the perturbed noise
    assert torch.equal(noise, base_noise)


def test_zero_terminal_snr_with_v_samples():
    from ldm.sampling import registry
    m = _ldm(rescale_betas_zero_snr=True, parameterization="v")
    assert float(m.alphas_cumprod[-1]) == 0.0
    plain = _ldm(parameterization="v")
    assert float(m.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for name, opts in (("ddim", {"timestep_spacing": "trailing"}), ("euler", {"sigma_schedule": "trailing"})):
        z = registry.sample(name, m, x_T, 5, **opts)
        assert torch.isfinite(z).all(), name


# ----------------------------------------------------------------------------------------
# Conditioning routing and ucg_rate
# ----------------------------------------------------------------------------------------
def test_routing_tables():
    assert WRAPPER_KEYS == (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")
    assert WRAPPER_ROUTES["hybrid-adm"].concat and WRAPPER_ROUTES["hybrid-adm"].context
    assert WRAPPER_ROUTES["adm"].y == "c_crossattn" and WRAPPER_ROUTES["crossattn-adm"].y == "c_adm"
    assert cond_route("caption").read == "raw" and cond_route("class_label").read == "batch"
    assert cond_route("segmentation").tiled and not cond_route("masked_image").tiled   # default: untiled image
    assert {r.null for r in COND_ROUTES.values()} == {"empty_prompt", "null_class", "zeros", None}


@pytest.mark.parametrize("null", ["empty_prompt", "null_class", "zeros"])
def test_ucg_fraction_and_seed(null):
    drop = ConditioningDropout({"cond": 0.1, "c_concat": 0.25}, CondRoute("raw", None, null))
    for name, p in (("cond", 0.1), ("c_concat", 0.25)):
        a = drop.draw(name, 10_000, "cpu", torch.Generator().manual_seed(3))
        b = drop.draw(name, 10_000, "cpu", torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        assert abs(float(a.float().mean()) - p) < 0.01, (name, float(a.float().mean()))
    assert drop.draw("c_adm", 4, "cpu") is None


class ClassCounter(nn.Module):
    """A class 'embedder' recording the labels it encodes."""

    def __init__(self, key="class_label"):
        super().__init__()
        self.key, self.seen = key, None
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        self.seen = batch[self.key].clone()
        return (batch[self.key].float().view(-1, 1, 1) + self.p).expand(-1, 2, 4)

    def get_unconditional_conditioning(self, bs, device=None):
        return {self.key: torch.full((bs,), 9, dtype=torch.long, device=device)}


def test_ucg_rate_drops_text_and_class_to_the_sampling_null(monkeypatch):
    n = 10_000
    text = _ldm(cond_stage_config=_cfg("test_diffusion_models.TextEncoder"), conditioning_key="crossattn",
                cond_stage_key="caption", ucg_rate=0.2)
    text.train()
    monkeypatch.setattr(type(text), "forward", lambda self, x, c: (x, c))
    batch = {"image": _images(n, h=2), "caption": ["a cat"] * n}
    torch.manual_seed(0)
    _, c = text.shared_step(batch)
    seen = text.cond_stage_model.seen
    assert abs(seen.count("") / n - 0.2) < 0.01
    null = text.get_unconditional_conditioning(1, [""])
    assert torch.equal(c[[i for i, s in enumerate(seen) if s == ""][0]], null[0])  # = the sampling-time uncond
    torch.manual_seed(0)
    text.shared_step(batch)
    assert text.cond_stage_model.seen == seen                                     # same seed, same drops
    text.eval()
    text.shared_step({"image": _images(4, h=2), "caption": ["a cat"] * 4})
    assert "" not in text.cond_stage_model.seen                                   # training only

    cls = _ldm(cond_stage_config=_cfg(f"{HERE}.ClassCounter"), conditioning_key="crossattn",
               cond_stage_key="class_label", ucg_rate={"cond": 0.3})
    cls.train()
    monkeypatch.setattr(type(cls), "forward", lambda self, x, c: (x, c))
    cls.shared_step({"image": _images(n, h=2), "class_label": torch.full((n,), 4)})
    assert abs(float((cls.cond_stage_model.seen == 9).float().mean()) - 0.3) < 0.01


def test_ucg_rate_zeroes_concat_and_hybrid_slots(monkeypatch):
    n = 10_000
    model = _ldm(cond_stage_config="__is_first_stage__", conditioning_key="concat", cond_stage_key="image",
                 unet_out=3, ucg_rate=0.15)
    model.train()
    monkeypatch.setattr(type(model), "forward", lambda self, x, c: (x, c))
    _, c = model.shared_step({"image": _images(n, h=2) * 0.5 + 0.6})
    zeroed = (c.flatten(1).abs().sum(1) == 0).float().mean()
    assert abs(float(zeroed) - 0.15) < 0.01
    hybrid = {"c_concat": [torch.ones(n, 1, 2, 2)], "c_crossattn": [torch.ones(n, 2, 4)]}
    drop = ConditioningDropout({"c_concat": 0.05}, cond_route("caption"))
    model.conditioning_dropout = drop
    out = model._drop_cond_slots(hybrid, drop)
    assert abs(float((out["c_concat"][0].flatten(1).sum(1) == 0).float().mean()) - 0.05) < 0.01
    assert torch.equal(out["c_crossattn"][0], hybrid["c_crossattn"][0])
    with pytest.raises(ValueError, match="unknown conditioning"):
        ConditioningDropout({"text": 0.1}, cond_route("caption"))
    with pytest.raises(ValueError, match="unconditional"):
        _ldm(ucg_rate=0.1)


# ----------------------------------------------------------------------------------------
# The v-objective switch: one key on every shipped diffusion config
# ----------------------------------------------------------------------------------------
def _shipped_diffusion_configs():
    from conftest import ROOT
    paths = sorted((ROOT / "configs").glob("ldm/*.yaml")) + sorted((ROOT / "configs").glob("stable-diffusion/*.yaml"))
    return [p for p in paths + [ROOT / "configs/quickstart/ldm_digits.yaml"] if p.is_file()]


@pytest.mark.slow
def test_every_shipped_config_switches_to_v_with_one_key(tmp_path):
    from ldm import scripting as S
    from test_scripts_common import script
    tiny_model = script("make_tiny_checkpoint").tiny_model
    configs = _shipped_diffusion_configs()
    assert len(configs) >= 15
    vocab = tmp_path / "vocab.txt"   # BERTEmbedder reads its tokenizer when built (offline)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo"]) + "\n")
    for path in configs:
        model_cfg = tiny_model(S.strip_ckpt_paths(S.load_config(path)["model"]), tmp_path)
        cond = model_cfg["params"].get("cond_stage_config")
        if isinstance(cond, dict) and str(cond.get("target", "")).endswith("BERTEmbedder"):
            cond.setdefault("params", {})["tokenizer_path"] = str(vocab)
        model_cfg["params"]["parameterization"] = "v"
        with S.random_hub_weights():
            model = instantiate_from_config(model_cfg)
        assert model.parameterization == "v" and bool((model.lvlb_weights == 1).all()), path.name
        z = torch.randn(2, model.channels, 4, 4)
        noise, t = torch.randn_like(z), torch.tensor([3, 700])
        model.apply_model = lambda x, tt, c: torch.zeros_like(x)        # the loss is then |v target|
        loss, _ = model.diffusion_loss(z, None, t, noise)
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        v = a.sqrt() * noise - (1 - a).sqrt() * z
        per = (v.abs() if model.loss_type == "l1" else v ** 2).mean(dim=(1, 2, 3))
        lv = model.logvar[t]
        expect = model.l_simple_weight * (per / lv.exp() + lv).mean() + model.original_elbo_weight * per.mean()
        assert float(loss) == pytest.approx(float(expect), rel=1e-5), path.name


def test_get_input_is_the_original_list_with_names():
    from ldm.models.diffusion.latent import LatentInput
    out = LatentInput(["z", "c", "x", "xrec", "xc"], ["z", "c", "x", "xrec", "xc"])
    z, c, x, xrec, xc = out                      # the original's unpacking
    assert isinstance(out, list) and out[:2] == ["z", "c"] and (out.z, out.c, out.xrec, out.xc) == (z, c, xrec, xc)
    short = LatentInput([1, 2], ["z", "c"])
    assert short.x is None and short.c == 2 and len(short) == 2
    with pytest.raises(AttributeError, match="no entry 'y'"):
        short.y
