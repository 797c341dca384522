"""The sampler registry (ldm.sampling.registry): what it lists, that every script offers exactly
those names, and that every registered sampler runs through every script's `--sampler` choice,
evaluation and image logs on tiny random-weight checkpoints (short 20-step chains, so that the
ancestral DDPM sampler stays fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from ldm.diffusion.schedule import Schedule, make_beta_schedule
from ldm.sampling import registry
from test_scripts_common import png_bytes, script

EXPECTED = ("ddim", "plms", "dpm", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde")
# script -> config its test samples with
SCRIPT_CONFIGS = {
    "sample_diffusion": "configs/ldm/celebahq.yaml",
    "sample_class_conditional": "configs/ldm/cin256.yaml",
    "txt2img": "configs/stable-diffusion/v1-inference.yaml",
    "inpaint": "configs/ldm/inpainting.yaml",
    "superres": "configs/ldm/sr_bsr.yaml",
}


def test_registry_lists_every_sampler_with_its_contract():
    assert registry.names() == EXPECTED
    for name, spec in registry.SAMPLERS.items():
        assert spec.name == name and callable(spec.fn) and spec.description
        assert set(spec.parameterizations) <= {"eps", "x0", "v"}
        assert "guidance_rescale" in spec.defaults      # every sampler takes the CFG wrapper's options
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        registry.get("nope")


def _choices(parser) -> tuple:
    action = next(a for a in parser._actions if "--sampler" in a.option_strings)
    return tuple(action.choices)


def test_every_script_offers_the_registry():
    for name in (*SCRIPT_CONFIGS, "benchmark_sampling", "evaluate"):
        assert _choices(script(name).parser()) == EXPECTED, name
    assert _choices(script("img2img").parser()) == ("ddim",)   # DDIM inversion only


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """Tiny checkpoints with a 20-step chain, one per config."""
    made = {}

    def get(config: str):
        if config not in made:
            out = tmp_path_factory.mktemp("short") / "model.safetensors"
            cfg = script("make_tiny_checkpoint").main([str(ROOT / config), "--tiny", "--out", str(out),
                                                       "--set", "model.params.timesteps=20"])
            made[config] = (cfg, out)
        return made[config]
    return get


def _write_inputs(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(folder / "a.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    Image.fromarray(mask).save(folder / "a_mask.png")
    Image.fromarray((rng.rand(8, 8, 3) * 255).astype(np.uint8)).save(folder / "lr.png")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPT_CONFIGS))
def test_every_sampler_through_every_script(name, short, tmp_path):
    cfg, ckpt = short(SCRIPT_CONFIGS[name])
    _write_inputs(tmp_path / "in")
    extra = {"sample_diffusion": ["--n_samples", "1", "--eta", "0"],
             "sample_class_conditional": ["--classes", "3", "--n_samples", "1", "--scale", "2.0"],
             "txt2img": ["--prompt", "a cube", "--n_samples", "1", "--H", "64", "--W", "64", "--scale", "3"],
             "inpaint": ["--indir", str(tmp_path / "in")],
             "superres": ["--input", str(tmp_path / "in" / "lr.png"), "--eta", "0"]}[name]
    outputs = {}
    for sampler in _choices(script(name).parser()):
        outputs[sampler] = script(name).main(["--config", str(cfg), "--ckpt", str(ckpt), "--steps", "3",
                                              "--device", "cpu", "--sampler", sampler,
                                              "--outdir", str(tmp_path / sampler), *extra])
        assert outputs[sampler], sampler
    # the samplers differ: no entry silently runs another one
    assert len({png_bytes(out)[0] for out in outputs.values()}) == len(outputs)


def test_sampler_options_reach_the_sampler(short, tmp_path):
    cfg, ckpt = short("configs/ldm/celebahq.yaml")
    run = lambda *a: script("sample_diffusion").main(["--config", str(cfg), "--ckpt", str(ckpt), "--steps", "3",  # noqa
                                                      "--n_samples", "1", "--device", "cpu", *a])
    base = run("--sampler", "euler", "--outdir", str(tmp_path / "a"))
    other = run("--sampler", "euler", "--sigma_schedule", "uniform", "--outdir", str(tmp_path / "b"))
    assert png_bytes(base) != png_bytes(other)
    with pytest.raises(SystemExit, match="--sampler dpm takes no --sigma_schedule"):
        run("--sampler", "dpm", "--sigma_schedule", "uniform", "--outdir", str(tmp_path / "c"))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacing_reaches_every_grid_sampler(spacing):
    """The timesteps the network sees equal diffusers' spacing (ldm.sampling.schedule_view.spaced_timesteps)."""
    from ldm.sampling.schedule_view import spaced_timesteps
    model = GaussianModel(0.3, 0.5)
    seen = []
    network = model.apply_model
    model.apply_model = lambda x, t, c=None: seen.append(t[0].item()) or network(x, t, c)
    grid = sorted(int(g) for g in spaced_timesteps(200, 8, spacing, 0))
    for name in ("ddim", "plms"):
        seen.clear()
        registry.sample(name, model, torch.randn(2, 1, 1, 1), 8, timestep_spacing=spacing)
        assert sorted(set(seen)) == grid, name
    seen.clear()
    registry.sample("euler", model, torch.randn(2, 1, 1, 1), 8, timestep_spacing=spacing)
    assert [round(t) for t in seen] == grid[::-1]          # sigma -> t recovers each grid step
    seen.clear()
    registry.sample("dpm", model, torch.randn(2, 1, 1, 1), 8, timestep_spacing=spacing)
    assert [round(t) for t in seen] == grid[::-1][:len(seen)]


