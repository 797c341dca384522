"""Zero-terminal-SNR rescaling, timestep spacings and guidance rescale (Lin et al. 2024),
against their formulas and diffusers."""
import numpy as np
import pytest
import torch

from ldm.diffusion.schedule import make_beta_schedule, rescale_zero_terminal_snr
from ldm.sampling.guidance import rescale_noise_cfg
from ldm.sampling.schedule_view import make_ddim_timesteps, spaced_timesteps


# ----------------------------------------------------------------------------------------
# zero terminal SNR
# ----------------------------------------------------------------------------------------
SCHEDULES = [("linear", 0.00085, 0.012), ("sqrt_linear", 1e-4, 2e-2), ("cosine", 1e-4, 2e-2)]


@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_zero_terminal_snr_numpy(name, start, end):
    betas = make_beta_schedule(name, 1000, start, end)
    new = rescale_zero_terminal_snr(betas)
    assert isinstance(new, np.ndarray) and new.dtype == np.float64
    abar_old, abar = np.cumprod(1 - betas), np.cumprod(1 - new)
    print(f"{name}: abar_T = {abar[-1]!r}, |abar_1 - old| = {abs(abar[0] - abar_old[0]):.1e}, beta_T = {new[-1]!r}")
    assert abar[-1] == 0.0 and new[-1] == 1.0
    assert abs(abar[0] - abar_old[0]) < 1e-15
    # Alg. 1: sqrt(abar) is an affine map of the old one
    s_old, s = np.sqrt(abar_old), np.sqrt(abar)
    np.testing.assert_allclose(s, (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1]), rtol=1e-12, atol=1e-15)
    # and equals diffusers' implementation on the same betas
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref
    d = np.abs(ref(torch.tensor(betas)).numpy() - new).max()
    print(f"{name}: max diff vs diffusers (float64) {d:.1e}")
    assert d < 1e-12


def test_zero_terminal_snr_torch_float32_equals_diffusers_bitwise():
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    ours = rescale_zero_terminal_snr(betas)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref(betas)) and torch.equal(ours, sch.betas)
    assert torch.cumprod(1 - ours, 0)[-1].item() == 0.0


# ----------------------------------------------------------------------------------------
# timestep spacing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [10, 50, 250])
def test_spacing_equals_diffusers_ddim(spacing, n):
    from diffusers import DDIMScheduler
    for offset in (0, 1):
        sch = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
        sch.set_timesteps(n)
        ref = np.sort(sch.timesteps.numpy())
        ours = spaced_timesteps(1000, n, spacing, steps_offset=offset)
        assert ours.dtype == np.int64 and bool((np.diff(ours) > 0).all())
        np.testing.assert_array_equal(ours, ref)
    print(f"{spacing} {n}: first/last {ours[0]}/{ours[-1]} == diffusers")


@pytest.mark.parametrize("n", [10, 50, 250])
def test_leading_with_offset_is_the_original_ddim_grid(n):
    np.testing.assert_array_equal(spaced_timesteps(1000, n, "leading", steps_offset=1),
                                  make_ddim_timesteps("uniform", n, 1000, verbose=False))


def test_trailing_starts_at_the_last_step_and_bad_input_raises():
    assert spaced_timesteps(1000, 7, "trailing")[-1] == 999
    assert spaced_timesteps(1000, 1000, "leading", steps_offset=1)[-1] == 999     # the t = 1000 step dropped
    with pytest.raises(ValueError, match="timestep_spacing"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(1000, 1001, "leading")


# ----------------------------------------------------------------------------------------
# guidance rescale
# ----------------------------------------------------------------------------------------
def test_rescale_noise_cfg_formula_and_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as ref
    g = torch.Generator().manual_seed(0)
    uncond = torch.randn(3, 4, 8, 8, generator=g)
    cond = torch.randn(3, 4, 8, 8, generator=g) * 1.3
    guided = uncond + 7.5 * (cond - uncond)
    for phi in (0.0, 0.3, 0.7, 1.0):
        out = rescale_noise_cfg(guided, cond, phi)
        # formula, per sample, written out with numpy (unbiased std, as diffusers)
        G, C = guided.double().numpy().reshape(3, -1), cond.double().numpy().reshape(3, -1)
        factor = C.std(1, ddof=1) / G.std(1, ddof=1)
        expected = phi * G * factor[:, None] + (1 - phi) * G
        d_formula = np.abs(out.double().numpy().reshape(3, -1) - expected).max()
        d_ref = (out - ref(guided, cond, phi)).abs().max().item()
        print(f"phi={phi}: max diff vs formula {d_formula:.1e}, vs diffusers {d_ref:.1e}")
        assert d_formula < 1e-5 and d_ref < 1e-6
    # phi = 1: the guided prediction gets the std of the conditional one
    out = rescale_noise_cfg(guided, cond, 1.0)
    torch.testing.assert_close(out.flatten(1).std(1), cond.flatten(1).std(1))
    assert rescale_noise_cfg(guided, cond, 0.0) is guided
