"""LoRA adapters (Hu et al. 2021) on the UNet (and optionally the CLIP text encoder), through `peft`.

A LoRA layer adds (alpha / rank) * B A x to a frozen linear / 1x1-conv layer W x, with A (rank, in)
and B (out, rank), B initialised to 0 (training starts from the base model).

YAML: `model.params.lora_config: {rank, alpha, target_modules, dropout, text_encoder}` makes a
LatentDiffusion train the adapters only (`add_lora`); `lora.safetensors` is written beside the
checkpoints. `scripts/txt2img.py --lora file.safetensors --lora-scale 0.8` loads one for sampling.

File format (what diffusers' `StableDiffusionPipeline.load_lora_weights` and kohya-style loaders
read for an SD v1/v2 UNet):
  - "diffusers" (default), the diffusers-PEFT layout: `unet.<diffusers module path>.lora_A.weight`,
    `...lora_B.weight` (text encoder: `text_encoder.text_model.encoder.layers.N.self_attn.q_proj...`).
    That layout carries no alpha: its loaders take W + B A (alpha = rank), so the scale alpha/rank
    is folded into B on save.
  - "kohya": `lora_unet_<diffusers path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
    (`lora_te_...` for the text encoder); the scale is alpha / rank.
Both are read back by `load_lora`. The diffusers module paths (down_blocks / mid_block /
up_blocks) come from our UNet's own structure (`unet_module_paths`), the same mapping an SD UNet
checkpoint converter uses.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")            # SD attention projections
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")   # CLIP text attention
ADAPTER = "default"
FORMATS = ("diffusers", "kohya")


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    rank: int = 4                                   # r: inner dimension of B A
    alpha: Optional[float] = None                   # scale alpha / rank (None: alpha = rank, scale 1)
    target_modules: Sequence[str] = UNET_TARGETS    # UNet module names (suffixes) that get adapters
    dropout: float = 0.0                            # dropout on the adapter's input during training
    text_encoder: bool = False                      # adapters on the CLIP text encoder too
    text_encoder_target_modules: Sequence[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))

    @classmethod
    def from_spec(cls, spec: Union["LoRAConfig", Mapping[str, Any]]) -> "LoRAConfig":
        if isinstance(spec, LoRAConfig):
            return spec
        if not isinstance(spec, Mapping):
            raise TypeError(f"lora_config must be a mapping {{rank, alpha, target_modules, dropout}}, got {spec!r}")
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"lora_config: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
        cfg = cls(**{k: (list(v) if k.endswith("target_modules") else v) for k, v in spec.items()})
        if int(cfg.rank) < 1:
            raise ValueError(f"lora_config.rank must be >= 1, got {cfg.rank}")
        return cfg

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


# ----------------------------------------------------------------------------------------
# Applying, merging, scaling
# ----------------------------------------------------------------------------------------
def _lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def inject_lora(module: nn.Module, target_modules: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
                rank_pattern: Optional[dict[str, int]] = None, alpha_pattern: Optional[dict[str, float]] = None,
                adapter_name: str = ADAPTER) -> list[str]:
    """Wrap the matching layers of `module` (name == target or ends with '.target') in LoRA
    layers; every other parameter of `module` is frozen. Returns the wrapped module names."""
    from peft import LoraConfig, inject_adapter_in_model
    if adapter_name in {a for m in _lora_layers(module).values() for a in m.lora_A}:
        raise ValueError(f"{type(module).__name__} already has a LoRA adapter named {adapter_name!r}")
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(target_modules),
                     lora_dropout=float(dropout), rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    try:
        inject_adapter_in_model(cfg, module, adapter_name=adapter_name)
    except ValueError as e:     # peft: "Target modules ... not found in the base model"
        raise ValueError(f"LoRA: none of target_modules {list(target_modules)} is a layer of "
                         f"{type(module).__name__}: {e}") from None
    return sorted(_lora_layers(module))


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def merge_lora(module: nn.Module) -> None:
    """Fold the adapters into the base weights (W += scale B A): sampling at the base model's speed."""
    for m in _lora_layers(module).values():
        if not m.merged:
            m.merge()


