"""The original repositories' other encoders (re-exported by `ldm.modules.encoders.modules`):

- `FrozenCLIPTextEmbedder`, `FrozenClipImageEmbedder` (latent-diffusion's retrieval models,
  `scripts/knn2img.py`) and `ClipImageEmbedder` (SD v2): OpenAI CLIP, loaded from the local
  file that OpenAI's `clip.load` would download (`~/.cache/clip/ViT-L-14.pt`, or a path
  given as `version` / `model`), built as open_clip's CLIP (the same key layout);
- `FrozenT5Embedder`, `FrozenCLIPT5Encoder` (SD v2): T5 encoders from a local directory or the
  Hugging Face cache;
- `disabled_train`.

Nothing is downloaded: a missing file fails when the encoder is built, naming the file and where
to put it. `pretrained=False` (or building on the meta device, or LDM_RANDOM_HUB_WEIGHTS=1) builds
the architecture with random weights instead.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.encoders.hub import HubWeightsMissing, local_tokenizer, missing, param_device, use_pretrained

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# OpenAI's model names -> open_clip architectures (weights file = the name with "/" -> "-", ".pt")
OPENAI_ARCHS = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
                "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                "ViT-L/14@336px": "ViT-L-14-336"}


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Put in place of a frozen module's `.train`, so that train/eval mode never changes again."""
    return self


def openai_clip_path(name: str, download_root: Optional[str] = None) -> str:
    """Where OpenAI's `clip.load(name)` keeps the weights: `name` itself if it is a file, else
    <download_root or ~/.cache/clip>/<name with '/' -> '-'>.pt."""
    if os.path.isfile(name):
        return name
    root = download_root or os.path.expanduser("~/.cache/clip")
    return os.path.join(root, name.replace("/", "-").replace("@", "-") + ".pt") if name in OPENAI_ARCHS else name


def openai_clip(name: str, pretrained: bool = True) -> nn.Module:
    """OpenAI CLIP `name` (e.g. "ViT-L/14" or a .pt path) as open_clip's CLIP, weights from the local
    file; random weights when not `pretrained` (see ldm.modules.encoders.hub.use_pretrained)."""
    import open_clip
    if not use_pretrained(pretrained):
        if name not in OPENAI_ARCHS:
            raise ValueError(f"unknown OpenAI CLIP model {name!r}: one of {sorted(OPENAI_ARCHS)} or a weights file")
        cfg = open_clip.get_model_config(OPENAI_ARCHS[name])   # built directly: works on the meta device
        return open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                    text_cfg=cfg["text_cfg"], quick_gelu=True)
    path = openai_clip_path(name)
    if not os.path.isfile(path):
        raise missing(f"OpenAI CLIP weights '{name}'",
                      f"expected the file {path} (what OpenAI's clip.load('{name}') downloads: put it there, or pass "
                      f"the path of the .pt file as the model name)")
    try:   # a plain state dict, or (the released files) a TorchScript archive
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    except Exception:
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    sd = {k: v.float() for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    from open_clip.model import build_model_from_openai_state_dict
    model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True).float()
    model.load_state_dict(sd, strict=True)   # again in float32 (the builder rounds to fp16)
    return model


class FrozenCLIPTextEmbedder(nn.Module):
    """Text -> (B, D) OpenAI CLIP text embedding (projected, optionally unit-norm); `encode`
    repeats it to (B, n_repeat, D) for cross-attention (the retrieval models)."""

    def __init__(self, version: str = "ViT-L/14", device: Optional[str] = None, max_length: int = 77,
                 n_repeat: int = 1, normalize: bool = True, pretrained: bool = True):
        super().__init__()
        # version: OpenAI model name (weights from ~/.cache/clip) or a .pt path; device: unused
        # (tokens follow the parameters); max_length: token length (CLIP's 77)
        # n_repeat: copies of the embedding in `encode`; normalize: unit L2 norm
        self.model = openai_clip(version, pretrained)
        self.device = device
        self.max_length = max_length
        self.n_repeat = n_repeat
        self.normalize = normalize

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: Any) -> torch.Tensor:
        import open_clip
        tokens = open_clip.tokenize(text, context_length=self.max_length).to(param_device(self))
        z = self.model.encode_text(tokens)
        return z / torch.linalg.norm(z, dim=1, keepdim=True) if self.normalize else z

    def encode(self, text: Any) -> torch.Tensor:
        z = self(text)
        if z.ndim == 2:
            z = z[:, None, :]
        return z.expand(-1, self.n_repeat, -1) if z.shape[1] == 1 else z


