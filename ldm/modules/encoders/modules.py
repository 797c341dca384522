"""Conditioning encoders named by the released configs (`cond_stage_config`, SD v2's
`embedder_config` / `noise_aug_config`).

The pretrained text encoders (CLIP for SD v1, OpenCLIP for SD v2) never download: see
`ldm.modules.encoders.hub` for where weights are read from, and when the architecture is
built with random weights instead (meta device, `pretrained: false`,
`LDM_RANDOM_HUB_WEIGHTS=1`). Tokenizers are created lazily at the first encode, so every
config builds offline.
"""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.openaimodel import Timestep
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.modules.encoders.hub import (  # noqa: F401  (HubWeightsMissing, RANDOM_WEIGHTS_ENV re-exported)
    RANDOM_WEIGHTS_ENV,
    HubWeightsMissing,
    Text,
    adapt_clip_keys,
    causal_mask,
    clip_text_model,
    clip_tokenizer,
    local_tokenizer,
    missing,
    openclip_model,
    param_device,
)
from ldm.modules.x_transformer import Encoder, TransformerWrapper

logger = logging.getLogger(__name__)


class AbstractEncoder(nn.Module):
    """An encoder of conditioning inputs; `encode` gives what the UNet consumes."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class IdentityEncoder(AbstractEncoder):
    """Returns its input."""

    def encode(self, x: Any) -> Any:
        return x


# ----------------------------------------------------------------------------------------
# Class labels
# ----------------------------------------------------------------------------------------
class ClassEmbedder(nn.Module):
    """Class label -> (B, 1, embed_dim) embedding for cross-attention, with optional label
    dropout to an "unconditional" class (n_classes - 1) for classifier-free guidance."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0):
        super().__init__()
        # embed_dim: embedding width (the UNet's context_dim)
        # n_classes: number of embeddings; with ucg_rate > 0 the last one is the unconditional class
        # key: batch key holding the labels
        # ucg_rate: probability, while training, of replacing a label by n_classes - 1. SD v2's code
        #   defaulted to 0.1 but latent-diffusion had no dropout, and no released config sets it:
        #   0.0 keeps the released class-conditional models exact (cin256-v2 uses n_classes 1001
        #   to make room for the extra class: set ucg_rate: 0.1 there to train for guidance).
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.n_classes = n_classes
        self.ucg_rate = ucg_rate

    def forward(self, batch: dict[str, torch.Tensor], key: Optional[str] = None,
                disable_dropout: bool = False) -> torch.Tensor:
        c = batch[key or self.key][:, None]                                  # (B, 1)
        if self.ucg_rate > 0.0 and self.training and not disable_dropout:
            drop = torch.bernoulli(torch.full(c.shape, self.ucg_rate, device=c.device)).bool()
            c = torch.where(drop, torch.full_like(c, self.n_classes - 1), c)
        return self.embedding(c.long())                                      # (B, 1, embed_dim)

    def get_unconditional_conditioning(self, bs: int, device: Optional[torch.device] = None) -> dict:
        """A batch whose labels are all the unconditional class (feed it to forward)."""
        device = device if device is not None else self.embedding.weight.device
        return {self.key: torch.full((bs,), self.n_classes - 1, dtype=torch.long, device=device)}


