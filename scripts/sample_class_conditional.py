#!/usr/bin/env python
"""Class-conditional samples (ImageNet cin256-v2, LDM-4-G) with classifier-free guidance.

  python scripts/sample_class_conditional.py --config configs/ldm/cin256.yaml \\
      --ckpt models/ldm/cin256-v2/model.ckpt --classes 25,187,448,992 --n_samples 6 --scale 3.0
  # a main.py log folder (configs/*-project.yaml + checkpoints/last.ckpt), e.g. configs/custom/ldm-class-*.yaml
  python scripts/sample_class_conditional.py -r logs/<date>_my-ldm --classes 0,1,2

As the original notebook: DDIM (20 steps, eta 0), the unconditional embedding is the
extra "null" class (n_classes - 1 = 1000). One grid row per class (`--n_rows` to change).
With guidance (or a model trained with label dropout, ucg_rate > 0) the last class is the
null class: it is not counted among the model's classes and cannot be asked for.
Writes OUTDIR/samples/NNNNN-classK.png and OUTDIR/grid-NNNN.png (OUTDIR defaults to
LOGDIR/samples/<date-time> with -r).
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm.auto import tqdm, trange  # noqa: E402

from ldm import perf  # noqa: E402
from ldm import scripting as S  # noqa: E402
from sample_diffusion import config_from_resume  # noqa: E402  (-r as sample_diffusion.py)

CLASS_KEYS = ("class_label", "cls")


def class_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.replace(" ", "").split(",") if c]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated integers, got '{text}'") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", help="a logdir (config + checkpoint inside) or a checkpoint in one")
    p.add_argument("--classes", type=class_list, default=None,
                   help="comma-separated class indices, e.g. 25,187,448 (ImageNet: 0..999; default: 25,187,448,992, "
                        "or with -r of a class-subfolder run every class it was trained on)")
    S.add_common_args(p, steps=20, scale=3.0, n_samples=6, outdir=None, config=None)
    return p


def class_count(embedder: torch.nn.Module, scale: float) -> tuple[Optional[int], bool]:
    """(number of real classes, whether the last embedding is the null class): it is when the
    model was trained with label dropout (ucg_rate > 0) or guidance uses it (scale != 1)."""
    n = int(getattr(embedder, "n_classes", 0)) or None
    has_null = n is not None and n > 1 and (float(getattr(embedder, "ucg_rate", 0.0)) > 0 or scale != 1.0)
    return (n - 1 if has_null else n), has_null


def folder_class_names(config: Any) -> Optional[list[str]]:
    """Class names of a run trained on class subfolders (ldm.data.base.ImageFolderDataset), if its folder is here."""
    train = ((config.get("data") or {}).get("params") or {}).get("train") or {} if isinstance(config, dict) else {}
    params = train.get("params") or {}
    root = Path(str(params.get("root", "")))
    if not (str(train.get("target", "")).endswith("ImageFolderDataset") and params.get("class_subfolders")
            and root.is_dir()):
        return None
    from ldm.data.base import ImageFolderDataset
    return ImageFolderDataset(str(root), class_subfolders=True).class_names


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    if opt.classes is not None and not opt.classes:
        S.fail("--classes is empty")
    config, ckpt, logdir = config_from_resume(opt)
    if config is None:
        config = "configs/ldm/cin256.yaml"
    model = S.load_model(config, ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    key = getattr(model, "cond_stage_key", None)
    if key not in CLASS_KEYS or model.cond_stage_model is None:
        S.fail(f"'{opt.resume or config}' is not a class-conditional model (cond_stage_key '{key}')")
    n_classes, has_null = class_count(model.cond_stage_model, opt.scale)
    bad = [c for c in opt.classes or [] if c < 0 or (n_classes is not None and c >= n_classes)]
    if bad:
        null = f" (class {n_classes} is the null class of guidance)" if has_null else ""
        S.fail(f"class indices {bad} out of range: the model has {n_classes} classes, 0..{n_classes - 1}{null}")
    if n_classes is not None:
        print(f"The model has {n_classes} classes (0..{n_classes - 1})"
              + (f" and the null class {n_classes} for guidance" if has_null else ""))
    names = folder_class_names(config) if opt.resume is not None else None
    if names:
        print(f"Trained on {len(names)} class subfolders: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)))
    if opt.classes is None:
        opt.classes = list(range(len(names))) if names else [25, 187, 448, 992]
    shape = S.latent_shape(model, opt.H, opt.W)
    generator = S.seed_everything(opt.seed)
    outdir = Path(opt.outdir) if opt.outdir else \
        (Path(logdir) / "samples" / datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S") if logdir
         else Path("outputs/class-conditional-samples"))
    writer = S.SampleWriter(outdir)
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
    print(f"Samples in {outdir}")
    return writer.written


if __name__ == "__main__":
    main()