def unmerge_lora(module: nn.Module) -> None:
    """Undo `merge_lora` (W -= scale B A)."""
    for m in _lora_layers(module).values():
        if m.merged:
            m.unmerge()


def set_lora_scale(module: nn.Module, scale: float, adapter_name: str = ADAPTER) -> None:
    """Scale the adapters' contribution: scale * alpha / rank (0: the base model). Unmerged only."""
    for name, m in _lora_layers(module).items():
        if m.merged:
            raise RuntimeError(f"set_lora_scale: {name} is merged; unmerge_lora first")
        if adapter_name in m.lora_A:
            m.set_scale(adapter_name, scale)


# ----------------------------------------------------------------------------------------
# Our UNet's module paths -> diffusers' UNet2DConditionModel paths
# ----------------------------------------------------------------------------------------
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _unet_block_prefixes(unet: nn.Module) -> dict[str, tuple[str, str]]:
    """our block prefix -> (diffusers prefix, kind), kind in resnet/attention/downsample/upsample."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    def kind(m: nn.Module) -> str:
        for cls, k in ((ResBlock, "resnet"), (SpatialTransformer, "attention"), (Downsample, "downsample"),
                       (Upsample, "upsample")):
            if isinstance(m, cls):
                if k == "resnet" and getattr(m, "updown", False):
                    raise NotImplementedError("LoRA key mapping: resblock_updown UNets have no diffusers layout")
                return k
        raise NotImplementedError(f"LoRA key mapping: no diffusers name for a {type(m).__name__} block")

    out: dict[str, tuple[str, str]] = {}
    level, k = 0, 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if kind(block[0]) == "downsample":
            out[f"input_blocks.{i}.0"] = (f"down_blocks.{level}.downsamplers.0", "downsample")
            level, k = level + 1, 0
            continue
        for j, sub in enumerate(block):
            plural = {"resnet": "resnets", "attention": "attentions"}[kind(sub)]
            out[f"input_blocks.{i}.{j}"] = (f"down_blocks.{level}.{plural}.{k}", kind(sub))
        k += 1
    n_res = 0
    for j, sub in enumerate(unet.middle_block):
        if kind(sub) == "resnet":
            out[f"middle_block.{j}"] = (f"mid_block.resnets.{n_res}", "resnet")
            n_res += 1
        else:
            out[f"middle_block.{j}"] = ("mid_block.attentions.0", "attention")
    level, k = 0, 0
    for i, block in enumerate(unet.output_blocks):
        upsampled = False
        for j, sub in enumerate(block):
            kd = kind(sub)
            if kd == "upsample":
                out[f"output_blocks.{i}.{j}"] = (f"up_blocks.{level}.upsamplers.0", kd)
                upsampled = True
            else:
                out[f"output_blocks.{i}.{j}"] = (f"up_blocks.{level}.{'resnets' if kd == 'resnet' else 'attentions'}.{k}", kd)
        level, k = (level + 1, 0) if upsampled else (level, k + 1)
    return out


def unet_module_paths(unet: nn.Module) -> dict[str, str]:
    """Every module with parameters of our (SD-shaped) UNetModel -> its path in diffusers'
    UNet2DConditionModel (the names `convert_ldm_unet_checkpoint` produces)."""
    blocks = _unet_block_prefixes(unet)
    out = {}
    for name, m in unet.named_modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        name = re.sub(r"\.base_layer$", "", name)      # a LoRA-wrapped layer keeps its base's name
        if ".lora_" in name:
            continue
        out[name] = _diffusers_path(name, blocks)
    return out


def _diffusers_path(name: str, blocks: dict[str, tuple[str, str]]) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    prefix = ".".join(parts[:3])
    if prefix not in blocks:
        prefix = ".".join(parts[:2])           # middle_block.N
    if prefix not in blocks:
        raise NotImplementedError(f"LoRA key mapping: no diffusers name for UNet module {name!r}")
    new, kind = blocks[prefix]
    rest = name[len(prefix) + 1:]
    if kind == "resnet":
        rest = _RESBLOCK.get(rest, rest)
    elif kind in ("downsample", "upsample"):
        rest = "conv"                           # Downsample.op / Upsample.conv
    return f"{new}.{rest}" if rest else new


def convert_unet_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Our UNet's state dict under diffusers' UNet2DConditionModel names (weights shared)."""
    paths = unet_module_paths(unet)
    out = {}
    for key, v in unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        module = re.sub(r"\.base_layer$", "", module)
        if ".lora_" in module:
            continue
        out[f"{paths[module]}.{leaf}"] = v
    return out