# ----------------------------------------------------------------------------------------
# LDM's own text transformer (txt2img-1p4B, text2img256, layout2img)
# ----------------------------------------------------------------------------------------
class TransformerEmbedder(AbstractEncoder):
    """Token ids -> (B, N, n_embed) with a small transformer encoder."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77,
                 device: Optional[str] = None):
        super().__init__()
        # n_embed: width; n_layer: depth; vocab_size: number of token ids; max_seq_len: positions
        # device: ignored (inputs follow the module's parameters); kept for config compatibility
        self.device = device
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(param_device(self)), return_embeddings=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class BERTTokenizer(AbstractEncoder):
    """Text -> (B, max_length) BERT WordPiece token ids (bert-base-uncased, or a vocabulary of
    your own from scripts/train_tokenizer.py). `version` is a folder holding vocab.txt or
    tokenizer.json, such a file itself, or a hub id already in the local Hugging Face cache;
    the files are read at the first call (`check()` reads them at once)."""

    def __init__(self, device: Optional[str] = None, vq_interface: bool = True, max_length: int = 77,
                 version: str = "bert-base-uncased"):
        super().__init__()
        # device: where token ids are put (default: CPU, LatentDiffusion moves them)
        # vq_interface: encode() returns (None, None, [None, None, tokens]) like a VQ model
        # max_length: padded / truncated sequence length
        # version: tokenizer folder / vocab.txt / tokenizer.json, or a hub id in the local HF cache
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length
        self.version = version
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = bert_tokenizer(self.version)
        return self._tokenizer

    def check(self) -> int:
        """Read the tokenizer files now (a missing one raises HubWeightsMissing); returns the vocabulary size."""
        return len(self.tokenizer)

    def forward(self, text: Text) -> torch.Tensor:
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                             return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        tokens = enc["input_ids"]
        return tokens.to(self.device) if self.device is not None else tokens

    @torch.no_grad()
    def encode(self, text: Text) -> Any:
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text: Any) -> Any:
        return text


def bert_tokenizer(version: str) -> Any:
    """BertTokenizerFast from a local folder / vocab.txt / tokenizer.json, else from the HF cache."""
    from transformers import BertTokenizerFast
    path = os.path.expanduser(str(version))
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json")):
        return BertTokenizerFast.from_pretrained(path, local_files_only=True)
    if os.path.isfile(path) and path.endswith(".json"):
        return BertTokenizerFast(tokenizer_file=path)
    if os.path.isfile(path):
        return BertTokenizerFast(path)          # a vocab.txt (the first argument in transformers 4 and 5)
    tok = local_tokenizer(BertTokenizerFast, str(version), min_vocab=1000)
    if tok is None:
        raise missing(f"BERT tokenizer '{version}'",
                      "set `tokenizer_path:` (BERTEmbedder) or `version:` (BERTTokenizer) to a folder holding "
                      "vocab.txt or tokenizer.json -- `python scripts/train_tokenizer.py --captions <image folder> "
                      "--out <folder>` makes one from your captions in seconds -- or put bert-base-uncased "
                      "in the Hugging Face cache (HF_HOME)", weights=False)
    return tok


class BERTEmbedder(AbstractEncoder):
    """BERT-tokenized text (or given token ids) -> (B, max_seq_len, n_embed) via our transformer.
    The tokenizer files are read when the module is built (not at the first caption), so a
    missing vocabulary fails before any data is loaded."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device: Optional[str] = None, use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 tokenizer_path: str = "bert-base-uncased"):
        super().__init__()
        # n_embed: width; n_layer: depth; vocab_size: token ids; max_seq_len: positions
        # device: ignored (inputs follow the module's parameters); kept for config compatibility
        # use_tokenizer: inputs are strings to tokenize (else token ids, e.g. layout2img's boxes)
        # embedding_dropout: dropout on the token + position embeddings
        # tokenizer_path: WordPiece vocabulary (folder with vocab.txt / tokenizer.json, or the file),
        #   or a hub id in the local HF cache (the original always used bert-base-uncased)
        self.use_tknz_fn = use_tokenizer
        if self.use_tknz_fn:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, version=tokenizer_path)
            if torch.get_default_device().type != "meta":   # meta builds (key listings) read no files
                n_tokens = self.tknz_fn.check()
                if n_tokens > vocab_size:
                    raise ValueError(f"BERTEmbedder: the tokenizer '{tokenizer_path}' has {n_tokens} tokens but "
                                     f"vocab_size is {vocab_size}: set vocab_size >= {n_tokens}")
        self.device = device
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    def forward(self, text: Union[Text, torch.Tensor]) -> torch.Tensor:
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        return self.transformer(tokens.to(param_device(self)), return_embeddings=True)

    def encode(self, text: Union[Text, torch.Tensor]) -> torch.Tensor:
        return self(text)


