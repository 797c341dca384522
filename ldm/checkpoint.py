"""The one checkpoint boundary: read weight files, load them strictly, save them safely.

- `load_state_dict_file(path)`: a flat state dict from a `.safetensors` file or a (Lightning)
  `.ckpt` / `.pt` / `.pth`, read with `torch.load(weights_only=True)`; a file that pickles
  other objects is refused with a clear message unless `unsafe_pickle=True` (trusted files only).
- `load_into(model, state_dict)`: strict loading with a readable report (missing / unexpected
  keys grouped by prefix, shape mismatches naming both shapes). Before the comparison, the
  small table `RELEASED_LAYOUTS` renames keys of the layouts released files really have
  (one log line with counts); only the small table `BENIGN_KEYS` of known, harmless
  differences is dropped, with an info log. `adapt_released_layout` does both for callers
  that load by other means (Lightning's resume, `on_load_checkpoint`).
- `load_model_from_config(config, ckpt)`: instantiate + load (+ EMA weights, dtype, device).
- `save_safetensors(model_or_state_dict, path)`.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)
Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

EMA_ATTR = "model_ema"     # LitEma of LatentDiffusion / DDPM ...
EMA_TARGET = "model"       # ... tracking the DiffusionWrapper `model`


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not match the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """The file pickles objects other than tensors; loading it would run code from the file."""


@dataclass(frozen=True)
class Benign:
    """A known, harmless key difference between released checkpoints and our models."""
    pattern: str     # regex searched in the key
    side: str        # "unexpected" (in the file only), "missing" (in the model only) or "both"
    reason: str
    # only when the model has no key starting like the matched part (e.g. no `model_ema.*` at
    # all): a model that has such keys must match them exactly
    model_lacks_group: bool = True

    def matches(self, key: str, side: str, model_keys: Iterable[str]) -> bool:
        m = re.search(self.pattern, key)
        if self.side not in (side, "both") or m is None:
            return False
        group = key[:m.end()]
        return not self.model_lacks_group or not any(k.startswith(group) for k in model_keys)


@dataclass(frozen=True)
class Rename:
    """A key layout that released files have and our model names differently."""
    pattern: str     # regex searched in a checkpoint key the model does not have
    repl: str        # re.sub replacement; applied only when the result is a key the model has
    layout: str      # which files carry it, and why

    def apply(self, key: str) -> Optional[str]:
        new = re.sub(self.pattern, self.repl, key, count=1)
        return new if new != key else None


# Released layouts, renamed onto the model's keys before strict loading. Each rule fires only for
# a checkpoint key the model lacks whose renamed form the model has, so the table cannot rename
# a correct key away. (SD v2's OpenCLIP text tower and the LDM zoo's BERT/x-transformer and VQ
# keys are stored exactly as our models name them: tests/fixtures/released_key_layouts.json.)
RELEASED_LAYOUTS: tuple[Rename, ...] = (
    Rename(r"(^|\.)transformer\.text_model\.", r"\1transformer.",
           "CLIP text encoder saved with transformers < 5 (the SD v1 releases): `transformer.text_model.*`"),
    Rename(r"(^|\.)transformer\.(?!text_model\.)", r"\1transformer.text_model.",
           "CLIP text encoder saved with transformers >= 5 into a model built with transformers < 5"),
)


def rename_released_layout(own_keys: Iterable[str], sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """`sd` with `RELEASED_LAYOUTS` applied onto `own_keys`, and how many keys each layout renamed."""
    own = set(own_keys)
    out: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for k, v in sd.items():
        if k not in own:
            for rule in RELEASED_LAYOUTS:
                new = rule.apply(k)
                if new is not None and new in own and new not in sd:
                    counts[rule.layout] = counts.get(rule.layout, 0) + 1
                    k = new
                    break
        out[k] = v
    return out, counts


BENIGN_KEYS: tuple[Benign, ...] = (
    Benign(r"(^|\.)transformer\.(text_model\.)?embeddings\.position_ids$", "both",
           "CLIP position_ids: a persistent buffer in transformers <= 4.30, non-persistent since",
           model_lacks_group=False),
    Benign(r"^model_ema\.(decay|num_updates)$", "unexpected",
           "EMA counters stored by SD v1 checkpoints; the config has use_ema: False"),
    Benign(r"^model_ema\.", "unexpected",
           "EMA shadow weights; the model has no model_ema (use_ema: False); use_ema=True loads them "
           "in place of the model's weights"),
    Benign(r"^(first_stage_model\.)?loss\.", "unexpected",
           "training loss of a first-stage checkpoint; the config uses lossconfig torch.nn.Identity"),
    Benign(r"^logvar$", "unexpected", "learned logvar of a learn_logvar run, loaded without it"),
)


# ----------------------------------------------------------------------------------------
# Reading and writing files
# ----------------------------------------------------------------------------------------
def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint not found: '{path}'. Download the weights and put them at exactly this path "
            f"(see the README's model table), or point the config / --ckpt argument to where they are.")


# Globals that released Lightning checkpoints pickle beside the weights (callback state, numpy
# scalars of `best_model_score`); allowing them runs no code stored in the file.
BENIGN_PICKLE_GLOBALS: tuple[str, ...] = (
    "pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.dtypes.",
)


def _benign_globals(path: Path) -> Optional[list[Any]]:
    """The objects for the non-tensor globals a checkpoint needs, if every one is known-benign."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    if not names or not all(n.startswith(BENIGN_PICKLE_GLOBALS) for n in names):
        return None
    objs = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            objs.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return None
    if any(n.startswith("numpy.") for n in names):
        # numpy dtypes are rebuilt through their concrete classes (Float64DType, ...)
        import numpy as np
        objs += [c for c in vars(np.dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return objs


def read_checkpoint(path: PathLike, *, unsafe_pickle: bool = False) -> Any:
    """The object stored in a .ckpt/.pt/.pth (weights_only unless `unsafe_pickle`) or .safetensors file.
    A truncated or corrupt file raises a CheckpointError naming it, its size and what is wrong."""
    path = Path(path)
    _check_exists(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if path.suffix != ".safetensors" and not head.startswith((b"PK\x03\x04", b"\x80")):
            raise ValueError(f"starts with {head!r}, neither a torch zip archive nor a legacy pickle")
        return _read_checkpoint(path, unsafe_pickle=unsafe_pickle)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch / zipfile / safetensors errors for a damaged file
        raise CorruptCheckpointError(path, e) from e


class CorruptCheckpointError(CheckpointError):
    """The file exists but is not a readable checkpoint (truncated, overwritten, wrong format)."""

    def __init__(self, path: Path, error: BaseException):
        size = path.stat().st_size if path.exists() else 0
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (.ckpt/.pt)"
        super().__init__(f"cannot read checkpoint '{path}' ({size} bytes): not a complete {kind} file -- "
                         f"truncated by an interrupted copy or download, or corrupt ({type(error).__name__}: "
                         f"{first}). Copy or download it again.")


def _read_checkpoint(path: Path, *, unsafe_pickle: bool = False) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        benign = _benign_globals(path)
        if benign is not None:
            # Released Lightning checkpoints pickle callback state (ModelCheckpoint, numpy
            # scalars) beside the weights: allow exactly those classes, still weights_only.
            with torch.serialization.safe_globals(benign):
                return torch.load(path, map_location="cpu", weights_only=True)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(e).__name__)
        if not unsafe_pickle:
            raise UnsafeCheckpointError(
                f"'{path}' pickles objects other than tensors, so torch.load(weights_only=True) refuses it "
                f"({first}). If you trust the file, load it with unsafe_pickle=True (this runs code stored "
                f"in the file), and consider converting it once with ldm.checkpoint.save_safetensors.") from e
    log.warning("Loading '%s' with torch.load(weights_only=False) (unsafe_pickle=True)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def load_state_dict_file(path: PathLike, *, unsafe_pickle: bool = False) -> dict[str, Tensor]:
    """A flat {key: tensor} from a weight file; Lightning checkpoints are unwrapped (`state_dict`).
    A diffusers folder is converted to our keys (see `state_dict_from_diffusers_folder`)."""
    if Path(path).is_dir():
        return state_dict_from_diffusers_folder(path)
    obj = read_checkpoint(path, unsafe_pickle=unsafe_pickle)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        if "global_step" in obj:
            log.info("'%s': global step %s", path, obj["global_step"])
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"'{path}': entries that are not tensors: {bad[:5]}")
    return dict(obj)


def save_safetensors(model_or_state_dict: Union[torch.nn.Module, Mapping[str, Tensor]], path: PathLike,
                     metadata: Optional[dict[str, str]] = None) -> None:
    """Write a module's state dict (or a state dict) as .safetensors; shared tensors are copied."""
    from safetensors.torch import save_file
    sd = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
          else model_or_state_dict)
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage()
        # safetensors refuses tensors sharing memory (tied weights, views): give those their own copy
        if v.numel() and (storage.data_ptr() in seen or storage.nbytes() != v.numel() * v.element_size()):
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=metadata)