# ----------------------------------------------------------------------------------------
# The adapters of a LatentDiffusion model
# ----------------------------------------------------------------------------------------
def _unet_of(model: nn.Module) -> nn.Module:
    """The UNetModel of a LatentDiffusion/DDPM (model.model.diffusion_model), or `model` itself."""
    inner = getattr(model, "model", None)
    return getattr(inner, "diffusion_model", model) if inner is not None else model


def _text_encoder_of(model: nn.Module, required: bool = True) -> Optional[nn.Module]:
    """The transformers CLIPTextModel of a FrozenCLIPEmbedder cond stage (SD v1), or None."""
    te = getattr(getattr(model, "cond_stage_model", None), "transformer", None)
    if te is None or type(te).__name__ != "CLIPTextModel":
        if required:
            raise NotImplementedError("LoRA on the text encoder needs a transformers CLIPTextModel "
                                      "(FrozenCLIPEmbedder, SD v1); this model's cond stage is "
                                      f"{type(getattr(model, 'cond_stage_model', None)).__name__}")
        return None
    return te


def text_encoder_module_paths(te: nn.Module) -> dict[str, str]:
    """CLIPTextModel module names -> the names LoRA files use (`text_model.encoder.layers.N...`,
    the transformers < 5 layout; transformers 5 dropped the `text_model` level)."""
    nested = hasattr(te, "text_model")
    out = {}
    for name, m in te.named_modules():
        name = re.sub(r"\.base_layer$", "", name)        # a LoRA-wrapped layer keeps its base's name
        if isinstance(m, nn.Linear) and ".lora_" not in name:
            out[name] = name if nested else f"text_model.{name}"
    return out


def add_lora(model: nn.Module, lora_config: Union[LoRAConfig, Mapping[str, Any]]) -> LoRAConfig:
    """Freeze `model` (a LatentDiffusion) and add trainable adapters to its UNet (and text encoder).

    Call after the base checkpoint is loaded. With `use_ema`, the EMA is rebuilt over the
    adapters (the only trainable parameters). Returns the parsed config."""
    cfg = LoRAConfig.from_spec(lora_config)
    for p in model.parameters():
        p.requires_grad_(False)
    names = inject_lora(_unet_of(model), cfg.target_modules, cfg.rank, cfg.lora_alpha, cfg.dropout)
    if cfg.text_encoder:
        names += inject_lora(_text_encoder_of(model), cfg.text_encoder_target_modules, cfg.rank, cfg.lora_alpha,
                             cfg.dropout)
        if not getattr(model, "cond_stage_trainable", True):
            log.info("LoRA on the text encoder: encoding the conditioning inside the training step "
                     "(cond_stage_trainable = True)")
            model.cond_stage_trainable = True
    if getattr(model, "use_ema", False):
        from ldm.modules.ema import LitEma
        old = model.model_ema
        model.model_ema = LitEma(model.model, decay=float(old.decay), use_num_upates=int(old.num_updates) >= 0)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d layers, %d trainable parameters (rank %d, alpha %g)", len(names), n, cfg.rank, cfg.lora_alpha)
    return cfg


