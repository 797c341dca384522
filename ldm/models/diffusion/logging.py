"""Image logs of the diffusion models (`log_images`, called by main.py's ImageLogger).

Keys as the original: inputs, reconstruction, conditioning (image, or text rendered with
log_txt_as_img), original_conditioning (segmentation maps in RGB), diffusion_row (one
sample noised to every log_every_t-th level), samples (EMA weights), denoise_row,
samples_x0_quantized, samples_cfg_scale_<s>, samples_inpainting / mask / samples_outpainting,
progressive_row. All images are (B, C, H, W) in [-1, 1] (grids from make_grid).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch
from einops import rearrange, repeat
from torchvision.utils import make_grid

from ldm.diffusion.conditioning import cond_route
from ldm.util import isimage, ismap, log_txt_as_img

Tensor = torch.Tensor


def select_keys(log: dict[str, Any], return_keys: Optional[Sequence[str]]) -> dict[str, Any]:
    """Only `return_keys` (all of the log when none of them is present)."""
    if not return_keys or not set(log) & set(return_keys):
        return log
    return {key: log[key] for key in return_keys}


def rows_grid(samples: Sequence[Tensor]) -> Tensor:
    """n tensors (b, c, h, w) -> one grid with a row of n images per batch item."""
    n_imgs_per_row = len(samples)
    grid = rearrange(torch.stack(list(samples)), "n b c h w -> (b n) c h w")
    return make_grid(grid, nrow=n_imgs_per_row)


def denoise_grid(model, samples, force_no_decoder_quantization: bool = False) -> Tensor:
    """Decode a list of latents (or a DDIM intermediates dict: its x_inter) into a rows grid."""
    if isinstance(samples, dict):
        samples = samples["x_inter"]
    decoded = [model.decode_first_stage(zd.to(model.device), force_not_quantize=force_no_decoder_quantization)
               for zd in samples]
    return rows_grid(decoded)


def noised_row(model, x_start: Tensor, decode=None) -> list[Tensor]:
    """x_start noised to t = 0, log_every_t, 2 log_every_t, ..., T-1 (one randn draw per level)."""
    row = []
    for t in range(model.num_timesteps):
        if t % model.log_every_t == 0 or t == model.num_timesteps - 1:
            ts = repeat(torch.tensor([t]), "1 -> b", b=x_start.shape[0]).to(model.device).long()
            x_noisy = model.q_sample(x_start=x_start, t=ts, noise=torch.randn_like(x_start))
            row.append(decode(x_noisy) if decode is not None else x_noisy)
    return row


def log_images_ddpm(model, batch, N: int = 8, n_row: int = 2, sample: bool = True,
                    return_keys: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
    log: dict[str, Any] = {}
    x = model.get_input(batch, model.first_stage_key)
    N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
    x = x.to(model.device)[:N]
    log["inputs"] = x
    log["diffusion_row"] = rows_grid(noised_row(model, x[:n_row]))
    if sample:
        with model.ema_scope("Plotting"):
            samples, denoise_row = model.sample(batch_size=N, return_intermediates=True)
        log["samples"] = samples
        log["denoise_row"] = rows_grid(denoise_row)
    return select_keys(log, return_keys)


def conditioning_logs(model, batch, c, xc, x: Tensor) -> dict[str, Tensor]:
    """How the conditioning looks: decoded by the cond stage, rendered text, or the image itself."""
    log: dict[str, Tensor] = {}
    if model.model.conditioning_key is None:
        return log
    size = max(1, x.shape[2] // 25)   # (the original: x.shape[2] // 25, which fails below 25 px)
    if hasattr(model.cond_stage_model, "decode"):
        xc = model.cond_stage_model.decode(c)
        log["conditioning"] = xc
    elif cond_route(model.cond_stage_key).log == "text":
        xc = log_txt_as_img((x.shape[2], x.shape[3]), batch[model.cond_stage_key], size=size)
        log["conditioning"] = xc
    elif cond_route(model.cond_stage_key).log == "class":
        if "human_label" in batch:
            xc = log_txt_as_img((x.shape[2], x.shape[3]), batch["human_label"], size=size)
            log["conditioning"] = xc
    elif isimage(xc):
        log["conditioning"] = xc
    if ismap(xc):
        log["original_conditioning"] = model.to_rgb(xc)
    return log


def diffusion_grid(model, z: Tensor, n_row: int) -> Tensor:
    return rows_grid(noised_row(model, z[:n_row], decode=model.decode_first_stage))


def log_images_ldm(model, batch, N=8, n_row=4, sample=True, ddim_steps=200, ddim_eta=1., return_keys=None,
                   quantize_denoised=True, inpaint=True, plot_denoise_rows=False, plot_progressive_rows=True,
                   plot_diffusion_rows=True, unconditional_guidance_scale=1., unconditional_guidance_label=None,
                   use_ema_scope=True, sampler=None) -> dict[str, Tensor]:
    """The one log_images skeleton of LatentDiffusion and its variants. A variant changes its rows
    through two hooks: `model.log_inputs(batch, N) -> (z, c, x, head_log)` (the latents, the sampling
    conditioning, the images, and the first rows: inputs, reconstruction, conditioning, ...) and
    `model.log_unconditional(c, N, label)` (what guidance guides away from)."""
    ema_scope = model.ema_scope if use_ema_scope else nullcontext
    use_ddim = ddim_steps is not None
    z, c, x, log = model.log_inputs(batch, N)
    N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
    sample_kw = dict(batch_size=N, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta, sampler=sampler)
    if plot_diffusion_rows:
        log["diffusion_row"] = diffusion_grid(model, z, n_row)
    if sample:
        with ema_scope("Sampling"):
            samples, z_denoise_row = model.sample_log(cond=c, **sample_kw)
        log["samples"] = model.decode_first_stage(samples)
        if plot_denoise_rows and z_denoise_row is not None:
            log["denoise_row"] = denoise_grid(model, z_denoise_row)
        if quantize_denoised and hasattr(model.first_stage_model, "quantize"):   # VQ first stages
            with ema_scope("Plotting Quantized Denoised"):
                quant = {"quantize_x0": True} if use_ddim else {"quantize_denoised": True}
                samples, _ = model.sample_log(cond=c, **sample_kw, **quant)
            log["samples_x0_quantized"] = model.decode_first_stage(samples.to(model.device))
    if unconditional_guidance_scale > 1.0:
        uc = model.log_unconditional(c, N, unconditional_guidance_label)
        log.update(cfg_samples(model, c, uc, unconditional_guidance_scale, ema_scope, sample_kw))
    if inpaint:
        log.update(inpainting_samples(model, z, c, N, ema_scope, sample_kw))
    if plot_progressive_rows:
        with ema_scope("Plotting Progressives"):
            _, progressives = model.progressive_denoising(c, shape=(model.channels, model.image_size,
                                                                   model.image_size), batch_size=N)
        log["progressive_row"] = denoise_grid(model, progressives)
    return select_keys(log, return_keys)


def skeleton_args(args: dict[str, Any], **forced: Any) -> dict[str, Any]:
    """A variant's log_images arguments (its `locals()`) that log_images_ldm takes (`sampler` may come
    through **kwargs), with the rows a variant never draws `forced` off."""
    import inspect
    names = set(inspect.signature(log_images_ldm).parameters) - {"model", "batch"}
    out = {k: v for k, v in args.items() if k in names}
    out.setdefault("sampler", (args.get("kwargs") or {}).get("sampler"))
    return {**out, **forced}


def cfg_samples(model, c, uc, scale: float, ema_scope, sample_kw: dict) -> dict[str, Tensor]:
    with ema_scope("Sampling with classifier-free guidance"):
        samples_cfg, _ = model.sample_log(cond=c, **sample_kw, unconditional_guidance_scale=scale,
                                          unconditional_conditioning=uc)
        return {f"samples_cfg_scale_{scale:.2f}": model.decode_first_stage(samples_cfg)}


def inpainting_samples(model, z: Tensor, c, N: int, ema_scope, sample_kw: dict) -> dict[str, Tensor]:
    """Fill a centre square of the latent (inpainting), then everything but it (outpainting)."""
    log = {}
    h, w = z.shape[2], z.shape[3]
    mask = torch.ones(N, h, w, device=model.device)
    mask[:, h // 4:3 * h // 4, w // 4:3 * w // 4] = 0.   # zeros will be filled in
    mask = mask[:, None, ...]
    with ema_scope("Plotting Inpaint"):
        samples, _ = model.sample_log(cond=c, **sample_kw, x0=z[:N], mask=mask)
    log["samples_inpainting"] = model.decode_first_stage(samples.to(model.device))
    log["mask"] = mask
    with ema_scope("Plotting Outpaint"):
        samples, _ = model.sample_log(cond=c, **sample_kw, x0=z[:N], mask=1. - mask)
    log["samples_outpainting"] = model.decode_first_stage(samples.to(model.device))
    return log
