"""Reconstruct an EMA of any length from the post-hoc EMA snapshots of a run (EDM2).

    python scripts/posthoc_ema.py --snapshots logs/<run>/checkpoints/posthoc_ema \\
        --ckpt logs/<run>/checkpoints/last.ckpt --sigma-rel 0.075 --out ema-0.075.ckpt [--step N]

Solves the least-squares problem of `ldm.modules.posthoc_ema.solve_weights` for the snapshots
written by the PostHocEMA callback, and writes a copy of --ckpt whose averaged parameters
(`model.*`, and the LitEma copies `model_ema.*` where the checkpoint has them, so sampling with or
without the EMA scope uses them) are the reconstruction: txt2img.py / sample_diffusion.py /
evaluate.py load it like any checkpoint. `--out x.safetensors` writes the state dict only.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.modules.posthoc_ema import list_snapshots, reconstruct  # noqa: E402

log = logging.getLogger("posthoc_ema")


def ema_buffer_name(key: str, module: str = "model") -> str:
    """LitEma's buffer for the LightningModule key `model.a.b` is `model_ema.ab` (dots removed)."""
    return "model_ema." + key[len(module) + 1:].replace(".", "")


def main(argv: Optional[list[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--snapshots", required=True, help="posthoc_ema/ folder (or the checkpoints folder above it)")
    p.add_argument("--ckpt", required=True, help="a checkpoint of the run: everything not averaged is taken from it")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA length to reconstruct, e.g. 0.075")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this step (default: the last snapshot's)")
    p.add_argument("--out", required=True, help=".ckpt (full checkpoint) or .safetensors (state dict)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    snapshots = list_snapshots(args.snapshots)
    weights, x = reconstruct(snapshots, args.sigma_rel, args.step)
    log.info("sigma_rel %.4f from %d snapshots; coefficients sum %.6f", args.sigma_rel, len(x), float(x.sum()))
    ckpt_path = Path(args.ckpt)
    if ckpt_path.suffix == ".safetensors":
        from safetensors.torch import load_file
        ckpt = {"state_dict": load_file(str(ckpt_path))}
    else:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    for key, value in weights.items():
        if key not in sd:
            raise KeyError(f"{args.snapshots}: snapshot key '{key}' is not in {ckpt_path}; snapshots and "
                           "checkpoint come from different models")
        if sd[key].shape != value.shape:
            raise ValueError(f"'{key}': snapshot shape {tuple(value.shape)} != checkpoint {tuple(sd[key].shape)}")
        sd[key] = value.to(sd[key].dtype)
        ema_key = ema_buffer_name(key, key.split(".", 1)[0])
        if ema_key in sd:
            sd[ema_key] = value.to(sd[ema_key].dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, str(out))
    else:
        ckpt.pop("callbacks", None)   # the running averages are not part of the reconstructed model
        torch.save(ckpt, out)
    log.info("wrote %s", out)
    return out


if __name__ == "__main__":
    main()
