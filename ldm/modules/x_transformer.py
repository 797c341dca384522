"""The small pre-norm transformer encoder of LDM's BERTEmbedder (after lucidrains/x-transformers).

Only the configuration the released models use is implemented (an `Encoder` of
alternating self-attention / feed-forward layers, pre-LayerNorm, absolute learned
positions), with the original module tree so `cond_stage_model.transformer.*` keys load:

    token_emb.weight, pos_emb.emb.weight,
    attn_layers.layers.{2i}.0 (LayerNorm), .1.to_q/to_k/to_v/to_out (Attention),
    attn_layers.layers.{2i+1}.0 (LayerNorm), .1.net.0.0 / .1.net.2 (FeedForward),
    norm, to_logits

(`.2` of every layer is the parameter-free residual). Attention runs through SDPA.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ldm.modules.attention import FeedForward, attention, merge_heads, split_heads
from ldm.util import default, exists

DEFAULT_DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position embeddings, (B, N, .) -> (1, N, dim)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        # dim: embedding width; max_seq_len: number of positions
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = torch.arange(x.shape[1], device=x.device)
        return self.emb(n)[None, :, :]


class Residual(nn.Module):
    """x + residual (no parameters; kept as a module for the original layer layout)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class Attention(nn.Module):
    """Multi-head self- (or cross-) attention without biases on q/k/v."""

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, causal: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        # dim: token width; dim_head / heads: per-head width and head count
        # causal: mask attention to future positions; dropout: dropout on attention weights
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        inner_dim = dim_head * heads
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); mask / context_mask: (B, N) / (B, M) booleans, True = keep."""
        kv = default(context, x)
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(kv), self.to_v(kv)))
        bias = None
        if exists(mask) or exists(context_mask) or self.causal:
            b, n, m = x.shape[0], q.shape[-2], k.shape[-2]
            keep = torch.ones((b, 1, n, m), dtype=torch.bool, device=x.device)
            if exists(mask) or exists(context_mask):
                q_mask = default(mask, lambda: torch.ones((b, n), dtype=torch.bool, device=x.device))
                k_mask = q_mask if not exists(context) else context_mask
                k_mask = default(k_mask, lambda: torch.ones((b, m), dtype=torch.bool, device=x.device))
                keep = keep & q_mask[:, None, :, None] & k_mask[:, None, None, :]
            if self.causal:
                keep = keep & torch.ones((n, m), dtype=torch.bool, device=x.device).tril(m - n)
            # masked scores get -max (not -inf), as the original: fully masked rows stay finite
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=x.device).masked_fill(~keep, -torch.finfo(q.dtype).max)
        if self.training and self.dropout > 0:
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout,
                                                             scale=self.scale)
        else:
            out = attention(q, k, v, self.scale, bias)
        return self.to_out(merge_heads(out))


class AttentionLayers(nn.Module):
    """`depth` blocks of [norm, attention, residual], [norm, feed-forward, residual] (pre-norm)."""

    def __init__(self, dim: int, depth: int, heads: int = 8, causal: bool = False, cross_attend: bool = False,
                 only_cross: bool = False, pre_norm: bool = True, **kwargs: Any):
        super().__init__()
        # dim: token width; depth: number of (attention, feed-forward) blocks; heads: attention heads
        # causal: causal self-attention; cross_attend / only_cross: add (or only use) cross-attention
        # pre_norm: LayerNorm before each sublayer (post-norm otherwise)
        # kwargs: `attn_*` (dim_head, dropout) and `ff_*` (mult, glu, dropout) sublayer options
        ff_kwargs = {k[3:]: v for k, v in kwargs.items() if k.startswith("ff_")}
        attn_kwargs = {k[5:]: v for k, v in kwargs.items() if k.startswith("attn_")}
        unknown = [k for k in kwargs if not k.startswith(("ff_", "attn_"))]
        if unknown:
            raise TypeError(f"unsupported x-transformer options: {unknown}")
        self.dim = dim
        self.depth = depth
        self.pre_norm = pre_norm
        self.has_pos_emb = False
        if cross_attend:
            default_block = ("c", "f") if only_cross else ("a", "c", "f")
        else:
            default_block = ("a", "f")
        self.layer_types = default_block * depth
        self.num_attn_layers = self.layer_types.count("a")
        self.layers = nn.ModuleList([])
        for layer_type in self.layer_types:
            if layer_type == "a":
                layer = Attention(dim, heads=heads, causal=causal, **attn_kwargs)
            elif layer_type == "c":
                layer = Attention(dim, heads=heads, **attn_kwargs)
            else:
                layer = FeedForward(dim, **ff_kwargs)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), layer, Residual()]))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for ind, (layer_type, (norm, block, residual_fn)) in enumerate(zip(self.layer_types, self.layers)):
            residual = x
            if self.pre_norm:
                x = norm(x)
            if layer_type == "a":
                out = block(x, mask=mask)
            elif layer_type == "c":
                out = block(x, context=context, mask=mask, context_mask=context_mask)
            else:
                out = block(x)
            x = residual_fn(out, residual)
            if not self.pre_norm and ind != len(self.layers) - 1:
                x = norm(x)
        return x


class Encoder(AttentionLayers):
    """Non-causal AttentionLayers."""

    def __init__(self, **kwargs: Any):
        assert "causal" not in kwargs, "cannot set causality on encoder"
        super().__init__(causal=False, **kwargs)


class TransformerWrapper(nn.Module):
    """Token + position embedding -> attention layers -> LayerNorm -> (logits | embeddings)."""

    def __init__(self, *, num_tokens: int, max_seq_len: int, attn_layers: AttentionLayers,
                 emb_dim: Optional[int] = None, emb_dropout: float = 0.0, use_pos_emb: bool = True):
        super().__init__()
        # num_tokens: vocabulary size; max_seq_len: number of positions
        # attn_layers: the Encoder; emb_dim: embedding width (default: the encoder's width)
        # emb_dropout: dropout on the summed embeddings; use_pos_emb: learned absolute positions
        assert isinstance(attn_layers, AttentionLayers), "attention layers must be an Encoder"
        dim = attn_layers.dim
        emb_dim = default(emb_dim, dim)
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False, mask: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        """x: (B, N) token ids -> (B, N, dim) embeddings or (B, N, num_tokens) logits."""
        x = self.token_emb(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb(x)
        x = self.project_emb(self.emb_dropout(x))
        x = self.norm(self.attn_layers(x, mask=mask, **kwargs))
        return x if return_embeddings else self.to_logits(x)


# ----------------------------------------------------------------------------------------
# The rest of the original module's public pieces (helpers and alternative layers)
# ----------------------------------------------------------------------------------------
from functools import partial  # noqa: E402

from ldm.modules.attention import GEGLU, max_neg_value  # noqa: E402,F401  (original names)


def always(val: Any) -> Any:
    return lambda *args, **kwargs: val


def equals(val: Any) -> Any:
    return lambda x: x == val


def not_equals(val: Any) -> Any:
    return lambda x: x != val


def pick_and_pop(keys: list[str], d: dict) -> dict:
    return {key: d.pop(key) for key in keys}


def group_dict_by_key(cond: Any, d: dict) -> tuple[dict, dict]:
    """(entries whose key satisfies `cond`, the others)."""
    match, rest = {}, {}
    for key, value in d.items():
        (match if cond(key) else rest)[key] = value
    return match, rest


def string_begins_with(prefix: str, string: str) -> bool:
    return string.startswith(prefix)


def group_by_key_prefix(prefix: str, d: dict) -> tuple[dict, dict]:
    return group_dict_by_key(partial(string_begins_with, prefix), d)


def groupby_prefix_and_trim(prefix: str, d: dict) -> tuple[dict, dict]:
    """(entries with `prefix`, the prefix removed from their keys; the other entries)."""
    with_prefix, rest = group_dict_by_key(partial(string_begins_with, prefix), d)
    return {k[len(prefix):]: v for k, v in with_prefix.items()}, rest


class FixedPositionalEmbedding(nn.Module):
    """Sinusoidal positions (1, N, dim): [sin | cos] of position x inverse frequencies."""

    def __init__(self, dim: int):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x: torch.Tensor, seq_dim: int = 1, offset: int = 0) -> torch.Tensor:
        t = torch.arange(x.shape[seq_dim], device=x.device).type_as(self.inv_freq) + offset
        sinusoid = torch.outer(t, self.inv_freq)
        return torch.cat((sinusoid.sin(), sinusoid.cos()), dim=-1)[None]


class Scale(nn.Module):
    """fn's first output times a constant."""

    def __init__(self, value: float, fn: nn.Module):
        super().__init__()
        self.value, self.fn = value, fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        x, *rest = self.fn(x, **kwargs)
        return (x * self.value, *rest)


class Rezero(nn.Module):
    """fn's first output times a learned scalar that starts at 0 (ReZero)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        x, *rest = self.fn(x, **kwargs)
        return (x * self.g, *rest)


class ScaleNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * g, one learned scalar g."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale, self.eps = dim ** -0.5, eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class RMSNorm(nn.Module):
    """x / rms(x) * g, a learned gain per feature."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.scale, self.eps = dim ** -0.5, eps
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class GRUGating(nn.Module):
    """Residual connection through a GRU cell (gated residual) instead of a sum."""

    def __init__(self, dim: int):
        super().__init__()
        self.gru = nn.GRUCell(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return self.gru(x.reshape(-1, d), residual.reshape(-1, d)).reshape_as(x)
