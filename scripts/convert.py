#!/usr/bin/env python
"""Convert checkpoints between our format and diffusers', and slim them down.

  # ours -> a diffusers folder (StableDiffusionPipeline / LDMPipeline / our class-conditional pipeline)
  python scripts/convert.py to-diffusers --config configs/stable-diffusion/v1-inference.yaml \\
      --ckpt sd-v1-4.ckpt --out sd14-diffusers [--use-ema] [--dtype fp16]
  # a diffusers folder -> our config (original YAML layout) + a strict-loading checkpoint
  python scripts/convert.py from-diffusers --dir sd14-diffusers --config sd14.yaml --ckpt sd14.safetensors
  # slim a training checkpoint: drop EMA / keep EMA only, drop optimizer states, fp16
  python scripts/convert.py prune --ckpt last.ckpt --out model.safetensors --ema only --dtype fp16

Load an exported folder offline with
  StableDiffusionPipeline.from_pretrained(DIR, local_files_only=True)                 (text-conditional)
  LDMPipeline.from_pretrained(DIR, local_files_only=True)                             (unconditional)
  ldm.interop.LDMClassConditionalPipeline.from_pretrained(DIR, local_files_only=True) (class-conditional)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm import scripting as S  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def to_diffusers(opt: argparse.Namespace) -> Path:
    from ldm.interop import export_diffusers
    cfg = S.load_config(opt.config)
    model_cfg = S.strip_ckpt_paths(cfg["model"])
    p = model_cfg.get("params", {})
    if "ddconfig" in p:   # an autoencoder on its own: its training loss is not part of the export
        p["lossconfig"] = {"target": "torch.nn.Identity"}
    if opt.use_ema:
        p["use_ema"] = True
    model = S.load_model({"model": model_cfg}, opt.ckpt)
    with S.clear_errors():
        out = export_diffusers(model, {"model": model_cfg}, opt.out, use_ema=opt.use_ema, dtype=DTYPES[opt.dtype])
    print(f"wrote {out} ({_mb(_size(out))}; checkpoint {_mb(_size(Path(opt.ckpt)))})")
    return out


def from_diffusers(opt: argparse.Namespace) -> tuple[Path, Path]:
    from omegaconf import OmegaConf

    from ldm.interop import import_diffusers
    cfg_out, ckpt_out = Path(opt.config), Path(opt.ckpt)
    text_dir = cfg_out.parent / f"{cfg_out.stem}_text_encoder"
    with S.clear_errors():
        config, sd = import_diffusers(opt.dir, use_stored_config=opt.stored_config, text_dir=text_dir)
    cfg_out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), cfg_out)
    _save_state_dict(sd, ckpt_out, DTYPES[opt.dtype])
    print(f"wrote {cfg_out} and {ckpt_out} ({_mb(_size(ckpt_out))}; {len(sd)} tensors)")
    return cfg_out, ckpt_out


def _save_state_dict(sd: dict, out: Path, dtype: Optional[torch.dtype], extra: Optional[dict] = None) -> None:
    from ldm.checkpoint import save_safetensors
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if out.suffix == ".safetensors":
        save_safetensors(sd, out)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"state_dict": sd, **(extra or {})}, tmp)
        os.replace(tmp, out)


def ema_key(key: str) -> str:
    """LitEma's shadow name of the parameter `model.<name>`: `model_ema.<name without dots>`."""
    return "model_ema." + key[len("model."):].replace(".", "")


def prune_state_dict(sd: dict, ema: str) -> dict:
    """ema: keep (both), drop (no model_ema.*), only (EMA weights in place of model.*, no model_ema.*)."""
    if ema == "keep":
        return dict(sd)
    out = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if ema == "only":
        swapped = [k for k in out if k.startswith("model.") and ema_key(k) in sd]
        if not swapped:
            S.fail("--ema only: the checkpoint has no model_ema.* weights")
        for k in swapped:
            out[k] = sd[ema_key(k)]
        print(f"EMA weights put in place of {len(swapped)} model.* tensors")
    return out


def prune(opt: argparse.Namespace) -> Path:
    from ldm.checkpoint import read_checkpoint
    src, out = Path(opt.ckpt), Path(opt.out)
    with S.clear_errors():
        obj = read_checkpoint(src, unsafe_pickle=opt.unsafe_pickle)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    dropped = sorted(k for k in obj if k != "state_dict") if isinstance(obj, dict) and "state_dict" in obj else []
    extra = {}
    if opt.keep_training_state:
        extra = {k: obj[k] for k in dropped}
        dropped = []
    else:
        extra = {k: obj[k] for k in ("global_step", "epoch") if isinstance(obj, dict) and k in obj}
        dropped = [k for k in dropped if k not in extra]
    sd = prune_state_dict(sd, opt.ema)
    _save_state_dict(sd, out, DTYPES[opt.dtype], extra if out.suffix != ".safetensors" else None)
    print(f"{src}: {_mb(_size(src))} -> {out}: {_mb(_size(out))}"
          + (f" (dropped {', '.join(dropped)})" if dropped else ""))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-diffusers", help="our config + checkpoint -> a diffusers folder")
    a.add_argument("--config", required=True)
    a.add_argument("--ckpt", required=True, help=".ckpt / .safetensors")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--use-ema", action="store_true", help="export the EMA weights")
    a.add_argument("--dtype", choices=DTYPES, default="fp32")
    b = sub.add_parser("from-diffusers", help="a diffusers folder -> our config + checkpoint")
    b.add_argument("--dir", required=True)
    b.add_argument("--config", required=True, help="output YAML")
    b.add_argument("--ckpt", required=True, help="output .safetensors / .ckpt")
    b.add_argument("--stored-config", action="store_true",
                   help="use the folder's ldm_config.yaml (our exports) instead of deriving the config")
    b.add_argument("--dtype", choices=DTYPES, default="fp32")
    c = sub.add_parser("prune", help="drop EMA or keep EMA only, drop optimizer states, cast")
    c.add_argument("--ckpt", required=True)
    c.add_argument("--out", required=True, help=".ckpt (Lightning layout) or .safetensors")
    c.add_argument("--ema", choices=("keep", "drop", "only"), default="keep")
    c.add_argument("--dtype", choices=DTYPES, default="fp32")
    c.add_argument("--keep-training-state", action="store_true",
                   help="keep optimizer / scheduler / callback states (default: dropped)")
    c.add_argument("--unsafe-pickle", action="store_true", help="allow pickled objects (trusted files only)")
    return p


def main(argv: Optional[Sequence[str]] = None):
    from ldm.interop import InteropError
    opt = parser().parse_args(argv)
    try:
        return {"to-diffusers": to_diffusers, "from-diffusers": from_diffusers, "prune": prune}[opt.command](opt)
    except InteropError as e:
        S.fail(str(e))


if __name__ == "__main__":
    main()
