#!/usr/bin/env python
"""Text-to-image with the LDM text model (txt2img-1p4B) or Stable Diffusion v1 / v2.

  python scripts/txt2img.py --config configs/stable-diffusion/v1-inference.yaml \\
      --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompt "a painting of a virus monster playing guitar"
  python scripts/txt2img.py --config configs/stable-diffusion/v2-inference-v.yaml --ckpt v2-1_768-ema-pruned.ckpt \\
      --H 768 --W 768 --sampler dpm --steps 25 --scale 9 --from-file prompts.txt

Writes OUTDIR/samples/NNNNN.png (one per sample) and OUTDIR/grid-NNNN.png (all of them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm, trange  # noqa: E402

from ldm import perf  # noqa: E402
from ldm import scripting as S  # noqa: E402
from ldm.modules import lora  # noqa: E402

TEXT_KEYS = ("txt", "caption")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar", help="the prompt to render")
    p.add_argument("--from-file", "--from_file", dest="from_file", help="prompts from this file, one per line")
    p.add_argument("--repeat", type=int, default=1, help="repeat each prompt of --from-file this often")
    p.add_argument("--fixed_code", action="store_true", help="the same start code for every iteration")
    p.add_argument("--lora", help="LoRA adapters to add (.safetensors; diffusers-PEFT or kohya keys, e.g. the "
                                  "lora.safetensors a lora_config fine-tune writes)")
    p.add_argument("--lora-scale", "--lora_scale", dest="lora_scale", type=float, default=1.0,
                   help="strength of --lora (0: the base model)")
    S.add_common_args(p, steps=50, scale=7.5, n_samples=3, outdir="outputs/txt2img-samples",
                      config="configs/stable-diffusion/v1-inference.yaml")
    return p


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    batches = S.read_prompts(opt.prompt, opt.from_file, opt.n_samples, opt.repeat)
    model = S.load_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    if opt.lora:
        lora.apply_lora_for_sampling(model, str(S.require_file(opt.lora, "LoRA file", " (--lora)")), opt.lora_scale)
    if getattr(model, "cond_stage_key", None) not in TEXT_KEYS or model.cond_stage_model is None:
        S.fail(f"'{opt.config}' is not a text-conditional model (cond_stage_key "
               f"'{getattr(model, 'cond_stage_key', None)}'); see sample_class_conditional.py / sample_diffusion.py")
    shape = S.latent_shape(model, opt.H, opt.W)
    generator = S.seed_everything(opt.seed)
    writer = S.SampleWriter(opt.outdir)
    start_code = S.initial_noise(model, opt.n_samples, shape, generator) if opt.fixed_code else None
    with torch.no_grad(), perf.autocast(opt.precision, device), model.ema_scope():
        for _ in trange(opt.n_iter, desc="Sampling"):
            for prompts in tqdm(batches, desc="data", leave=False):
                c, uc = S.text_conditioning(model, prompts, opt.scale)
                x_T = start_code[:len(prompts)] if start_code is not None else None
                z = S.sample(model, opt.sampler, opt.steps, shape, len(prompts), c, uc, opt.scale, opt.eta,
                             generator, x_T=x_T, **S.sampler_options(opt))
                writer.save(S.decode(model, z))
    writer.save_grid(opt.n_rows or opt.n_samples)
    print(f"Your samples are ready and waiting for you here:\n{opt.outdir}")
    return writer.written


if __name__ == "__main__":
    main()