def lora_state_dict(model: nn.Module, format: str = "diffusers",
                    adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapters of the UNet (and text encoder) under the file's key names (see the module notes)."""
    if format not in FORMATS:
        raise ValueError(f"LoRA format must be one of {FORMATS}, got {format!r}")
    out: dict[str, torch.Tensor] = {}
    unet = _unet_of(model)
    parts = [("unet", unet, unet_module_paths(unet))]
    te = _text_encoder_of(model, required=False) if unet is not model else None
    if te is not None and _lora_layers(te):
        parts.append(("text_encoder", te, text_encoder_module_paths(te)))
    for prefix, module, paths in parts:
        for name, m in _lora_layers(module).items():
            if adapter_name not in m.lora_A:
                continue
            path = paths[name]
            a = m.lora_A[adapter_name].weight.detach()
            b = m.lora_B[adapter_name].weight.detach()
            scale = m.lora_alpha[adapter_name] / m.r[adapter_name]
            if format == "diffusers":
                out[f"{prefix}.{path}.lora_A.weight"] = a.contiguous()
                out[f"{prefix}.{path}.lora_B.weight"] = (b * scale).contiguous()
            else:
                key = ("lora_unet_" if prefix == "unet" else "lora_te_") + path.replace(".", "_")
                out[f"{key}.lora_down.weight"] = a.contiguous()
                out[f"{key}.lora_up.weight"] = b.contiguous()
                out[f"{key}.alpha"] = torch.tensor(float(m.lora_alpha[adapter_name]))
    if not out:
        raise ValueError("the model has no LoRA adapters to save")
    return out


def save_lora(model: nn.Module, path: str, format: str = "diffusers", config: Optional[LoRAConfig] = None) -> None:
    """Write the adapters to `path` (safetensors), atomically; refuses non-finite weights."""
    from safetensors.torch import save_file
    sd = {k: v.cpu() for k, v in lora_state_dict(model, format).items()}
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"LoRA weights are not finite ({bad[:3]}...); not writing {path}")
    meta = {"format": f"ldm-lora/{format}"}
    if config is not None:
        meta["lora_config"] = json.dumps({**asdict(config), "target_modules": list(config.target_modules),
                                          "text_encoder_target_modules": list(config.text_encoder_target_modules)})
    tmp = f"{path}.tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)


def save_lora_beside_checkpoints(model: Any, config: Optional[LoRAConfig] = None) -> Optional[str]:
    """`lora.safetensors` in the trainer's checkpoint folder (rank zero only), or None."""
    trainer = getattr(model, "_trainer", None)
    if trainer is None or trainer.global_rank != 0:
        return None
    ckpt = trainer.checkpoint_callback
    folder = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "lora.safetensors")
    try:
        save_lora(model, path, config=config)
    except ValueError as e:       # a NaN step must not overwrite the last good adapters
        log.error("%s", e)
        return None
    return path


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
def _read_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"cannot read LoRA file {path} as safetensors: {e}") from None


