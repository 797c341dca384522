#!/usr/bin/env python
"""Super-resolution: low-resolution images -> 4x with the LDM BSR model or the SD 2 x4 upscaler.

  # LDM-BSR (models/ldm/bsr_sr: concat conditioning on the low-res image, 64 -> 256 px)
  python scripts/superres.py --config models/ldm/bsr_sr/config.yaml --ckpt models/ldm/bsr_sr/model.ckpt \\
      --input lr.png --steps 100 --eta 1.0
  # Stable Diffusion x4 upscaler (LatentUpscaleDiffusion: noise-augmented low-res image + text)
  python scripts/superres.py --config configs/stable-diffusion/x4-upscaling.yaml \\
      --ckpt x4-upscaler-ema.ckpt --indir lowres/ --prompt "a photo of a cat" --noise_level 20 --scale 9

The diffusion runs at the latent size of the output, which is the low-res size for both models
(f = 4 first stage, 4x upscaling), so the low-res sides must be multiples of the UNet's
downsampling factor. --H/--W resize the low-res input first.
Writes OUTDIR/samples/<name>.png (<name>_K.png with --n_samples > 1) and OUTDIR/grid-NNNN.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm, trange  # noqa: E402

from ldm import perf  # noqa: E402
from ldm import scripting as S  # noqa: E402
from ldm.sampling.noise import randn  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], help="low-resolution image file(s)")
    p.add_argument("--indir", help="a folder of low-resolution images")
    p.add_argument("--prompt", default="", help="SD x4 upscaler: a description of the image")
    p.add_argument("--noise_level", type=int, default=20,
                   help="SD x4 upscaler: noise augmentation level of the low-res image (0..349)")
    S.add_common_args(p, steps=100, eta=1.0, scale=None, n_samples=1, outdir="outputs/superres-samples",
                      config="models/ldm/bsr_sr/config.yaml")
    p.set_defaults(ckpt="models/ldm/bsr_sr/model.ckpt")
    return p


def find_inputs(files: Sequence[str], indir: Optional[str]) -> list[Path]:
    paths = [S.require_file(f, "input image") for f in files]
    if indir is not None:
        if not Path(indir).is_dir():
            S.fail(f"--indir: folder not found: '{indir}'")
        paths += sorted(p for p in Path(indir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        S.fail("no input images (pass --input FILE ... or --indir DIR)")
    return paths


def is_upscaler(model: Any) -> bool:
    return getattr(model, "low_scale_model", None) is not None


def conditioning(model: Any, lr: torch.Tensor, prompt: str, scale: float, noise_level: int,
                 generator: torch.Generator) -> tuple[Any, Any]:
    """(cond, uncond) for the low-res batch lr (B, 3, h, w) in [-1, 1]."""
    if not is_upscaler(model):     # LDM-BSR: c = cond stage (identity) of the low-res image, concatenated
        return model.get_learned_conditioning(lr), None
    level = torch.full((lr.shape[0],), noise_level, dtype=torch.long, device=lr.device)
    x_aug = model.low_scale_model.q_sample(lr, level, noise=randn(lr.shape, lr, generator))
    c, uc = S.text_conditioning(model, lr.shape[0] * [prompt], scale)
    cond = {"c_concat": [x_aug], "c_crossattn": [c], "c_adm": level}
    return cond, ({"c_concat": [x_aug], "c_crossattn": [uc], "c_adm": level} if uc is not None else None)


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    paths = find_inputs(opt.input, opt.indir)
    model = S.load_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    if model.model.conditioning_key not in ("concat", "hybrid-adm"):
        S.fail(f"not a super-resolution model (conditioning '{model.model.conditioning_key}'; expected concat "
               "as LDM-BSR or hybrid-adm as the SD x4 upscaler)")
    if is_upscaler(model) and not 0 <= opt.noise_level < model.low_scale_model.max_noise_level:
        S.fail(f"--noise_level must be in [0, {model.low_scale_model.max_noise_level}), got {opt.noise_level}")
    scale = opt.scale if opt.scale is not None else (9.0 if is_upscaler(model) else 1.0)
    size = (opt.W or opt.H, opt.H or opt.W) if (opt.H or opt.W) else None
    images = [S.load_image(p, size) for p in paths]
    u = S.downsampling_factor(model)[1]
    for p, lr in zip(paths, images):
        h, w = lr.shape[-2:]
        if h % u or w % u:
            S.fail(f"low-res image '{p}' is {w}x{h} (WxH): its sides must be multiples of the UNet's "
                   f"downsampling factor {u} (resize or pad it, or pass --H/--W)")
    generator = S.seed_everything(opt.seed)
    writer = S.SampleWriter(opt.outdir)
    n = opt.n_samples
    with torch.no_grad(), perf.autocast(opt.precision, device), model.ema_scope():
        for it in trange(opt.n_iter, desc="Sampling"):
            for path, lr in tqdm(list(zip(paths, images)), desc="images", leave=False):
                lr = lr.to(device).expand(n, -1, -1, -1)
                cond, uc = conditioning(model, lr, opt.prompt, scale, opt.noise_level, generator)
                shape = (model.channels, lr.shape[-2], lr.shape[-1])
                z = S.sample(model, opt.sampler, opt.steps, shape, n, cond, uc, scale, opt.eta, generator,
                             **S.sampler_options(opt))
                stem = path.stem + (f"_{it}" if opt.n_iter > 1 else "")
                writer.save(S.decode(model, z), names=[stem] if n == 1 else [f"{stem}_{k}" for k in range(n)])
    writer.save_grid(opt.n_rows or max(n, min(len(paths), 4)))
    print(f"Results in {opt.outdir}")
    return writer.written


if __name__ == "__main__":
    main()
