"""No host-device synchronisation inside the sampling loops.

Runs the DDIM / PLMS adapters and the UNet on the meta device: any read of a device value on
the host (`.item()`, `float(t)`, `int(t[0])`, `if tensor:`) raises there ("cannot be
converted to a Python scalar"/"Cannot copy out of meta tensor"). A dispatch mode also records
every host tensor copied to (or mixed into ops on) the device: those must not grow with the
number of steps (the schedule is moved once per `sample()` call, not per step).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ldm.diffusion.schedule import make_beta_schedule
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.openaimodel import UNetModel

torch.set_num_threads(1)
META = torch.device("meta")


class HostToDevice(TorchDispatchMode):
    """Records ops that take a (non-scalar) CPU tensor and produce a meta ("device") tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        host_in = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0
                      for a in tree_leaves((args, kwargs)))
        device_out = any(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in tree_leaves(out))
        if host_in and device_out:
            self.hits.append(str(func))
        return out


def meta_unet() -> UNetModel:
    with torch.device("meta"):
        return UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                         num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
                         context_dim=16)


class MetaModel:
    """What the samplers need of a LatentDiffusion, on the meta device: a stand-in network
    (the UNet itself is checked separately), the schedule on the host (as the adapters read
    it) and on the device (as registered buffers)."""

    def __init__(self, parameterization: str = "eps"):
        self.num_timesteps = 1000
        self.parameterization = parameterization
        self.device = META
        betas = torch.as_tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012))
        ac = torch.cumprod(1 - betas, 0)
        self.betas = betas.float()
        self.alphas_cumprod = ac.float()
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]]).float()
        self.sqrt_alphas_cumprod = ac.sqrt().float().to(META)
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt().float().to(META)

    def apply_model(self, x, t, cond):
        return 0.9 * x + cond.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None]

    def q_sample(self, x_start, t, noise):
        return self.sqrt_alphas_cumprod[t][:, None, None, None] * x_start + \
            self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise


def run(sampler_cls, steps: int, model: MetaModel, **kw) -> list[str]:
    sampler = sampler_cls(model, device=META)
    x_T = torch.randn(2, 4, 8, 8, device=META)
    c, uc = torch.randn(2, 5, 16, device=META), torch.randn(2, 5, 16, device=META)
    with HostToDevice() as mode:
        x, inter = sampler.sample(steps, 2, (4, 8, 8), conditioning=c, x_T=x_T, unconditional_guidance_scale=3.0,
                                  unconditional_conditioning=uc, verbose=False, **kw)
    assert x.device == META and x.shape == (2, 4, 8, 8)
    return mode.hits


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_sampling_loop_has_no_host_reads_or_per_step_copies(sampler_cls):
    model = MetaModel()
    run(sampler_cls, 2, model)                       # warm caches (timestep frequencies)
    few, many = run(sampler_cls, 2, model), run(sampler_cls, 4, model)
    assert len(few) == len(many), f"host->device copies grow with the steps: {sorted(set(many) - set(few))}"


def test_ddim_variants_without_host_reads():
    model = MetaModel("v")
    mask, x0 = torch.ones(2, 1, 8, 8, device=META), torch.randn(2, 4, 8, 8, device=META)
    run(DDIMSampler, 2, model)
    few = run(DDIMSampler, 2, model, eta=1.0, mask=mask, x0=x0, ucg_schedule=[2.0, 3.0])
    many = run(DDIMSampler, 4, model, eta=1.0, mask=mask, x0=x0, ucg_schedule=[2.0] * 4)
    assert len(few) == len(many)


def test_single_ddim_step_reads_host_coefficients():
    model = MetaModel()
    sampler = DDIMSampler(model, device=META)
    sampler.make_schedule(5, ddim_eta=0.5, verbose=False)
    x, t = torch.randn(2, 4, 8, 8, device=META), torch.full((2,), 801, device=META, dtype=torch.long)
    x_prev, pred_x0 = sampler.p_sample_ddim(x, torch.randn(2, 5, 16, device=META), t, index=4)
    assert x_prev.device == META
    # the host copies hold the very values the original read from the registered attributes
    cpu = DDIMSampler(model, device="cpu")
    cpu.make_schedule(5, ddim_eta=0.5, verbose=False)
    assert sampler._coefficients(4, False) == (float(cpu.ddim_alphas[4]), float(cpu.ddim_alphas_prev[4]),
                                               float(cpu.ddim_sigmas[4]))
    assert sampler._coefficients(7, True) == (float(cpu.alphas_cumprod[7]), float(cpu.alphas_cumprod_prev[7]),
                                              float(cpu.ddim_sigmas_for_original_num_steps[7]))


def test_unet_forward_touches_no_host_tensor_after_first_call():
    unet = meta_unet()
    x, t, c = torch.randn(2, 4, 8, 8, device=META), torch.tensor([3, 500], device=META), torch.randn(2, 5, 16, device=META)
    unet(x, t, context=c)
    with HostToDevice() as mode:
        unet(x, t, context=c)
    assert mode.hits == []