def _parse(sd: Mapping[str, torch.Tensor], path: str) -> dict[str, dict[str, dict[str, Any]]]:
    """-> {"unet"|"text_encoder": {diffusers path (kohya: with _): {"A", "B", "alpha"}}}"""
    out: dict[str, dict[str, dict[str, Any]]] = {"unet": {}, "text_encoder": {}}
    for key, v in sd.items():
        m = re.fullmatch(r"(unet|text_encoder)\.(.+)\.lora_([AB])\.weight", key)
        if m:
            out[m[1]].setdefault(m[2], {})[m[3]] = v
            continue
        m = re.fullmatch(r"lora_(unet|te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if m:
            part = "unet" if m[1] == "unet" else "text_encoder"
            slot = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[m[3]]
            out[part].setdefault("kohya:" + m[2], {})[slot] = v
            continue
        raise ValueError(f"{path}: unrecognised LoRA key {key!r} (expected diffusers-PEFT "
                         f"'unet.<path>.lora_A.weight' or kohya 'lora_unet_<path>.lora_down.weight')")
    for part in out.values():
        for name, e in part.items():
            if "A" not in e or "B" not in e:
                raise ValueError(f"{path}: LoRA layer {name} lacks its {'lora_A' if 'A' not in e else 'lora_B'} weight")
    return out


def _load_part(module: nn.Module, entries: dict[str, dict[str, Any]], paths: dict[str, str], scale: float,
               path: str, adapter_name: str) -> int:
    inverse = {v: k for k, v in paths.items()}
    inverse.update({"kohya:" + v.replace(".", "_"): k for k, v in paths.items()})
    targets, ranks, alphas = {}, {}, {}
    for name, e in entries.items():
        if name not in inverse:
            raise ValueError(f"{path}: LoRA layer {name.removeprefix('kohya:')!r} is not a layer of this "
                             f"{type(module).__name__}")
        ours = inverse[name]
        r = int(e["A"].shape[0])
        targets[ours] = e
        ranks[ours] = r
        alphas[ours] = float(e["alpha"]) if "alpha" in e else float(r)      # diffusers-PEFT: scale 1
    if not targets:
        return 0
    r0, a0 = next(iter(ranks.values())), next(iter(alphas.values()))
    # per-layer rank / alpha where they differ (peft matches these patterns as '(.*\.)?<pattern>$')
    inject_lora(module, list(targets), rank=r0, alpha=a0,
                rank_pattern={re.escape(k): v for k, v in ranks.items() if v != r0},
                alpha_pattern={re.escape(k): v for k, v in alphas.items() if v != a0}, adapter_name=adapter_name)
    layers = _lora_layers(module)
    with torch.no_grad():
        for ours, e in targets.items():
            layer = layers[ours]
            for slot, w in (("A", layer.lora_A[adapter_name].weight), ("B", layer.lora_B[adapter_name].weight)):
                src = e[slot]
                if src.numel() != w.numel():
                    raise ValueError(f"{path}: LoRA {slot} of {ours} has shape {tuple(src.shape)}, "
                                     f"the layer needs {tuple(w.shape)}")
                w.copy_(src.reshape(w.shape))
            if not math.isclose(layer.r[adapter_name], ranks[ours]):
                raise RuntimeError(f"peft injected rank {layer.r[adapter_name]} for {ours}, expected {ranks[ours]}")
    set_lora_scale(module, scale, adapter_name)
    return len(targets)


def load_lora(model: nn.Module, path: str, scale: float = 1.0, adapter_name: str = ADAPTER) -> int:
    """Add the adapters of a LoRA file (diffusers-PEFT or kohya keys) to `model` (a LatentDiffusion,
    or a bare UNetModel) at `scale` (0: the base model). Returns the number of layers loaded."""
    parts = _parse(_read_file(path), path)
    unet = _unet_of(model)
    n = _load_part(unet, parts["unet"], unet_module_paths(unet), scale, path, adapter_name)
    if parts["text_encoder"]:
        te = _text_encoder_of(model)
        n += _load_part(te, parts["text_encoder"], text_encoder_module_paths(te), scale, path, adapter_name)
    log.info("LoRA: %d layers from %s at scale %g", n, path, scale)
    return n


def apply_lora_for_sampling(model: nn.Module, path: str, scale: float = 1.0, merge: bool = True) -> int:
    """`load_lora` for a sampling script: EMA weights (if the model keeps them) are copied in
    first (the wrapped layers' parameter names no longer match the EMA's), then the adapters
    are loaded at `scale` and, with `merge`, folded into the weights. Returns the layer count."""
    if getattr(model, "use_ema", False) and getattr(model, "model_ema", None) is not None:
        model.model_ema.copy_to(model.model)
        model.use_ema = False
        log.info("LoRA: sampling with the EMA weights of the base model")
    n = load_lora(model, path, scale=scale)
    if merge:
        merge_lora(model)
    return n
