#!/usr/bin/env python
"""Unconditional samples of an LDM (CelebA-HQ, FFHQ, LSUN, ...) or a pixel-space DDPM.

  # a released model folder (config.yaml + model.ckpt), DDIM 200 steps, eta 0
  python scripts/sample_diffusion.py -r models/ldm/celeba256/model.ckpt --steps 200 --eta 0 -n 10 --n_iter 5
  # a training log folder of main.py (configs/*-project.yaml + checkpoints/last.ckpt)
  python scripts/sample_diffusion.py -r logs/2024-01-01T00-00-00_celebahq --sampler ddpm
  # convolutional sampling beyond the training size
  python scripts/sample_diffusion.py --config C.yaml --ckpt M.safetensors --H 384 --W 512

Writes OUTDIR/samples/NNNNN.png and OUTDIR/grid-NNNN.png; OUTDIR defaults to
LOGDIR/samples/<date-time> (LOGDIR: the folder of -r); --npz also stores the batch as
uint8 (N, H, W, 3) in OUTDIR/numpy/, as the original.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import trange  # noqa: E402

from ldm import perf  # noqa: E402
from ldm import scripting as S  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", help="a logdir (config + checkpoint inside) or a checkpoint in one")
    alias = dict(default=argparse.SUPPRESS)
    p.add_argument("-v", "--vanilla_sample", dest="sampler", action="store_const", const="ddpm",
                   help="= --sampler ddpm (ancestral sampling with all training steps)", **alias)
    p.add_argument("-e", dest="eta", type=float, help="= --eta", **alias)
    p.add_argument("-c", "--custom_steps", dest="steps", type=int, help="= --steps", **alias)
    p.add_argument("--npz", action="store_true", help="also save every batch as a uint8 .npz")
    S.add_common_args(p, steps=50, eta=1.0, n_samples=10, outdir=None)
    return p


def resolve_resume(resume: str) -> tuple[Path, list[Path], Optional[Path]]:
    """-r -> (logdir, config files, checkpoint). Released folders hold config.yaml + model.ckpt;
    main.py logdirs hold configs/*-project.yaml + checkpoints/last.ckpt."""
    r = Path(resume)
    if not r.exists():
        S.fail(f"cannot find -r '{resume}' (a logdir or a checkpoint file)")
    if r.is_file():
        ckpt, logdir = r, r.parent
        if logdir.name == "checkpoints":
            logdir = logdir.parent
    else:
        logdir = r
        candidates = [r / "model.ckpt", r / "checkpoints" / "last.ckpt", r / "model.safetensors"]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            S.fail(f"no checkpoint in logdir '{r}' (looked for {', '.join(str(c) for c in candidates)})")
    configs = [logdir / "config.yaml"] if (logdir / "config.yaml").is_file() else \
        sorted((logdir / "configs").glob("*-project.yaml"))
    return logdir, configs, ckpt


def merged_config(paths: Sequence[Path]) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.load(p) for p in paths]), resolve=True)


def config_from_resume(opt: argparse.Namespace) -> tuple[Any, Any, Optional[Path]]:
    """(config, ckpt, logdir) from --config / --ckpt, completed from -r when given."""
    config, ckpt, logdir = opt.config, opt.ckpt, None
    if opt.resume is not None:
        logdir, configs, found = resolve_resume(opt.resume)
        ckpt = ckpt or found
        if config is None:
            if not configs:
                S.fail(f"no config in logdir '{logdir}' (config.yaml or configs/*-project.yaml); pass --config")
            config = merged_config(configs)
    return config, ckpt, logdir


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    config, ckpt, logdir = config_from_resume(opt)
    if config is None:
        S.fail("pass -r LOGDIR_OR_CKPT, or --config and --ckpt")
    model = S.load_model(config, ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    if getattr(model, "cond_stage_model", None) is not None and model.model.conditioning_key is not None:
        S.fail("this model is conditional: use txt2img.py, sample_class_conditional.py, inpaint.py or superres.py")
    shape = S.latent_shape(model, opt.H, opt.W)
    outdir = Path(opt.outdir) if opt.outdir else \
        Path(logdir or ".") / "samples" / datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    generator = S.seed_everything(opt.seed)
    writer = S.SampleWriter(outdir)
    steps = f"all {model.num_timesteps}" if opt.sampler == "ddpm" else opt.steps
    print(f"Sampling {opt.n_iter} x {opt.n_samples} images with {opt.sampler} ({steps} steps, eta {opt.eta})")
    with torch.no_grad(), perf.autocast(opt.precision, device), model.ema_scope("Sampling"):
        for i in trange(opt.n_iter, desc="Sampling Batches (unconditional)"):
            z = S.sample(model, opt.sampler, opt.steps, shape, opt.n_samples, eta=opt.eta, generator=generator,
                         **S.sampler_options(opt))
            images = S.decode(model, z)
            writer.save(images)
            if opt.npz:
                arr = S.to_uint8(images)
                (outdir / "numpy").mkdir(exist_ok=True)
                np.savez(outdir / "numpy" / f"{i:04}-{'x'.join(map(str, arr.shape))}-samples.npz", arr)
    writer.save_grid(opt.n_rows or opt.n_samples)
    print(f"Samples in {outdir}")
    return writer.written


if __name__ == "__main__":
    main()
