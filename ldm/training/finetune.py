"""`main.py --finetune_from <ckpt>`: start a training run from the weights of another model
(a released Stable Diffusion / LDM checkpoint, or one of our runs), not from its training state.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --finetune_from sd-v1-4.ckpt \\
        data.params.train.params.root=data/my_images

* weights: every tensor of the model must be in the file with its shape (strict, through
  `ldm.checkpoint.load_into`, so the known-benign keys and released key layouts are handled
  the same way as everywhere else); entries the model has no place for are listed, not loaded;
* EMA (`--finetune_ema`): `reset` (default) starts the EMA at the loaded weights; `load` takes
  the file's `model_ema.*` (falls back to `reset` when the file has none);
* optimizer, scheduler, step and epoch start fresh (use `-r <logdir>` to continue a run);
* learning rate: `base_learning_rate` is used as is unless `--scale_lr true` is given explicitly.

A summary of what was loaded and what was ignored is printed. Resuming such a run with `-r`
restores its own last.ckpt and does not read the file again; <logdir>/finetune.yaml
records where it started and whether its learning rate was scaled, which -r keeps.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning.utilities import rank_zero_info

log = logging.getLogger(__name__)

EMA_CHOICES = ("reset", "load")
EMA_PREFIX = "model_ema."


def group_counts(keys: Sequence[str]) -> str:
    """'model: 686, first_stage_model: 248, ...' (first key component; top-level buffers together)."""
    counts = Counter(k.split(".", 1)[0] if "." in k else "schedule buffers" for k in keys)
    return ", ".join(f"{name}: {n}" for name, n in counts.most_common()) or "none"


def init_from_checkpoint(model: torch.nn.Module, path: str, ema: str = "reset", *,
                         unsafe_pickle: bool = False) -> dict[str, Any]:
    """Load the weights of `path` into `model` for fine-tuning; returns (and prints) a summary
    {"loaded", "ignored", "benign", "ema"} of key lists / the EMA decision."""
    from ldm.checkpoint import load_into, load_state_dict_file
    from ldm.models.diffusion.loading import ema_from_weights
    if ema not in EMA_CHOICES:
        raise ValueError(f"--finetune_ema must be one of {EMA_CHOICES}, got {ema!r}")
    sd = load_state_dict_file(path, unsafe_pickle=unsafe_pickle)
    file_ema = [k for k in sd if k.startswith(EMA_PREFIX)]
    own = model.state_dict()
    ema_module = getattr(model, "model_ema", None)
    if ema_module is None:
        how = "model has no EMA (use_ema: false)"
        dropped_ema = file_ema
        sd = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    elif ema == "load" and file_ema:
        how = f"loaded from the checkpoint ({len(file_ema)} model_ema.* entries)"
        dropped_ema = []
    else:
        how = "reset to the loaded weights" + (" (the checkpoint has no EMA weights)" if ema == "load" else "")
        dropped_ema = file_ema
        sd = ema_from_weights(sd, ema_module, model.model)
    # load_into adapts released key layouts and the known-benign differences; what the model
    # has no place for is reported and left out, a weight the file lacks is an error
    report = load_into(model, sd, strict=False, source=f"--finetune_from '{path}'")
    if report.missing:
        from ldm.checkpoint import CheckpointError
        raise CheckpointError(f"--finetune_from '{path}' lacks weights of {type(model).__name__}:\n{report}")
    unexpected = sorted(k for k in report.unexpected if not k.startswith(EMA_PREFIX))
    loaded = [k for k in own if not k.startswith(EMA_PREFIX)]
    benign = sorted(k for keys in report.benign.values() for k in keys)
    ignored = sorted(set(dropped_ema) | set(unexpected))
    lines = [f"Fine-tuning from {path}:",
             f"  loaded  {len(loaded)} tensors ({group_counts(loaded)})",
             f"  EMA     {how}",
             f"  ignored {len(ignored)} checkpoint entries ({group_counts(ignored)})"
             + (f", e.g. {', '.join(ignored[:3])}" if ignored else ""),
             "  optimizer, LR scheduler, step and epoch start fresh"]
    if benign:
        lines.insert(3, f"  benign  {len(benign)} known-benign differences skipped: {', '.join(benign[:3])}")
    rank_zero_info("\n".join(lines))
    return {"loaded": loaded, "ignored": ignored, "benign": benign, "ema": how}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """main.py's options; --scale_lr's default becomes None ("not given"), resolved by `apply`."""
    parser.add_argument("--finetune_from", type=str, default=None, metavar="CKPT",
                        help="start from the weights of this checkpoint (.ckpt / .safetensors): fresh optimizer, "
                             "scheduler and step, base_learning_rate used as is (see ldm/training/finetune.py)")
    parser.add_argument("--finetune_ema", choices=EMA_CHOICES, default="reset",
                        help="with --finetune_from: start the EMA at the loaded weights (reset) or take the file's (load)")
    parser.set_defaults(scale_lr=None)


RECORD = "finetune.yaml"   # in <logdir>/ (not configs/, whose YAMLs -r merges): how the run started


def resumed_logdir(resume: str) -> Path:
    """The log folder of a -r argument (the folder itself, or a checkpoint inside its checkpoints/)."""
    r = Path(resume)
    if r.is_file():
        r = r.parent.parent if r.parent.name == "checkpoints" else r.parent
    return r


def apply(model: torch.nn.Module, opt: argparse.Namespace, logdir: Optional[str] = None) -> Optional[dict[str, Any]]:
    """main.py's hook, right after the model is built: with --finetune_from (and not resuming)
    load the weights and record the run's settings in <logdir>/finetune.yaml. Resolves
    --scale_lr when not given: off when fine-tuning (also when resuming a fine-tuning run), on
    otherwise (the original's rule)."""
    from omegaconf import OmegaConf
    path = getattr(opt, "finetune_from", None)
    record = resumed_logdir(opt.resume) / RECORD if opt.resume else None
    resumed = OmegaConf.load(record) if record is not None and record.is_file() else None
    if getattr(opt, "scale_lr", True) is None:
        if resumed is not None:
            opt.scale_lr = bool(resumed.scale_lr)
        else:
            opt.scale_lr = not (path and not opt.resume)
            if not opt.scale_lr:
                rank_zero_info("Fine-tuning: base_learning_rate is the learning rate (pass --scale_lr true to "
                               "scale it by batch size x devices x accumulation)")
    if not path:
        return None
    if opt.resume:
        rank_zero_info(f"--finetune_from {path} ignored: -r restores the run's own checkpoint")
        return None
    if not Path(path).is_file():
        from ldm.checkpoint import CheckpointNotFoundError
        raise CheckpointNotFoundError(f"--finetune_from: checkpoint not found: '{path}'")
    summary = init_from_checkpoint(model, path, getattr(opt, "finetune_ema", "reset"))
    if logdir is not None:
        os.makedirs(logdir, exist_ok=True)
        OmegaConf.save({"finetune_from": str(path), "finetune_ema": getattr(opt, "finetune_ema", "reset"),
                        "scale_lr": bool(opt.scale_lr)}, os.path.join(logdir, RECORD))
    return summary
