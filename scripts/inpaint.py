#!/usr/bin/env python
"""Inpainting: fill the holes (white in `<name>_mask.png`) of every `<name>.png` in --indir.

  # LDM inpainting (the released models/ldm/inpainting_big, or a model of configs/ldm/inpainting.yaml)
  python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results
  # Stable Diffusion 2 inpainting (text + mask)
  python scripts/inpaint.py --config configs/stable-diffusion/v2-inpainting.yaml \\
      --ckpt 512-inpainting-ema.ckpt --indir examples --prompt "a red sofa" --scale 9

The UNet sees the noisy latent concatenated with the encoded masked image and the mask resized
to the latent size (concat conditioning). As the original scripts:
- LDM: mask 1 = hole, masked_image = (1 - mask) * image, then image, mask and masked image
  mapped to [-1, 1]; the result keeps the known pixels: (1 - mask) * image + mask * sample.
- SD 2 (LatentInpaintDiffusion with text): mask in {0, 1}, masked_image = image * (mask < 0.5)
  with the image in [-1, 1], text by cross-attention; the sample is written as is.
Writes OUTDIR/samples/<name>.png (<name>_K.png with --n_samples > 1) and OUTDIR/grid-NNNN.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm, trange  # noqa: E402

from ldm import perf  # noqa: E402
from ldm import scripting as S  # noqa: E402

TEXT_KEYS = ("txt", "caption")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--indir", help="folder with image-mask pairs (`example.png` and `example_mask.png`)")
    p.add_argument("--prompt", default="", help="text models (SD 2 inpainting): what to paint in the holes")
    S.add_common_args(p, steps=50, scale=None, n_samples=1, outdir="outputs/inpainting_results",
                      config="models/ldm/inpainting_big/config.yaml")
    p.set_defaults(ckpt="models/ldm/inpainting_big/last.ckpt")
    return p


def find_pairs(indir: Optional[str]) -> list[tuple[Path, Path]]:
    if indir is None or not Path(indir).is_dir():
        S.fail(f"--indir: folder not found: '{indir}'" if indir else "pass --indir (a folder of image-mask pairs)")
    masks = sorted(Path(indir).glob("*_mask.png"))
    if not masks:
        S.fail(f"no '<name>_mask.png' files in '{indir}'")
    pairs = [(m.with_name(m.name[:-len("_mask.png")] + ".png"), m) for m in masks]
    for image, mask in pairs:
        S.require_file(image, "image", f" (the image of mask '{mask}')")
    return pairs


def conditioning(model: Any, image: torch.Tensor, mask: torch.Tensor, prompts: list[str],
                 scale: float) -> tuple[Any, Any, bool]:
    """(cond, uncond, paste_back) for image (B, 3, H, W) in [-1, 1] and mask (B, 1, H, W) in {0, 1}."""
    text = getattr(model, "cond_stage_key", None) in TEXT_KEYS
    if text:     # SD 2 convention
        batch = {"mask": mask, "masked_image": image * (mask < 0.5)}
    else:        # latent-diffusion convention: everything mapped to [-1, 1]
        batch = {"mask": 2 * mask - 1, "masked_image": 2 * ((1 - mask) * (image + 1) / 2) - 1}
    masked_key = getattr(model, "masked_image_key", "masked_image")
    f = S.downsampling_factor(model)[0]
    size = (image.shape[-2] // f, image.shape[-1] // f)
    parts = []
    for key in getattr(model, "concat_keys", ("masked_image", "mask")):
        if key not in batch:
            S.fail(f"the model concatenates '{key}', which inpaint.py does not provide (only mask, masked_image)")
        v = batch[key]
        if key != masked_key:
            parts.append(F.interpolate(v, size=size))
        elif hasattr(model, "concat_keys"):       # LatentInpaintDiffusion: scaled first-stage encoding
            parts.append(model.get_first_stage_encoding(model.encode_first_stage(v)))
        else:                                     # released LDM: the cond stage is the first stage
            parts.append(model.get_learned_conditioning(v))
    c_cat = torch.cat(parts, dim=1)
    in_channels = model.model.diffusion_model.in_channels
    if model.model.conditioning_key not in ("concat", "hybrid") or in_channels != model.channels + c_cat.shape[1]:
        S.fail(f"not an inpainting model: its UNet takes {in_channels} channels with conditioning "
               f"'{model.model.conditioning_key}', inpainting needs concat of {c_cat.shape[1]} extra channels")
    if not text:
        return c_cat, None, True
    c, uc = S.text_conditioning(model, prompts, scale)
    cond = {"c_concat": [c_cat], "c_crossattn": [c]}
    return cond, ({"c_concat": [c_cat], "c_crossattn": [uc]} if uc is not None else None), False


def load_pair(model: Any, image_path: Path, mask_path: Path, H: Optional[int], W: Optional[int]):
    from PIL import Image
    w, h = Image.open(image_path).size
    mask = S.load_mask(mask_path, image_path, (w, h))
    if H or W:
        w, h = W or H, H or W
        mask = F.interpolate(mask, size=(h, w), mode="nearest")
    S.check_size(model, h, w, what=f"image '{image_path}' size" if not (H or W) else "--H/--W")
    return S.load_image(image_path, (w, h)), mask


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    pairs = find_pairs(opt.indir)
    print(f"Found {len(pairs)} inputs.")
    model = S.load_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    scale = opt.scale if opt.scale is not None else (9.0 if model.cond_stage_key in TEXT_KEYS else 1.0)
    inputs = [load_pair(model, i, m, opt.H, opt.W) for i, m in pairs]    # every size checked up front
    generator = S.seed_everything(opt.seed)
    writer = S.SampleWriter(opt.outdir)
    n = opt.n_samples
    with torch.no_grad(), perf.autocast(opt.precision, device), model.ema_scope():
        for it in trange(opt.n_iter, desc="Sampling"):
            for (image_path, _), (image, mask) in tqdm(list(zip(pairs, inputs)), desc="images", leave=False):
                image = image.to(device).expand(n, -1, -1, -1)
                mask = mask.to(device).expand(n, -1, -1, -1)
                cond, uc, paste = conditioning(model, image, mask, n * [opt.prompt], scale)
                shape = S.latent_shape(model, image.shape[-2], image.shape[-1])
                z = S.sample(model, opt.sampler, opt.steps, shape, n, cond, uc, scale, opt.eta, generator,
                             **S.sampler_options(opt))
                result = S.decode(model, z)
                if paste:
                    known, m = ((image + 1) / 2).clamp(0, 1).cpu(), mask.cpu()
                    result = (1 - m) * known + m * result
                stem = image_path.stem + (f"_{it}" if opt.n_iter > 1 else "")
                writer.save(result, names=[stem] if n == 1 else [f"{stem}_{k}" for k in range(n)])
    writer.save_grid(opt.n_rows or max(n, min(len(pairs), 4)))
    print(f"Results in {opt.outdir}")
    return writer.written


if __name__ == "__main__":
    main()
