"""DPMSolverSampler (Stability-AI/stablediffusion): the original class and `.sample` signature,
as a thin adapter over `ldm.sampling.dpm_solver`.

As SD2: DPM-Solver++ (data prediction), multistep, order 2, time-uniform steps, lower-order
final steps; the network sees fractional timesteps `(t - 1/N) * N`; classifier-free
guidance batches cond and uncond in one call, each half converted to eps first.
Differences from the original: `device` defaults to the model's device; `mask`/`x0`
(which the original silently ignored) raise; `algorithm`/`order`/`skip_type` are keywords
of `sample` (defaults as SD2); no prints.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ldm.models.diffusion.ddim import model_device, warn_batch_size
from ldm.sampling.dpm_solver import continuous_denoiser, sample_dpm_solver
from ldm.sampling.guidance import guidance
from ldm.sampling.noise import randn
from ldm.sampling.schedule_view import DiscreteVPSchedule

log = logging.getLogger(__name__)
Tensor = torch.Tensor

MODEL_TYPES = {"eps": "noise", "x0": "x_start", "v": "v"}   # the original's names, for reference


class DPMSolverSampler:
    """DPM-Solver++ sampling of a diffusion model (Lu et al. 2022), the SD2 interface."""

    def __init__(self, model: Any, device: Optional[torch.device] = None, predict_x0: bool = True, **kwargs: Any):
        self.model = model            # the diffusion model (LatentDiffusion)
        # where the schedule lives; default: the model's device
        self.device = torch.device(device) if device is not None else model_device(model)
        # True: DPM-Solver++ (data prediction, SD2's choice); False: DPM-Solver (noise prediction)
        self.predict_x0 = predict_x0
        # float32 copy of abar, as the original (the continuous schedule is computed from it)
        self.register_buffer("alphas_cumprod", model.alphas_cumprod.detach().clone().to(torch.float32))

    def register_buffer(self, name: str, attr: Any) -> None:
        if isinstance(attr, torch.Tensor) and attr.device != self.device:
            attr = attr.to(self.device)
        setattr(self, name, attr)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple, conditioning: Any = None, callback: Any = None,
               normals_sequence: Any = None, img_callback: Any = None, quantize_x0: bool = False, eta: float = 0.,
               mask: Optional[Tensor] = None, x0: Optional[Tensor] = None, temperature: float = 1.,
               noise_dropout: float = 0., score_corrector: Any = None, corrector_kwargs: Optional[dict] = None,
               verbose: bool = True, x_T: Optional[Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1., unconditional_conditioning: Any = None,
               order: int = 2, skip_type: str = "time_uniform", method: str = "multistep",
               lower_order_final: bool = True, generator: Optional[torch.Generator] = None,
               **kwargs: Any) -> tuple[Tensor, None]:
        """S network evaluations for batch_size samples of shape (C, H, W) -> (samples, None)."""
        if conditioning is not None:
            warn_batch_size(conditioning, batch_size)
        if mask is not None or x0 is not None:
            raise NotImplementedError("DPMSolverSampler does not support mask/x0 inpainting; use DDIMSampler")
        if method != "multistep":
            raise NotImplementedError(f"method '{method}': only the multistep solver is implemented")
        C, H, W = shape
        size = (batch_size, C, H, W)
        log.info("Data shape for DPM-Solver sampling is %s, sampling steps %d", size, S)
        device = self.model.betas.device
        img = x_T if x_T is not None else randn(size, torch.empty((), device=device), generator)

        ns = DiscreteVPSchedule(self.alphas_cumprod.to(img.device))
        den = continuous_denoiser(self.model.apply_model, ns, self.model.parameterization)
        # as SD2: each half is converted to eps, then guided
        eps_fn = den.eps_denoiser().with_network(guidance(unconditional_conditioning,
                                                          unconditional_guidance_scale)).eps_fn(conditioning)

        cb = None
        if callback is not None or img_callback is not None:
            def cb(d: dict) -> None:
                if callback:
                    callback(d["i"])
                if img_callback:
                    img_callback(d["model"], d["i"])
        x = sample_dpm_solver(eps_fn, img, ns, S, order=order, skip_type=skip_type,
                              algorithm="dpmsolver++" if self.predict_x0 else "dpmsolver",
                              lower_order_final=lower_order_final, callback=cb)
        return x.to(device), None