# ----------------------------------------------------------------------------------------
# Strict loading with a readable report
# ----------------------------------------------------------------------------------------
def describe_keys(keys: Iterable[str], examples: int = 3, depth: int = 2) -> str:
    """Keys grouped by their first `depth` components: 'prefix.* (n keys): a, b, c, ...'."""
    groups: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys):
        parts = k.split(".")
        groups[".".join(parts[:depth]) if len(parts) > depth else k].append(k)
    lines = []
    for prefix, ks in groups.items():
        if len(ks) == 1 and ks[0] == prefix:
            lines.append(f"  {prefix}")
            continue
        shown = ", ".join(k[len(prefix) + 1:] for k in ks[:examples]) + (", ..." if len(ks) > examples else "")
        lines.append(f"  {prefix}.* ({len(ks)} key{'s' if len(ks) > 1 else ''}): {shown}")
    return "\n".join(lines)


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)           # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)        # in the file, not in the model
    benign: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys dropped / tolerated

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing keys (in the model, not in the checkpoint): {len(self.missing)}\n"
                         + describe_keys(self.missing))
        if self.unexpected:
            parts.append(f"unexpected keys (in the checkpoint, not in the model): {len(self.unexpected)}\n"
                         + describe_keys(self.unexpected))
        return "\n".join(parts) or "all keys match"