@pytest.mark.slow
def test_every_sampler_in_evaluation_benchmark_and_image_logs(short):
    from ldm.eval.sample_for_eval import SamplerSettings, make_ldm_sample_fn
    from ldm import scripting as S
    cfg, ckpt = short("configs/ldm/cin256.yaml")
    model = S.load_model(cfg, ckpt, "cpu")
    labels = torch.tensor([1, 2])
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "class_label": labels}
    for name in registry.names():
        fn = make_ldm_sample_fn(model, SamplerSettings(sampler=name, steps=2, eta=0.5, scale=2.0, uncond_label=0))
        torch.manual_seed(0)
        images = fn(torch.randn(2, *model_shape(model)), labels)
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all(), name
        log = model.log_images(batch, N=2, sampler=name, ddim_steps=2, plot_progressive_rows=False,
                               plot_diffusion_rows=False, inpaint=False, quantize_denoised=False)
        assert log["samples"].shape == (2, 3, 32, 32), name
    out = script("benchmark_sampling").main(["--config", str(cfg), "--steps", "1", "--warmup", "0", "--repeats",
                                             "1", "--sampler", "heun"])
    assert out["no guidance"]["unet_calls"] == 1   # Heun's last step to sigma = 0 is a plain Euler step


def model_shape(model):
    return int(model.channels), int(model.image_size), int(model.image_size)


# ----------------------------------------------------------------------------------------
# Samplers on a closed-form denoiser: Gaussian data N(mu, s^2), exact eps(x_t, t)
# ----------------------------------------------------------------------------------------
class GaussianModel:
    """An eps model whose prediction is the exact E[eps | x_t] of data ~ N(mu, s^2) per dimension."""

    def __init__(self, mu: float, s: float, parameterization: str = "eps"):
        self.schedule = Schedule.from_betas(make_beta_schedule("linear", 200, 0.00085, 0.06))
        for k, v in vars(self.schedule).items():
            setattr(self, k, v)
        self.mu, self.s, self.parameterization = mu, s, parameterization
        self.num_timesteps = 200

    def abar(self, t):
        from ldm.sampling.k_diffusion import _interp_log_sigma, vp_sigmas
        ac = self.schedule.alphas_cumprod.double()
        if t.is_floating_point():
            sigma = _interp_log_sigma(t.double(), vp_sigmas(ac).log()).exp()
            return (1 / (1 + sigma ** 2)).view(-1, 1, 1, 1)
        return ac[t].view(-1, 1, 1, 1)

    def apply_model(self, x, t, cond=None):
        a = self.abar(t)
        x0 = self.mu + a.sqrt() * self.s ** 2 * (x.double() - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.parameterization]
        return out.float()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_every_sampler_reaches_the_gaussian_data_distribution(parameterization):
    """Mean / std of 1024 samples vs the data's 0.3 / 0.5, measured against the exact probability-flow
    image of the same x_T (affine for Gaussian data: mu + s (x_T - m_T) / s_T), so that the draw of x_T
    does not blur the comparison; stochastic samplers get more steps."""
    model = GaussianModel(0.3, 0.5, parameterization)
    a_T = float(model.schedule.alphas_cumprod[-1])
    for name in registry.names():
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(1024, 1, 1, 1, generator=g)
        exact = 0.3 + 0.5 * (x_T - a_T ** 0.5 * 0.3) / (a_T * 0.25 + 1 - a_T) ** 0.5
        steps = 100 if name in ("euler_a", "dpmpp_2m_sde", "ddim", "euler") else 25
        z = registry.sample(name, model, x_T, steps, generator=g)
        assert abs(float(z.mean() - exact.mean())) < 0.03, (name, float(z.mean()), float(exact.mean()))
        assert abs(float(z.std() - exact.std())) < 0.03, (name, float(z.std()), float(exact.std()))
        if name in ("heun", "dpmpp_2m", "plms"):      # higher-order ODE solvers follow the exact path
            assert float((z - exact).abs().max()) < 0.02, name
