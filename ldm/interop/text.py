"""Text encoders and tokenizers for diffusers folders.

`FrozenOpenCLIPEmbedder` (SD 2) becomes the `CLIPTextModel` diffusers' SD 2 folders hold (q/k/v
split from open_clip's fused in_proj; "penultimate" = one layer less); the weights diffusers
has no place for (the unused last block, text_projection, logit_scale) go to ldm_extra.safetensors.
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


def write_clip_bpe_tokenizer(out_dir: Path, max_length: int = 77, pad_token: str = "<|endoftext|>") -> None:
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
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
         "unk_token": "<|endoftext|>"}))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
         "unk_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False}))


def save_text_encoder(cond: torch.nn.Module, state_dict: dict[str, torch.Tensor], root: Path,
                      dtype: torch.dtype | None = None, arch: str = "ViT-H-14"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """text_encoder/ (a transformers CLIPTextModel) and tokenizer/ for our text encoder, its
    weights from `state_dict` (keys relative to the embedder); `arch`: the OpenCLIP model name of
    the config (FrozenOpenCLIPEmbedder's `arch`). Returns (weights diffusers has no
    place for, under the embedder's keys; our encoder's {target, params} for model_index.json)."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
    from transformers import CLIPTextModel
    if isinstance(cond, FrozenOpenCLIPEmbedder):
        config, sd, extras = openclip_to_clip_text(cond, state_dict, arch)
        tok_pad = "!"          # open_clip pads with id 0 (= "!"), as SD 2's diffusers tokenizer
        ours = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": arch, "layer": cond.layer, "max_length": cond.max_length}}
    elif isinstance(cond, FrozenCLIPEmbedder):
        if cond.layer != "last":
            raise InteropError(f"FrozenCLIPEmbedder layer={cond.layer!r}: diffusers' StableDiffusionPipeline uses "
                               "the last hidden state")
        config, extras, tok_pad = cond.transformer.config, {}, None
        sd = {k[len(TEXT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TEXT_PREFIX)}
        ours = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"max_length": cond.max_length}}
    else:
        raise InteropError(f"text encoder {type(cond).__name__} has no diffusers counterpart (CLIP / OpenCLIP only)")
    text = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in text.state_dict()):   # transformers >= 5 layout
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = text.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InteropError(f"text encoder weights do not match CLIPTextModel: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if dtype is not None:
        text = text.to(dtype)
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    _save_tokenizer(cond, root / "tokenizer", tok_pad)
    return extras, ours


OC = "model."   # FrozenOpenCLIPEmbedder's open_clip model
OC_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_to_clip_text(cond: Any, sd: dict[str, torch.Tensor], arch: str) -> tuple[Any, dict, dict]:
    """OpenCLIP text tower -> (CLIPTextConfig, CLIPTextModel state dict, unused weights).
    "penultimate" (SD 2) = a CLIPTextModel with one layer less (its final_layer_norm = ln_final)."""
    import open_clip
    from transformers import CLIPTextConfig
    tc = open_clip.get_model_config(arch)["text_cfg"]
    blocks = len(cond.model.transformer.resblocks)
    layers = blocks - cond.layer_idx
    width = sd[OC + "token_embedding.weight"].shape[1]
    config = CLIPTextConfig(vocab_size=tc.get("vocab_size", 49408), hidden_size=width,
                            intermediate_size=int(width * tc.get("mlp_ratio", 4.0)), num_hidden_layers=layers,
                            num_attention_heads=tc["heads"], max_position_embeddings=tc.get("context_length", 77),
                            hidden_act="quick_gelu" if open_clip.get_model_config(arch).get("quick_gelu")
                            else "gelu", layer_norm_eps=1e-5, projection_dim=sd[OC + "text_projection"].shape[1],
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    out = {"text_model.embeddings.token_embedding.weight": sd[OC + "token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd[OC + "positional_embedding"],
           "text_model.final_layer_norm.weight": sd[OC + "ln_final.weight"],
           "text_model.final_layer_norm.bias": sd[OC + "ln_final.bias"]}
    for i in range(layers):
        src, dst = f"{OC}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in OC_BLOCK.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{b}.{leaf}"] = sd[f"{src}{a}.{leaf}"]
        for leaf in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{leaf}"].chunk(3)
            out.update({f"{dst}self_attn.q_proj.{leaf}": q.contiguous(), f"{dst}self_attn.k_proj.{leaf}": k.contiguous(),
                        f"{dst}self_attn.v_proj.{leaf}": v.contiguous()})
    used = {OC + "token_embedding.weight", OC + "positional_embedding", OC + "ln_final.weight", OC + "ln_final.bias"}
    used |= {k for k in sd if any(k.startswith(f"{OC}transformer.resblocks.{i}.") for i in range(layers))}
    extras = {k: v for k, v in sd.items() if k not in used}
    return config, out, extras


def clip_text_to_openclip(text_sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_to_clip_text` (without the unused weights); either key layout."""
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_sd.items()}
    out = {OC + "token_embedding.weight": text_sd["text_model.embeddings.token_embedding.weight"],
           OC + "positional_embedding": text_sd["text_model.embeddings.position_embedding.weight"],
           OC + "ln_final.weight": text_sd["text_model.final_layer_norm.weight"],
           OC + "ln_final.bias": text_sd["text_model.final_layer_norm.bias"]}
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{OC}transformer.resblocks.{i}."
        for a, b in OC_BLOCK.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{a}.{leaf}"] = text_sd[f"{src}{b}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([text_sd[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    return out


def _save_tokenizer(cond: Any, out: Path, pad_token: str | None = None) -> None:
    from transformers import CLIPTokenizer

    from ldm.modules.encoders.hub import local_tokenizer
    hf = local_tokenizer(CLIPTokenizer, getattr(cond, "version", ""), min_vocab=49408) if pad_token is None else None
    if hf is not None:
        hf.save_pretrained(out)
    else:
        write_clip_bpe_tokenizer(out, cond.max_length, pad_token or "<|endoftext|>")


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