def _ema_into_model(model: torch.nn.Module, sd: dict[str, Tensor]) -> None:
    """use_ema on a model without LitEma: put the checkpoint's EMA shadow weights (LitEma names:
    the parameter name without dots) in place of the weights of `model.model`."""
    target = getattr(model, EMA_TARGET, None)
    if target is None:
        raise CheckpointError(f"use_ema=True but {type(model).__name__} has no `{EMA_TARGET}` to put EMA weights in")
    absent = []
    for name, _ in target.named_parameters():
        ema_key = f"{EMA_ATTR}.{name.replace('.', '')}"
        if ema_key in sd:
            sd[f"{EMA_TARGET}.{name}"] = sd[ema_key]
        else:
            absent.append(ema_key)
    if absent:
        raise CheckpointError(f"use_ema=True but the checkpoint has no EMA weights for {len(absent)} parameters:\n"
                              + describe_keys(absent))


def _adapt(own: Mapping[str, Tensor], sd: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], LoadReport]:
    """Rename released layouts, drop known-benign keys (both logged); report what still differs."""
    sd, renamed = rename_released_layout(own, sd)
    if renamed:
        log.info("%s: released key layout: renamed %s", source,
                 "; ".join(f"{n} key(s) of {layout}" for layout, n in renamed.items()))
    report = LoadReport()
    for side, keys in (("unexpected", [k for k in sd if k not in own]), ("missing", [k for k in own if k not in sd])):
        for k in keys:
            rule = next((b for b in BENIGN_KEYS if b.matches(k, side, own)), None)
            if rule is not None:
                report.benign.setdefault(rule.reason, []).append(k)
                sd.pop(k, None)
            else:
                getattr(report, side).append(k)
    for reason, keys in report.benign.items():
        log.info("%s: ignoring %d known-benign key(s) (%s): %s", source, len(keys), reason,
                 ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else ""))
    return sd, report


