"""Offline construction of the pretrained encoders (CLIP via transformers, OpenCLIP via open_clip).

Nothing is ever downloaded. Weights come from a local directory / file or an already
populated Hugging Face cache (`local_files_only=True`); when they are missing,
`HubWeightsMissing` says what to provide. Only the architecture, with random weights,
is built instead when
  * building on the meta device (`with torch.device("meta"):`, how the key tests and fast
    checkpoint loaders build a model), or
  * `pretrained=False` is passed, or the environment sets `LDM_RANDOM_HUB_WEIGHTS=1`
    (e.g. when a full LDM checkpoint that contains `cond_stage_model.*` is loaded next).
Tokenizers hold no weights; the encoders create them lazily at the first encode.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ldm import settings

RANDOM_WEIGHTS_ENV = settings.RANDOM_HUB_WEIGHTS_ENV
Text = Union[str, list[str]]


class HubWeightsMissing(FileNotFoundError):
    """Pretrained weights (or tokenizer files) of a hub model are not available locally."""


def use_pretrained(pretrained: bool) -> bool:
    """Load pretrained weights? Not on the meta device, not when random weights were asked for."""
    if torch.get_default_device().type == "meta":
        return False
    return pretrained and not settings.current().random_hub_weights


def missing(what: str, where: str, weights: bool = True) -> HubWeightsMissing:
    msg = f"{what} not found locally: {where}. Nothing is downloaded at run time."
    if weights:
        msg += (f" To build with random weights instead (e.g. when a full checkpoint holding them is loaded "
                f"next), pass `pretrained: false` or set {RANDOM_WEIGHTS_ENV}=1.")
    return HubWeightsMissing(msg)


def local_tokenizer(cls: Any, version: str, min_vocab: int) -> Any:
    """`cls.from_pretrained(version)` from local files only; None when the files are missing
    (transformers 5 then returns an empty tokenizer instead of raising)."""
    try:
        tok = cls.from_pretrained(version, local_files_only=True)
    except OSError:
        return None
    return tok if len(tok) >= min_vocab else None


def param_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------
# CLIP text model (transformers)
# ----------------------------------------------------------------------------------------
# openai/clip-vit-large-patch14 text tower, for building it without its config file.
CLIP_VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2)
CLIP_SOT, CLIP_EOT = 49406, 49407


def clip_text_model(version: str, pretrained: bool) -> nn.Module:
    """transformers CLIPTextModel: pretrained from `version` (local dir / cache), or random."""
    from transformers import CLIPTextConfig, CLIPTextModel
    if use_pretrained(pretrained):
        try:
            return CLIPTextModel.from_pretrained(version, local_files_only=True)
        except OSError as e:
            raise missing(f"CLIP text weights '{version}'",
                          "pass `version:` a local directory with config.json + model weights, or populate "
                          "the Hugging Face cache (HF_HOME) with openai/clip-vit-large-patch14") from e
    try:
        config = CLIPTextConfig.from_pretrained(version, local_files_only=True)
    except OSError:
        if version != "openai/clip-vit-large-patch14":
            raise missing(f"CLIP config for '{version}'", "only ViT-L/14's text config is known offline")
        config = CLIPTextConfig(**CLIP_VIT_L14_TEXT)
    return CLIPTextModel(config)


class BundledClipTokenizer:
    """OpenAI CLIP BPE from open_clip's bundled vocabulary, padded like the Hugging Face
    CLIPTokenizer of openai/clip-vit-large-patch14 (SOT, ids, EOT, then EOT padding)."""

    def __init__(self, max_length: int):
        from open_clip.tokenizer import SimpleTokenizer
        self.bpe = SimpleTokenizer()
        self.max_length = max_length

    def __call__(self, text: Text) -> torch.Tensor:
        texts = [text] if isinstance(text, str) else list(text)
        out = torch.full((len(texts), self.max_length), CLIP_EOT, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [CLIP_SOT] + self.bpe.encode(t)[: self.max_length - 2] + [CLIP_EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def clip_tokenizer(version: str, max_length: int) -> Any:
    """text -> (B, max_length) ids: the local HF CLIPTokenizer, else open_clip's bundled BPE."""
    from transformers import CLIPTokenizer
    hf = local_tokenizer(CLIPTokenizer, version, min_vocab=49408)
    if hf is None:
        return BundledClipTokenizer(max_length)
    return lambda t: hf(t, truncation=True, max_length=max_length, return_length=True,
                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]


def adapt_clip_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: released SD v1 checkpoints hold `transformer.text_model.*`
    (transformers < 5) and `...embeddings.position_ids` (< 4.31); map them onto the keys of
    the installed CLIPTextModel (and back), with ldm.checkpoint's one table of released layouts,
    for code that calls `load_state_dict` directly instead of ldm.checkpoint."""
    from ldm.checkpoint import rename_released_layout
    own = {prefix + k for k in module.state_dict()}
    head = prefix + "transformer."
    ours = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    for key, value in rename_released_layout(own, ours)[0].items():
        if key not in own and key.endswith("embeddings.position_ids"):
            continue   # a buffer that newer transformers no longer store
        state_dict[key] = value


# ----------------------------------------------------------------------------------------
# OpenCLIP (open_clip)
# ----------------------------------------------------------------------------------------
def causal_mask(n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """open_clip's additive text mask: -inf above the diagonal."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


def openclip_checkpoint(arch: str, version: str) -> str:
    """Local path of the OpenCLIP weights: `version` itself, or the tag's file in the HF cache."""
    import open_clip
    if os.path.isfile(version):
        return version
    hub = open_clip.pretrained.get_pretrained_cfg(arch, version).get("hf_hub", "")   # "org/repo/[file]"
    repo, fname = os.path.split(hub) if hub.count("/") >= 2 else (hub, "")
    if repo:
        from huggingface_hub import try_to_load_from_cache
        for name in [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            path = try_to_load_from_cache(repo, name)
            if isinstance(path, str):
                return path
    where = f"the Hugging Face cache entry {repo}" if repo else "(no known hub location for this tag)"
    raise missing(f"OpenCLIP weights {arch}/{version}",
                  f"pass `version:` the path of the checkpoint file (open_clip_pytorch_model.bin or "
                  f".safetensors), or populate {where}")


def openclip_model(arch: str, version: str, pretrained: bool, keep: str) -> nn.Module:
    """open_clip's CLIP for `arch` with one tower deleted, as SD v2 does: keep="text" deletes
    `visual` (FrozenOpenCLIPEmbedder), keep="visual" deletes `transformer` (the image
    embedder). Keys are those `open_clip.create_model` builds, minus the deleted tower."""
    import open_clip
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown OpenCLIP architecture '{arch}'")
    load = use_pretrained(pretrained)
    path = openclip_checkpoint(arch, version) if load else None
    # the tower that is deleted at once is built as a one-block placeholder
    vision_cfg, text_cfg = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    if keep == "text":
        vision_cfg = dict(image_size=14, patch_size=14, layers=1, width=64, head_width=64)
    else:
        text_cfg["layers"] = 1
    with torch.device("meta") if load else torch.device(torch.get_default_device()):
        model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg,
                                     quick_gelu=cfg.get("quick_gelu", False))
    dropped = "visual" if keep == "text" else "transformer"
    delattr(model, dropped)
    if load:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith(dropped + ".") and k != "attn_mask"}
        model.load_state_dict(sd, strict=True, assign=True)
        model.attn_mask = causal_mask(model.context_length)      # non-persistent: not in the file
    return model
