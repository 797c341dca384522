"""`make demo`: the whole LDM recipe on a small real dataset, on CPU, in about ten minutes.
Each training run uses one thread (robust when the cores are shared; `--threads 2` on an idle
machine) and is capped in time (`--ae-minutes`, `--ldm-minutes`) so the demo ends in < 15 minutes.

1. stage 1: train the quickstart KL autoencoder on scikit-learn's handwritten digits (main.py);
2. stage 2: train a class-conditional latent diffusion model on its latents (main.py);
3. sample a grid per class with DDIM (classifier-free guidance) -> outputs/demo/samples_grid.png;
4. judge the samples with a classifier trained on real held-out digits:
   "class accuracy of samples: X%" (chance: 10%).

    python scripts/demo.py [--out outputs/demo] [--ae-steps N] [--ldm-steps N] [--per-class 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AE_CONFIG = ROOT / "configs" / "quickstart" / "autoencoder_kl_digits.yaml"
LDM_CONFIG = ROOT / "configs" / "quickstart" / "ldm_digits.yaml"


def train(config: Path, name: str, logdir: Path, overrides: list[str], threads: int) -> Path:
    """Run main.py in a subprocess; return the run folder."""
    before = set(logdir.glob(f"*_{name}")) if logdir.exists() else set()
    cmd = [sys.executable, "main.py", "--base", str(config), "-t", "--no-test", "-n", name, "-l", str(logdir),
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    runs = sorted(set(logdir.glob(f"*_{name}")) - before)
    if not runs:
        raise RuntimeError(f"main.py finished but wrote no run folder '*_{name}' under {logdir}")
    print(f"[demo] {name}: {time.time() - t0:.0f} s -> {runs[-1]}", flush=True)
    return runs[-1]


def max_time(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    s = int(minutes * 60)
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def load_ldm(run: Path):
    """The trained LatentDiffusion (EMA weights) from a main.py run folder."""
    from omegaconf import OmegaConf
    from ldm.checkpoint import load_model_from_config

    configs = sorted((run / "configs").glob("*-project.yaml"))
    config = OmegaConf.merge(*[OmegaConf.load(c) for c in configs])
    return load_model_from_config(config, run / "checkpoints" / "last.ckpt", use_ema=True)


def sample_per_class(model, per_class: int, steps: int, scale: float, seed: int):
    """(10 * per_class, 32, 32, 3) images in [-1, 1] (class-major) and their labels."""
    import torch
    from ldm.models.diffusion.ddim import DDIMSampler

    labels = torch.arange(10).repeat_interleave(per_class)
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": labels})
        uc = model.get_learned_conditioning({"class_label": torch.full_like(labels, 10)})  # the "no class" label
        shape = (model.channels, model.image_size, model.image_size)
        x_T = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(seed))
        z, _ = DDIMSampler(model).sample(S=steps, batch_size=len(labels), shape=shape, conditioning=c, eta=0.0,
                                         x_T=x_T, unconditional_guidance_scale=scale,
                                         unconditional_conditioning=uc, verbose=False)
        x = model.decode_first_stage(z).clamp(-1, 1)
    return x.permute(0, 2, 3, 1).numpy(), labels.numpy()


def save_grid(images, per_class: int, path: Path) -> None:
    """One row per class, upscaled x2 for viewing."""
    import torch
    import torchvision
    from PIL import Image

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    grid = torchvision.utils.make_grid((x + 1) / 2, nrow=per_class, padding=2, pad_value=1.0)
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)


def judge(images, labels) -> dict:
    """Accuracy of a logistic-regression digit classifier (trained on the held-out real digits,
    8x8 features) on the samples, next to its accuracy on the real training digits."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from ldm.data.digits import DigitsTrain, DigitsValidation, to_8x8_features

    held_out, train = DigitsValidation(size=32), DigitsTrain(size=32)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(to_8x8_features(held_out.images), held_out.labels)
    real_acc = float(np.mean(clf.predict(to_8x8_features(train.images)) == train.labels))
    pred = clf.predict(to_8x8_features(images))
    per_class = {int(k): float(np.mean(pred[labels == k] == k)) for k in range(10)}
    return {"sample_accuracy": float(np.mean(pred == labels)), "real_accuracy": real_acc,
            "per_class_accuracy": per_class}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (samples grid, result.json)")
    p.add_argument("--logdir", default="logs", help="main.py's log folder for the two runs")
    p.add_argument("--ae-steps", type=int, default=None, help="stage-1 steps (default: the config's)")
    p.add_argument("--ldm-steps", type=int, default=None, help="stage-2 steps (default: the config's)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--ae-minutes", type=float, default=4.0, help="stage-1 time cap (Trainer max_time)")
    p.add_argument("--ldm-minutes", type=float, default=7.5, help="stage-2 time cap (Trainer max_time)")
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    t_start = time.time()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logdir = (ROOT / args.logdir).resolve()
    ae_over = [f"lightning.trainer.max_time={max_time(args.ae_minutes)}"]
    if args.ae_steps:
        ae_over.append(f"lightning.trainer.max_steps={args.ae_steps}")
    ae_run = train(AE_CONFIG, "digits_ae", logdir, ae_over, args.threads)
    ldm_over = [f"model.params.first_stage_config.params.ckpt_path={ae_run / 'checkpoints' / 'last.ckpt'}",
                f"lightning.trainer.max_time={max_time(args.ldm_minutes)}"]
    if args.ldm_steps:
        ldm_over.append(f"lightning.trainer.max_steps={args.ldm_steps}")
    ldm_run = train(LDM_CONFIG, "digits_ldm", logdir, ldm_over, args.threads)

    import torch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_ldm(ldm_run)
    images, labels = sample_per_class(model, args.per_class, args.ddim_steps, args.scale, args.seed)
    save_grid(images, args.per_class, out / "samples_grid.png")
    print(f"[demo] sampled {len(labels)} digits ({args.ddim_steps} DDIM steps, guidance {args.scale}) "
          f"in {time.time() - t0:.0f} s -> {out / 'samples_grid.png'}", flush=True)

    result = judge(images, labels)
    result.update(ae_run=str(ae_run), ldm_run=str(ldm_run), minutes=round((time.time() - t_start) / 60, 1))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"classifier accuracy on real training digits: {100 * result['real_accuracy']:.1f}%")
    print(f"class accuracy of samples: {100 * result['sample_accuracy']:.1f}%")
    print(f"[demo] total {result['minutes']} min; details in {out / 'result.json'}")


if __name__ == "__main__":
    main()