def adapt_released_layout(model: torch.nn.Module, state_dict: Mapping[str, Tensor],
                          source: str = "checkpoint") -> dict[str, Tensor]:
    """`state_dict` in `model`'s key layout: released layouts renamed, known-benign keys dropped.
    What still differs is left for the caller's strict `load_state_dict` to refuse (used by the
    Lightning modules' `on_load_checkpoint`, i.e. `main.py --resume`)."""
    return _adapt(model.state_dict(), dict(state_dict), source)[0]


def load_into(model: torch.nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True,
              use_ema: bool = False, source: str = "checkpoint") -> LoadReport:
    """Load `state_dict` into `model`: every key must match except `BENIGN_KEYS` (logged).

    strict=False loads what matches and logs the report instead of raising. Shape mismatches
    always raise, naming the key and both shapes. use_ema: afterwards, the EMA weights replace
    the weights of `model.model` (LitEma.copy_to, or the checkpoint's `model_ema.*` entries
    when the model was built without EMA).
    """
    sd = dict(state_dict)
    has_ema = getattr(model, EMA_ATTR, None) is not None
    if use_ema and not has_ema:
        _ema_into_model(model, sd)
    own = model.state_dict()
    sd, report = _adapt(own, sd, source)
    mismatched = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise CheckpointError(f"{source}: {len(mismatched)} shape mismatch(es) for {type(model).__name__}:\n"
                              + "\n".join(mismatched))
    if not report.ok:
        msg = f"{source} does not match {type(model).__name__}:\n{report}"
        if strict:
            raise CheckpointError(msg)
        log.warning(msg)
    model.load_state_dict(sd, strict=False)
    if use_ema and has_ema:
        getattr(model, EMA_ATTR).copy_to(getattr(model, EMA_TARGET))
        log.info("%s: EMA weights copied into `%s`", source, EMA_TARGET)
    return report


def load_model_from_config(config: Any, ckpt: Optional[PathLike], *, strict: bool = True, use_ema: bool = False,
                           device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                           unsafe_pickle: bool = False) -> torch.nn.Module:
    """Instantiate `config` (a YAML path, or a mapping with `model` or `target`), load `ckpt`
    strictly (None: keep the initialisation), optionally swap in EMA weights and cast to
    `dtype` (fp16 weights in the file are cast to the model's dtype on load), move to
    `device`, and put in eval mode."""
    from omegaconf import OmegaConf
    if isinstance(config, (str, os.PathLike)):
        config = OmegaConf.load(config)
    cfg = config["model"] if isinstance(config, Mapping) and "model" in config else config
    model = instantiate_from_config(cfg)
    if ckpt is not None:
        load_into(model, load_state_dict_file(ckpt, unsafe_pickle=unsafe_pickle), strict=strict, use_ema=use_ema,
                  source=f"'{ckpt}'")
    elif use_ema:
        raise CheckpointError("use_ema=True needs a checkpoint")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------
# Checkpoint formats: a diffusers folder wherever a .ckpt / .safetensors is accepted
# ----------------------------------------------------------------------------------------
def is_diffusers_folder(path: PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "config.json").is_file())


def state_dict_from_diffusers_folder(path: PathLike) -> dict[str, Tensor]:
    """Our state dict for a diffusers folder (ldm.interop); `load_into` then checks it against
    the config's model as for any checkpoint (the EMA shadows of a use_ema config are absent)."""
    if not is_diffusers_folder(path):
        raise CheckpointError(f"'{path}' is a directory but not a diffusers folder (no model_index.json / "
                              f"config.json); give a .ckpt / .safetensors file or a diffusers folder")
    from ldm.interop import InteropError, import_diffusers
    try:
        return import_diffusers(path)[1]
    except InteropError as e:
        raise CheckpointError(f"'{path}': {e}") from e
