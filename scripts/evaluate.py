#!/usr/bin/env python
"""Evaluate a model as in the paper: FID / IS / KID / precision-recall of samples, or rFID /
PSNR / SSIM / PSIM of an autoencoder's reconstructions. A thin CLI over `ldm.eval`.

  # LDM: 50k samples (resumable, multi-GPU with torchrun), then metrics vs the train split
  python scripts/evaluate.py --config C --ckpt K --n 50000 --sampler ddim --steps 200 --eta 1.0 \
      --scale 1.5 --batch 50 --outdir D
  torchrun --nproc_per_node 8 scripts/evaluate.py --preset celebahq-ldm-vq-4 --ckpt K --outdir D
      # (under torchrun write --num-samples, not --n, which torchrun takes for one of its own options)
  # autoencoder zoo row
  python scripts/evaluate.py --preset vq-f4 --ckpt K --outdir D
  # the metrics papers report now, beside FID (weights read from local files, checked before sampling)
  python scripts/evaluate.py --config C --ckpt K --n 10000 --metrics fid,fd_dinov2,cmmd \
      --dinov2-weights dinov2_vitl14_pretrain.pth --clip-weights open_clip_pytorch_model.bin --outdir D
  python scripts/evaluate.py --skip-sampling --outdir SAMPLES --metrics clip_score --clip-prompts prompts.txt \
      --clip-weights open_clip_pytorch_model.bin --ref-dir REF
  # offline smoke test (numbers meaningless, flagged as such)
  python scripts/evaluate.py --config C --ckpt K --n 16 --random-inception --outdir /tmp/x

Options left out take the preset's value, else the defaults of `ldm.eval.pipeline.EvalSettings`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.eval.pipeline import (AUTOENCODER_METRICS, GENERATIVE_METRICS, EvalSettings,  # noqa: E402
                               run_autoencoder, run_generative)
from ldm.eval.presets import get_preset, load_presets  # noqa: E402
from ldm.sampling import registry as sampler_registry  # noqa: E402

AUTOENCODER_TARGETS = ("AutoencoderKL", "VQModel", "VQModelInterface")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    a = p.add_argument
    a("--preset", help="protocol preset from configs/eval/presets.yaml")
    a("--list-presets", action="store_true", help="print the presets and exit")
    a("--config", help="model YAML")
    a("--ckpt", help="model checkpoint")
    a("--outdir", help="samples ({i:06d}.png) and eval_results.json go here")
    a("--json", dest="json_path", help="results JSON path (default OUTDIR/eval_results.json)")
    a("--autoencoder", dest="task", action="store_const", const="autoencoder",
      help="evaluate reconstructions (auto-detected for AutoencoderKL / VQModel configs)")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", "--num-samples", dest="n", type=int,
                   help="number of samples (autoencoder: images, default all)")
    g.add_argument("--sampler", choices=sampler_registry.names(), help=sampler_registry.help_text())
    g.add_argument("--steps", type=int)
    g.add_argument("--eta", type=float)
    g.add_argument("--scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--batch", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--n-classes", type=int, help="class-conditional: label of sample i is i %% n_classes")
    g.add_argument("--uncond-label", type=int, help="null class id for guidance (cin256-v2: 1000)")
    g.add_argument("--skip-sampling", action="store_true", default=None, help="evaluate the PNGs in OUTDIR only")
    g.add_argument("--force", action="store_true", default=None, help="resume into a folder of another protocol")
    r = p.add_argument_group("reference and metrics")
    r.add_argument("--split", help="reference split of the config's data section (default train / validation)")
    r.add_argument("--ref-dir", dest="ref_folder", help="reference images from a folder instead")
    r.add_argument("--ref-limit", type=int, help="use only the first N reference images")
    r.add_argument("--max-ref-features", type=int)
    r.add_argument("--metrics", help=f"comma list of {','.join(GENERATIVE_METRICS)} or {','.join(AUTOENCODER_METRICS)}")
    r.add_argument("--inception-weights", help="Inception .pth (else $LDM_INCEPTION_WEIGHTS / torch hub cache)")
    r.add_argument("--random-inception", action="store_true", default=None,
                   help="RANDOM-weight Inception for offline smoke tests (numbers not comparable)")
    r.add_argument("--dinov2-weights", help=f"DINOv2 ViT-L/14 dinov2_vitl14_pretrain.pth for fd_dinov2 "
                   "(else $LDM_DINOV2_WEIGHTS / torch hub cache)")
    r.add_argument("--clip-weights", help="open_clip ViT-L-14-336 (openai) checkpoint for cmmd / clip_score "
                   "(else $LDM_CLIP_WEIGHTS / torch hub cache)")
    r.add_argument("--clip-prompts", help="clip_score: text file, line i = the caption of sample i")
    r.add_argument("--random-features", action="store_true", default=None,
                   help="RANDOM-weight DINOv2 / CLIP for offline smoke tests (numbers not comparable)")
    r.add_argument("--random-lpips", action="store_true", default=None,
                   help="RANDOM-weight LPIPS for offline smoke tests (numbers not comparable)")
    r.add_argument("--kid-subsets", type=int)
    r.add_argument("--kid-subset-size", type=int)
    r.add_argument("--pr-k", type=int)
    m = p.add_argument_group("runtime")
    m.add_argument("--device")
    m.add_argument("--cache-dir", help="reference statistics cache (default $LDM_EVAL_CACHE or ~/.cache/ldm/eval)")
    m.add_argument("--no-cache", dest="use_cache", action="store_false", default=None)
    m.add_argument("--num-workers", type=int)
    m.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p


def preset_values(name: str) -> dict:
    pr = get_preset(name)
    ref = pr.get("reference") or {}
    out = {k: pr[k] for k in ("task", "row", "config", "ckpt", "n", "sampler", "steps", "eta", "scale", "batch",
                              "seed", "n_classes", "uncond_label", "metrics", "paper", "uncertain") if k in pr}
    out.update(preset=name, split=ref.get("split"), reference_data=ref.get("data"))
    return {k: v for k, v in out.items() if v is not None}


def detect_task(config_path: str | None) -> str:
    if not config_path or not Path(config_path).is_file():
        return "generative"
    from omegaconf import OmegaConf

    target = str(OmegaConf.load(config_path).get("model", {}).get("target", ""))
    return "autoencoder" if target.rsplit(".", 1)[-1] in AUTOENCODER_TARGETS else "generative"


def settings_from_args(argv: list[str] | None = None) -> EvalSettings | None:
    args = parser().parse_args(argv)
    if args.list_presets:
        for name, pr in load_presets().items():
            print(f"{name:24s} {pr.get('task', 'generative'):12s} {pr.get('table', '')}: {pr.get('row', '')}")
        return None
    values = preset_values(args.preset) if args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "list_presets"})
    if isinstance(values.get("metrics"), str):
        values["metrics"] = [m.strip() for m in values["metrics"].split(",") if m.strip()]
    if "task" not in values:
        values["task"] = detect_task(values.get("config"))
    if values["task"] == "autoencoder":
        values.setdefault("metrics", list(AUTOENCODER_METRICS))
        values.setdefault("n", None)
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    return EvalSettings(**{k: v for k, v in values.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    from ldm.eval.feature_nets import FeatureWeightsNotFound
    from ldm.eval.features import InceptionWeightsNotFound
    try:
        return _main(argv)
    except (FeatureWeightsNotFound, InceptionWeightsNotFound) as e:   # raised before any sampling
        raise SystemExit(f"error: {e}") from None


def _main(argv: list[str] | None = None) -> int:
    s = settings_from_args(argv)
    if s is None:
        return 0
    if s.task == "autoencoder":
        run_autoencoder(s)
    else:
        if not s.skip_sampling and not (s.config and s.ckpt):
            raise SystemExit("sampling needs --config and --ckpt (or --skip-sampling to evaluate OUTDIR)")
        run_generative(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
