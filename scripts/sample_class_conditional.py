#!/usr/bin/env python
"""Class-conditional samples (ImageNet cin256-v2, LDM-4-G) with classifier-free guidance.

  python scripts/sample_class_conditional.py --config configs/ldm/cin256.yaml \\
      --ckpt models/ldm/cin256-v2/model.ckpt --classes 25,187,448,992 --n_samples 6 --scale 3.0

As the original notebook: DDIM (20 steps, eta 0), the unconditional embedding is the
extra "null" class (n_classes - 1 = 1000). One grid row per class (`--n_rows` to change).
Writes OUTDIR/samples/NNNNN-classK.png and OUTDIR/grid-NNNN.png.
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

CLASS_KEYS = ("class_label", "cls")


def class_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.replace(" ", "").split(",") if c]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated integers, got '{text}'") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=class_list, default=[25, 187, 448, 992],
                   help="comma-separated class indices, e.g. 25,187,448 (ImageNet: 0..999)")
    S.add_common_args(p, steps=20, scale=3.0, n_samples=6, outdir="outputs/class-conditional-samples",
                      config="configs/ldm/cin256.yaml")
    return p


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    if not opt.classes:
        S.fail("--classes is empty")
    model = S.load_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    key = getattr(model, "cond_stage_key", None)
    if key not in CLASS_KEYS or model.cond_stage_model is None:
        S.fail(f"'{opt.config}' is not a class-conditional model (cond_stage_key '{key}')")
    n_classes = int(getattr(model.cond_stage_model, "n_classes", 0)) or None
    bad = [c for c in opt.classes if c < 0 or (n_classes is not None and c >= n_classes)]
    if bad:
        S.fail(f"class indices {bad} out of range: the model has classes 0..{n_classes - 1}")
    shape = S.latent_shape(model, opt.H, opt.W)
    generator = S.seed_everything(opt.seed)
    writer = S.SampleWriter(opt.outdir)
    n = opt.n_samples
    with torch.no_grad(), perf.autocast(opt.precision, device), model.ema_scope():
        uc = model.get_unconditional_conditioning(n) if opt.scale != 1.0 else None
        for _ in trange(opt.n_iter, desc="Sampling"):
            for label in tqdm(opt.classes, desc="classes", leave=False):
                xc = {model.cond_stage_model.key: torch.full((n,), label, dtype=torch.long, device=device)}
                c = model.get_learned_conditioning(xc)
                z = S.sample(model, opt.sampler, opt.steps, shape, n, c, uc, opt.scale, opt.eta, generator,
                             desc=f"class {label}", **S.sampler_options(opt))
                writer.save(S.decode(model, z), names=[f"{writer.count + i:05}-class{label}" for i in range(n)])
    writer.save_grid(opt.n_rows or n)
    print(f"Samples in {opt.outdir}")
    return writer.written


if __name__ == "__main__":
    main()
