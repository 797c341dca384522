"""Text encoders and tokenizers for diffusers folders.

`FrozenCLIPEmbedder` holds a transformers `CLIPTextModel` already: it is saved as is, and its
tokenizer as Hugging Face `CLIPTokenizer` files -- the local tokenizer when there is one, else
vocab.json / merges.txt written from open_clip's bundled OpenAI BPE (the same tokens that
`BundledClipTokenizer` produces, padded with <|endoftext|> like openai/clip-vit-large-patch14).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

from ldm.interop.keymap import InteropError

TEXT_PREFIX = "transformer."


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_bpe_tokenizer(out_dir: Path, max_length: int = 77) -> None:
    """CLIPTokenizer files (vocab.json, merges.txt, configs) from open_clip's bundled BPE."""
    import open_clip.tokenizer as oct
    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False}))


def save_text_encoder(cond: torch.nn.Module, state_dict: dict[str, torch.Tensor], root: Path,
                      dtype: torch.dtype | None = None) -> None:
    """text_encoder/ and tokenizer/ for a FrozenCLIPEmbedder; its weights from `state_dict`
    (keys relative to the embedder, i.e. `transformer.text_model.*`)."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    if not isinstance(cond, FrozenCLIPEmbedder):
        raise InteropError(f"text encoder {type(cond).__name__}: only FrozenCLIPEmbedder (transformers CLIP) is "
                           "exported; OpenCLIP (SD v2) text towers need a CLIPTextModel conversion that is not "
                           "implemented yet")
    if cond.layer != "last":
        raise InteropError(f"FrozenCLIPEmbedder layer={cond.layer!r}: diffusers' StableDiffusionPipeline uses the "
                           "last hidden state (its clip_skip differs)")
    from transformers import CLIPTextModel
    text = CLIPTextModel(cond.transformer.config)
    sd = {k[len(TEXT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TEXT_PREFIX)}
    missing, unexpected = text.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InteropError(f"text encoder weights do not match CLIPTextModel: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if dtype is not None:
        text = text.to(dtype)
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    _save_tokenizer(cond, root / "tokenizer")


def _save_tokenizer(cond: Any, out: Path) -> None:
    from transformers import CLIPTokenizer

    from ldm.modules.encoders.hub import local_tokenizer
    hf = local_tokenizer(CLIPTokenizer, cond.version, min_vocab=49408)
    if hf is not None:
        hf.save_pretrained(out)
    else:
        write_clip_bpe_tokenizer(out, cond.max_length)


def text_encoder_config_dir(root: Path, out_dir: Path) -> Path:
    """Copy text_encoder/config.json and the tokenizer files of a diffusers folder into one
    directory that FrozenCLIPEmbedder(version=...) reads offline."""
    import shutil
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "text_encoder" / "config.json", out_dir / "config.json")
    tok = root / "tokenizer"
    if tok.is_dir():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    return out_dir


def load_text_encoder_weights(root: Path) -> dict[str, torch.Tensor]:
    """text_encoder weights under our FrozenCLIPEmbedder's keys (`transformer.*`)."""
    from safetensors.torch import load_file
    files = sorted((root / "text_encoder").glob("*.safetensors"))
    if not files:
        raise InteropError(f"no text_encoder/*.safetensors in '{root}'")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return {TEXT_PREFIX + k: v for k, v in sd.items() if not k.endswith("position_ids")}
