#!/usr/bin/env python
"""Image-to-image (SDEdit): noise an image's latent part of the way, then denoise it with DDIM.

  python scripts/img2img.py --config configs/stable-diffusion/v1-inference.yaml --ckpt sd-v1-4.ckpt \\
      --init-img sketch.png --prompt "a fantasy landscape, trending on artstation" --strength 0.75

With S = --steps and t_enc = int(strength * S): z = q(z_{t_enc} | E(image)) on the DDIM grid
(`DDIMSampler.stochastic_encode`), then t_enc DDIM steps (`decode`), as the original script.
strength 0 returns the reconstruction, 1 starts from (almost) pure noise. The input is
resized down to a multiple of the model's downsampling factor (or to --H x --W).
Text models take --prompt / --from-file; unconditional models ignore the prompt.
Writes OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from einops import repeat  # noqa: E402
from tqdm.auto import tqdm, trange  # noqa: E402

from ldm import perf  # noqa: E402
from ldm import scripting as S  # noqa: E402

TEXT_KEYS = ("txt", "caption")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-img", "--init_img", dest="init_img", help="path to the input image")
    p.add_argument("--strength", type=float, default=0.8,
                   help="how much of the image to destroy, in [0, 1] (1: almost everything)")
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar", help="the prompt to render")
    p.add_argument("--from-file", "--from_file", dest="from_file", help="prompts from this file, one per line")
    S.add_common_args(p, steps=50, scale=7.5, n_samples=1, outdir="outputs/img2img-samples",
                      config="configs/stable-diffusion/v1-inference.yaml", samplers=("ddim",))  # DDIM inversion
    return p


def input_size(model, path: Path, H: Optional[int], W: Optional[int]) -> tuple[int, int]:
    """(W, H): --W x --H (checked), else the image's size rounded down to the factor."""
    from PIL import Image
    if H or W:
        w, h = W or H, H or W
        S.check_size(model, h, w)
        return w, h
    f, u = S.downsampling_factor(model)
    w, h = Image.open(path).size
    w, h = w - w % (f * u), h - h % (f * u)
    if w == 0 or h == 0:
        S.fail(f"image '{path}' is smaller than the downsampling factor {f * u}")
    return w, h


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    init_path = S.require_file(opt.init_img, "input image", " (pass --init-img)" if opt.init_img is None else "")
    if not 0.0 <= opt.strength <= 1.0:
        S.fail(f"--strength must be in [0, 1], got {opt.strength}")
    if opt.sampler != "ddim":
        S.fail(f"img2img samples with DDIM only (got --sampler {opt.sampler})")
    text = None
    model = S.load_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    if getattr(model, "cond_stage_key", None) in TEXT_KEYS and model.cond_stage_model is not None:
        text = S.read_prompts(opt.prompt, opt.from_file, opt.n_samples)
    elif getattr(model, "cond_stage_model", None) is not None and model.model.conditioning_key is not None:
        S.fail("img2img needs a text-conditional or an unconditional model")
    image = S.load_image(init_path, input_size(model, init_path, opt.H, opt.W)).to(device)
    generator = S.seed_everything(opt.seed)
    writer = S.SampleWriter(opt.outdir)
    from ldm.models.diffusion.ddim import DDIMSampler
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=opt.steps, ddim_eta=opt.eta, verbose=False)
    t_enc = int(opt.strength * opt.steps)
    # the original indexes the noise level one grid step above the last denoising step; at
    # strength 1 that index is past the grid (IndexError there): use the top of the grid
    t_noise = min(t_enc, opt.steps - 1)
    print(f"target t_enc is {t_enc} steps")
    with torch.no_grad(), perf.autocast(opt.precision, device), model.ema_scope():
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(text or [[None] * opt.n_samples], desc="data", leave=False):
                bs = len(prompts)
                c, uc = S.text_conditioning(model, prompts, opt.scale) if text else (None, None)
                init_latent = model.get_first_stage_encoding(
                    model.encode_first_stage(repeat(image, "1 ... -> b ...", b=bs)))
                t = torch.full((bs,), t_noise, dtype=torch.long, device=device)
                z_enc = sampler.stochastic_encode(init_latent, t, generator=generator)
                with tqdm(total=t_enc, desc="Decoding image", leave=False) as bar:
                    z = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=opt.scale if text else 1.0,
                                       unconditional_conditioning=uc, generator=generator,
                                       callback=lambda i: bar.update(1))
                writer.save(S.decode(model, z))
    writer.save_grid(opt.n_rows or opt.n_samples)
    print(f"Your samples are ready and waiting for you here:\n{opt.outdir}")
    return writer.written


if __name__ == "__main__":
    main()