class ClipImageEmbedder(nn.Module):
    """Image in [-1, 1] -> (B, D) OpenAI CLIP image embedding (SD v2; `ucg_rate`: embedding dropout)."""

    def __init__(self, model: str, jit: bool = False, device: Optional[str] = None, antialias: bool = True,
                 ucg_rate: float = 0.0, pretrained: bool = True):
        super().__init__()
        # model: OpenAI model name or .pt path; jit / device: unused (kept for the signature)
        # antialias: antialiased bicubic resize to 224 (torch's filter; the original used kornia's)
        self.model = openai_clip(model, pretrained)
        self.antialias = antialias
        self.ucg_rate = ucg_rate
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP-normalised (B, 3, S, S), S the model's input size."""
        size = self.model.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=True, antialias=self.antialias)
        x = (x + 1.0) / 2.0
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def forward(self, x: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        out = self.model.encode_image(self.preprocess(x)).to(x.dtype)
        if self.ucg_rate > 0.0 and not no_dropout:
            out = torch.bernoulli((1.0 - self.ucg_rate) * torch.ones(out.shape[0], device=out.device))[:, None] * out
        return out


class FrozenClipImageEmbedder(ClipImageEmbedder):
    """latent-diffusion's variant: no antialiasing by default, no embedding dropout."""

    def __init__(self, model: str, jit: bool = False, device: Optional[str] = None, antialias: bool = False,
                 pretrained: bool = True):
        super().__init__(model, jit=jit, device=device, antialias=antialias, ucg_rate=0.0, pretrained=pretrained)


class FrozenT5Embedder(nn.Module):
    """Text -> (B, max_length, D) T5 encoder features (transformers, local files only)."""

    def __init__(self, version: str = "google/t5-v1_1-large", device: Optional[str] = None, max_length: int = 77,
                 freeze: bool = True, pretrained: bool = True):
        super().__init__()
        from transformers import T5Config, T5EncoderModel, T5Tokenizer
        self.tokenizer = local_tokenizer(T5Tokenizer, version, min_vocab=1)
        if use_pretrained(pretrained):
            try:
                self.transformer = T5EncoderModel.from_pretrained(version, local_files_only=True)
            except OSError as e:
                raise missing(f"T5 weights '{version}'", "pass `version:` a local directory with config.json + "
                              f"weights, or populate the Hugging Face cache (HF_HOME) with {version}") from e
        else:
            try:
                config = T5Config.from_pretrained(version, local_files_only=True)
            except OSError as e:
                raise missing(f"T5 config '{version}'", "a local directory or cache entry with config.json") from e
            self.transformer = T5EncoderModel(config)
        self.device = device
        self.max_length = max_length
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: Any) -> torch.Tensor:
        if self.tokenizer is None:
            raise HubWeightsMissing("T5 tokenizer files not found locally (spiece.model beside the weights)")
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                               return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        return self.transformer(input_ids=batch["input_ids"].to(param_device(self))).last_hidden_state

    def encode(self, text: Any) -> torch.Tensor:
        return self(text)


class FrozenCLIPT5Encoder(nn.Module):
    """[CLIP text features, T5 features] of the same text."""

    def __init__(self, clip_version: str = "openai/clip-vit-large-patch14", t5_version: str = "google/t5-v1_1-xl",
                 device: Optional[str] = None, clip_max_length: int = 77, t5_max_length: int = 77):
        super().__init__()
        from ldm.modules.encoders.modules import FrozenCLIPEmbedder
        self.clip_encoder = FrozenCLIPEmbedder(clip_version, device, max_length=clip_max_length)
        self.t5_encoder = FrozenT5Embedder(t5_version, device, max_length=t5_max_length)

    def encode(self, text: Any) -> list[torch.Tensor]:
        return self(text)

    def forward(self, text: Any) -> list[torch.Tensor]:
        return [self.clip_encoder.encode(text), self.t5_encoder.encode(text)]
