"""`make demo`: the whole LDM recipe on a small real dataset, on CPU, in about seven minutes (one free core per run).
Each training run uses one thread (robust when the cores are shared; `--threads 2` on an idle
machine) and is also capped in time (`--ae-minutes`, `--ldm-minutes`).

1. stage 1: train the quickstart KL autoencoder on scikit-learn's handwritten digits (main.py),
   then measure its PSNR on the held-out digits (uint8, as ldm.eval computes it);
2. stage 2: train a class-conditional latent diffusion model on its latents (main.py);
3. sample every class with DDIM and classifier-free guidance;
4. judge the samples with an RBF-SVC trained on the real training digits (its accuracy on the
   real held-out digits is printed beside it, so the sample accuracy can be read against it).

Writes to --out (default outputs/demo):
  samples_grid.png          one row per class (the first --grid-per-class samples)
  reconstructions.png       held-out digits, each row of inputs above its row of reconstructions
  loss_stage1.png, loss_stage2.png   training/validation losses from the runs' TensorBoard logs
  result.json               PSNR, class accuracy (overall and per class), steps and wall time per stage

    python scripts/demo.py [--out outputs/demo] [--ae-steps N] [--ldm-steps N] [--per-class 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

AE_CONFIG = ROOT / "configs" / "quickstart" / "autoencoder_kl_digits.yaml"
LDM_CONFIG = ROOT / "configs" / "quickstart" / "ldm_digits.yaml"
CLASSIFIER = "RBF-SVC (C=10, gamma='scale') on 8x8 grey features, trained on the real training digits"


def train(config: Path, name: str, logdir: Path, overrides: list[str], threads: int) -> tuple[Path, float]:
    """Run main.py in a subprocess; return the run folder and the wall time in seconds."""
    before = set(logdir.glob(f"*_{name}")) if logdir.exists() else set()
    cmd = [sys.executable, "main.py", "--base", str(config), "-t", "--no-test", "-n", name, "-l", str(logdir),
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    seconds = time.time() - t0
    runs = sorted(set(logdir.glob(f"*_{name}")) - before)
    if not runs:
        raise RuntimeError(f"main.py finished but wrote no run folder '*_{name}' under {logdir}")
    print(f"[demo] {name}: {seconds:.0f} s -> {runs[-1]}", flush=True)
    return runs[-1], seconds


def step_overrides(steps: int) -> list[str]:
    """max_steps, and for short runs a logging interval that still draws a loss curve."""
    over = [f"lightning.trainer.max_steps={steps}"]
    if steps < 100:
        over.append(f"lightning.trainer.log_every_n_steps={max(1, steps // 4)}")
    return over


def max_time(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    s = int(minutes * 60)
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def load_run(run: Path, inference: bool = False, **kwargs: Any):
    """The trained model of a main.py run folder (its merged project config and last.ckpt);
    `inference`: an autoencoder without its training loss (the checkpoint's `loss.*` are skipped)."""
    from omegaconf import OmegaConf
    from ldm.checkpoint import load_model_from_config

    configs = sorted((run / "configs").glob("*-project.yaml"))
    config = OmegaConf.merge(*[OmegaConf.load(c) for c in configs])
    if inference:
        config.model.params.lossconfig = {"target": "torch.nn.Identity"}
    return load_model_from_config(config, run / "checkpoints" / "last.ckpt", **kwargs).eval()


def trained_steps(run: Path) -> int:
    from ldm.checkpoint import read_checkpoint
    return int(read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"])


# ---------------------------------------------------------------- stage 1: reconstructions
def evaluate_autoencoder(run: Path, grid_path: Path, n_grid: int = 20) -> dict:
    """PSNR of the posterior-mode reconstructions of all held-out digits; writes the grid."""
    import torch
    from ldm.data.digits import DigitsValidation
    from ldm.eval.image_metrics import psnr, to_uint8

    model = load_run(run, inference=True)
    x = torch.from_numpy(DigitsValidation(size=32).images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        rec = model.decode(model.encode(x).mode()).clamp(-1, 1)
    values = psnr(to_uint8(x), to_uint8(rec))
    rows = []
    for i in range(0, n_grid, 10):   # 10 inputs, then their 10 reconstructions
        rows += [x[i:i + 10], rec[i:i + 10]]
    save_grid(torch.cat(rows), 10, grid_path)
    return {"psnr_mean": float(values.mean()), "psnr_min": float(values.min()), "n_images": len(values)}


# ---------------------------------------------------------------- stage 2: samples
def sample_per_class(model, per_class: int, steps: int, scale: float, eta: float, seed: int):
    """(10 * per_class, 3, 32, 32) images in [-1, 1] (class-major) and their labels."""
    import torch
    from ldm.models.diffusion.ddim import DDIMSampler

    labels = torch.arange(10).repeat_interleave(per_class)
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": labels})
        uc = model.get_learned_conditioning({"class_label": torch.full_like(labels, 10)})  # the "no class" label
        shape = (model.channels, model.image_size, model.image_size)
        x_T = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(seed))
        z, _ = DDIMSampler(model).sample(S=steps, batch_size=len(labels), shape=shape, conditioning=c, eta=eta,
                                         x_T=x_T, unconditional_guidance_scale=scale,
                                         unconditional_conditioning=uc, verbose=False)
        x = model.decode_first_stage(z).clamp(-1, 1)
    return x, labels.numpy()


def save_grid(x, nrow: int, path: Path) -> None:
    """(N, 3, H, W) in [-1, 1] -> a PNG grid, upscaled x2 for viewing."""
    import torchvision
    from PIL import Image

    grid = torchvision.utils.make_grid((x + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)


def judge(images, labels) -> dict:
    """Class accuracy of the samples by an SVC trained on the real training digits, and the SVC's
    own accuracy on the real held-out digits."""
    import numpy as np
    from sklearn.svm import SVC
    from ldm.data.digits import DigitsTrain, DigitsValidation, to_8x8_features

    train, held_out = DigitsTrain(size=32), DigitsValidation(size=32)
    clf = SVC(C=10.0, gamma="scale").fit(to_8x8_features(train.images), train.labels)
    real_acc = float(np.mean(clf.predict(to_8x8_features(held_out.images)) == held_out.labels))
    pred = clf.predict(to_8x8_features(images.permute(0, 2, 3, 1).numpy()))
    per_class = {str(k): float(np.mean(pred[labels == k] == k)) for k in range(10)}
    return {"sample_accuracy": float(np.mean(pred == labels)), "n_samples": int(len(labels)),
            "per_class_accuracy": per_class, "classifier": CLASSIFIER,
            "classifier_real_heldout_accuracy": real_acc}


# ---------------------------------------------------------------- loss curves
STAGE1_TAGS = ("train/rec_loss", "val/rec_loss")   # per-pixel L1 (+ LPIPS when on)
STAGE2_TAGS = ("train/loss_simple_step", "val/loss_simple", "val/loss_simple_ema")


def plot_losses(run: Path, tags: tuple[str, ...], title: str, path: Path) -> list[str]:
    """Scalars of the run's TensorBoard events -> a PNG (log scale); returns the tags plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    present = [t for t in tags if t in acc.Tags()["scalars"]]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for tag in present:
        events = acc.Scalars(tag)
        style = "-" if tag.startswith("train") else "o-"
        ax.plot([e.step for e in events], [e.value for e in events], style, label=tag, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if present:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return present


def _round(seconds: Any) -> Any:
    return None if seconds is None else round(seconds, 1)


def _seconds(seconds: Any) -> str:
    return "reused run" if seconds is None else f"{seconds:.0f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (pictures, result.json)")
    p.add_argument("--logdir", default="logs", help="main.py's log folder for the two runs")
    p.add_argument("--ae-steps", type=int, default=None, help="stage-1 steps (default: the config's)")
    p.add_argument("--ldm-steps", type=int, default=None, help="stage-2 steps (default: the config's)")
    p.add_argument("--per-class", type=int, default=10, help="samples per class judged by the classifier")
    p.add_argument("--grid-per-class", type=int, default=10, help="samples per class shown in the grid")
    p.add_argument("--ae-minutes", type=float, default=5.0, help="stage-1 time cap (Trainer max_time)")
    p.add_argument("--ldm-minutes", type=float, default=7.0, help="stage-2 time cap (Trainer max_time)")
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--scale", type=float, default=8.0, help="classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae-run", default=None, help="reuse this stage-1 run folder instead of training")
    p.add_argument("--ldm-run", default=None, help="reuse this stage-2 run folder instead of training")
    args = p.parse_args()

    t_start = time.time()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logdir = (ROOT / args.logdir).resolve()

    ae_over = [f"lightning.trainer.max_time={max_time(args.ae_minutes)}"]
    if args.ae_steps:   # the cosine LR decay ends at the last step
        ae_over += [*step_overrides(args.ae_steps),
                    f"model.params.scheduler_config.params.max_decay_steps={args.ae_steps}",
                    f"model.params.scheduler_config.params.warm_up_steps={min(20, max(1, args.ae_steps // 10))}"]
    if args.ae_run:
        ae_run, ae_seconds = Path(args.ae_run).resolve(), None
    else:
        ae_run, ae_seconds = train(AE_CONFIG, "digits_ae", logdir, ae_over, args.threads)

    import torch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    stage1 = evaluate_autoencoder(ae_run, out / "reconstructions.png")
    print(f"[demo] held-out reconstructions: PSNR {stage1['psnr_mean']:.2f} dB mean, {stage1['psnr_min']:.2f} min "
          f"-> {out / 'reconstructions.png'}", flush=True)
    ae_eval_seconds = time.time() - t0

    ldm_over = [f"model.params.first_stage_config.params.ckpt_path={ae_run / 'checkpoints' / 'last.ckpt'}",
                f"lightning.trainer.max_time={max_time(args.ldm_minutes)}"]
    if args.ldm_steps:
        ldm_over += step_overrides(args.ldm_steps)
    if args.ldm_run:
        ldm_run, ldm_seconds = Path(args.ldm_run).resolve(), None
    else:
        ldm_run, ldm_seconds = train(LDM_CONFIG, "digits_ldm", logdir, ldm_over, args.threads)

    t0 = time.time()
    model = load_run(ldm_run, use_ema=True)
    sampler = {"sampler": "DDIM", "steps": args.ddim_steps, "eta": args.eta, "guidance_scale": args.scale,
               "unconditional_class": 10, "weights": "EMA", "seed": args.seed, "per_class": args.per_class}
    images, labels = sample_per_class(model, args.per_class, args.ddim_steps, args.scale, args.eta, args.seed)
    grid = images.reshape(10, args.per_class, *images.shape[1:])[:, :args.grid_per_class].flatten(0, 1)
    save_grid(grid, min(args.grid_per_class, args.per_class), out / "samples_grid.png")
    sample_seconds = time.time() - t0
    print(f"[demo] sampled {len(labels)} digits ({', '.join(f'{k}={v}' for k, v in sampler.items())}) "
          f"in {sample_seconds:.0f} s -> {out / 'samples_grid.png'}", flush=True)

    stage2 = judge(images, labels)
    plotted = {"loss_stage1.png": plot_losses(ae_run, STAGE1_TAGS, "stage 1: KL autoencoder", out / "loss_stage1.png"),
               "loss_stage2.png": plot_losses(ldm_run, STAGE2_TAGS, "stage 2: latent diffusion",
                                              out / "loss_stage2.png")}
    result = {
        "stage1": {**stage1, "steps": trained_steps(ae_run), "train_seconds": _round(ae_seconds),
                   "eval_seconds": round(ae_eval_seconds, 1), "run": str(ae_run)},
        "stage2": {**stage2, "steps": trained_steps(ldm_run), "train_seconds": _round(ldm_seconds),
                   "sample_seconds": round(sample_seconds, 1), "sampler": sampler, "run": str(ldm_run)},
        "loss_curves": plotted,
        "threads": args.threads,
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))

    s1, s2 = result["stage1"], result["stage2"]
    per_class = " ".join(f"{k}:{100 * v:.0f}" for k, v in s2["per_class_accuracy"].items())
    rows = [("stage 1 autoencoder", f"{s1['steps']} steps, {_seconds(s1['train_seconds'])}",
             f"PSNR {s1['psnr_mean']:.2f} dB mean / {s1['psnr_min']:.2f} dB min on {s1['n_images']} held-out digits"),
            ("stage 2 LDM", f"{s2['steps']} steps, {_seconds(s2['train_seconds'])}",
             f"{100 * s2['sample_accuracy']:.1f}% of {s2['n_samples']} samples recognised as their class"),
            ("classifier", "", f"{100 * s2['classifier_real_heldout_accuracy']:.1f}% on real held-out digits (SVC)"),
            ("per class %", "", per_class),
            ("sampling", f"{sample_seconds:.0f} s", f"DDIM {args.ddim_steps} steps, eta {args.eta}, "
                                                     f"guidance {args.scale}, EMA weights"),
            ("total", f"{result['total_seconds'] / 60:.1f} min", str(out))]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    print("\n" + "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows))
    print(f"files: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