# ----------------------------------------------------------------------------------------
# Spatial conditioning (semantic maps, low-resolution images)
# ----------------------------------------------------------------------------------------
class SpatialRescaler(nn.Module):
    """Resize a (B, C, H, W) map `n_stages` times by `multiplier`, then optionally map channels (1x1 conv)."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5,
                 in_channels: int = 3, out_channels: Optional[int] = None, bias: bool = False):
        super().__init__()
        # n_stages: number of resizes; method: interpolation mode; multiplier: scale per stage
        # in_channels / out_channels: channel_mapper conv from in to out channels (None: no conv)
        # bias: bias of the channel_mapper conv
        self.n_stages = n_stages
        assert self.n_stages >= 0
        assert method in ["nearest", "linear", "bilinear", "trilinear", "bicubic", "area"]
        self.multiplier = multiplier
        self.interpolator = partial(torch.nn.functional.interpolate, mode=method)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = self.interpolator(x, scale_factor=self.multiplier)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


# ----------------------------------------------------------------------------------------
# Frozen CLIP text encoder (SD v1)
# ----------------------------------------------------------------------------------------
class FrozenCLIPEmbedder(AbstractEncoder):
    """Text -> (B, 77, 768) CLIP ViT-L/14 text features (Hugging Face CLIPTextModel)."""

    LAYERS = ["last", "pooled", "hidden"]

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: Optional[str] = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last", layer_idx: Optional[int] = None,
                 pretrained: bool = True):
        super().__init__()
        # version: hub id (read from the local HF cache only) or a local model directory
        # device: ignored (tokens follow the module's parameters); kept for config compatibility
        # max_length: token sequence length; freeze: eval mode and no gradients
        # layer: "last" hidden state, "pooled" (B, 1, 768) EOS feature, or "hidden" state layer_idx
        # layer_idx: which hidden state for layer="hidden" (e.g. -2: penultimate, before final norm)
        # pretrained: load the weights (False: random weights; see ldm.modules.encoders.hub)
        assert layer in self.LAYERS
        if layer == "hidden":
            assert layer_idx is not None and 0 <= abs(layer_idx) <= 12
        self.version = version
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.transformer = clip_text_model(version, pretrained)
        self._tokenizer: Any = None
        self.register_load_state_dict_pre_hook(adapt_clip_keys)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: Text) -> torch.Tensor:
        """(B, max_length) token ids; the tokenizer is created at the first call."""
        if self._tokenizer is None:
            self._tokenizer = clip_tokenizer(self.version, self.max_length)
        return self._tokenizer(text)

    def forward(self, text: Text) -> torch.Tensor:
        device = param_device(self)
        tokens = self.tokenize(text).to(device)
        # explicit positions: the non-persistent position_ids buffer may be absent (meta builds)
        positions = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        outputs = self.transformer(input_ids=tokens, position_ids=positions,
                                   output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: Text) -> torch.Tensor:
        return self(text)


# ----------------------------------------------------------------------------------------
# Frozen OpenCLIP text encoder (SD v2)
# ----------------------------------------------------------------------------------------
class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """Text -> (B, 77, 1024) OpenCLIP ViT-H/14 text features ("last" or "penultimate" layer)."""

    LAYERS = ["last", "penultimate"]

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: Optional[str] = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last", pretrained: bool = True):
        super().__init__()
        # arch: open_clip model name; version: pretrained tag (from the local HF cache) or a checkpoint path
        # device: ignored (tokens follow the module's parameters); kept for config compatibility
        # max_length: token sequence length (open_clip's context length, 77)
        # freeze: eval mode and no gradients
        # layer: "last" = output of the final block, "penultimate" = of the one before (SD v2 uses it)
        # pretrained: load the weights (False: random weights; see ldm.modules.encoders.hub)
        assert layer in self.LAYERS
        self.model = openclip_model(arch, version, pretrained, keep="text")
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: Text) -> torch.Tensor:
        import open_clip
        tokens = open_clip.tokenize(text)
        return self.encode_with_transformer(tokens.to(param_device(self)))

    def encode_with_transformer(self, text: torch.Tensor) -> torch.Tensor:
        x = self.model.token_embedding(text) + self.model.positional_embedding      # (B, L, D)
        x = self.text_transformer_forward(x, attn_mask=causal_mask(x.shape[1], x.device))
        return self.model.ln_final(x)

    def text_transformer_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        transformer = self.model.transformer
        batch_first = getattr(transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)                                                 # NLD -> LND
        blocks = transformer.resblocks[: len(transformer.resblocks) - self.layer_idx]
        for r in blocks:
            if transformer.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(r, x, None, None, attn_mask, use_reentrant=False)
            else:
                x = r(x, attn_mask=attn_mask)
        return x if batch_first else x.permute(1, 0, 2)

    def encode(self, text: Text) -> torch.Tensor:
        return self(text)


# ----------------------------------------------------------------------------------------
# SD v2.1 unCLIP: OpenCLIP image embedding and its noise augmentation
# ----------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FrozenOpenCLIPImageEmbedder(AbstractEncoder):
    """Image in [-1, 1] -> (B, embed_dim) OpenCLIP ViT-H/14 image embedding (text tower deleted)."""

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: Optional[str] = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "pooled", antialias: bool = True,
                 ucg_rate: float = 0.0, pretrained: bool = True):
        super().__init__()
        # arch / version / pretrained: as FrozenOpenCLIPEmbedder; device, max_length: unused (compatibility)
        # freeze: eval mode and no gradients; layer: only "pooled" (the projected embedding)
        # antialias: antialiased bicubic resize to 224x224 (torch's filter; the original used kornia's)
        # ucg_rate: probability, while training, of zeroing an embedding (classifier-free guidance)
        if layer != "pooled":
            raise NotImplementedError(f"layer={layer!r}: only 'pooled' is supported (as in SD v2)")
        self.model = openclip_model(arch, version, pretrained, keep="visual")
        self.device = device
        self.max_length = max_length
        self.layer = layer
        self.antialias = antialias
        self.ucg_rate = ucg_rate
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP-normalised (B, 3, 224, 224)."""
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=True, antialias=self.antialias)
        x = (x + 1.0) / 2.0
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def forward(self, image: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        with torch.autocast(image.device.type, enabled=image.device.type == "cuda"):
            z = self.model.visual(self.preprocess(image))
        if self.ucg_rate > 0.0 and self.training and not no_dropout:
            keep = torch.bernoulli(torch.full((z.shape[0],), 1.0 - self.ucg_rate, device=z.device))
            z = keep[:, None] * z
        return z

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self(image)


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """Noise a CLIP image embedding (standardised by dataset statistics) to a random level;
    returns the noised embedding and the level's sinusoidal embedding (SD v2.1 unCLIP)."""

    def __init__(self, *args: Any, clip_stats_path: Optional[str] = None, timestep_dim: int = 256, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # clip_stats_path: torch file holding (mean, std) of the embeddings (None: 0 / 1)
        # timestep_dim: embedding width, and width of the noise-level embedding
        # args / kwargs: ImageConcatWithNoiseAugmentation's (noise_schedule_config, max_noise_level)
        if clip_stats_path is None or torch.get_default_device().type == "meta":
            clip_mean, clip_std = torch.zeros(timestep_dim), torch.ones(timestep_dim)
        else:
            try:
                clip_mean, clip_std = torch.load(clip_stats_path, map_location="cpu", weights_only=True)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"CLIP embedding statistics not found at '{clip_stats_path}' "
                                        "(clip_stats_path: a torch file holding (mean, std))") from e
        self.register_buffer("data_mean", clip_mean[None, :], persistent=False)
        self.register_buffer("data_std", clip_std[None, :], persistent=False)
        self.time_embed = Timestep(timestep_dim)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean) * 1.0 / self.data_std

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std + self.data_mean

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(f"noise_level must be a tensor, got {type(noise_level).__name__}")
        z = self.unscale(self.q_sample(self.scale(x), noise_level))
        return z, self.time_embed(noise_level)


from ldm.modules.encoders.extra import (  # noqa: E402,F401  (the original module's other encoders)
    ClipImageEmbedder, FrozenCLIPT5Encoder, FrozenCLIPTextEmbedder, FrozenClipImageEmbedder, FrozenT5Embedder, disabled_train)
