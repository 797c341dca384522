"""Cross-attention transformer blocks of the LDM / Stable Diffusion UNet.

Attribute trees are the original's (`attn1`/`attn2` with `to_q`/`to_k`/`to_v`/`to_out.0`,
`ff.net.0.proj` (GEGLU), `ff.net.2`, `norm1..3`; SpatialTransformer `norm`, `proj_in`,
`transformer_blocks.N`, `proj_out`), so released checkpoints load strictly.

All attention goes through `torch.nn.functional.scaled_dot_product_attention` (one
helper, `attention`). Precision: under fp16/bf16 autocast the released SD v2 code upcast
q and k to float32 for QK^T and the softmax (`_ATTN_PRECISION="fp32"`). SDPA already does
this: its flash and memory-efficient kernels accumulate QK^T and the softmax in float32,
and its math fallback upcasts half/bfloat16 inputs to float32 internally (PyTorch >= 2.5,
unless `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)` was set). So no
manual upcast is done here; `tests/test_unet_attention.py` checks the reduced-precision
error against a float32 reference.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.util import default, exists

ContextDim = Optional[Union[int, Sequence[int]]]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (B, H, N, D) tensors, via SDPA.

    `mask` is an additive float mask broadcastable to (B, H, N, M) or a boolean mask
    (True = attend).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)"""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)"""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def Normalize(in_channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps=1e-6) used in front of a SpatialTransformer."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


# ----------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------
class GEGLU(nn.Module):
    """Linear to 2*dim_out, then x * gelu(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        # dim_in / dim_out: input and output features
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Linear-GELU (or GEGLU) - Dropout - Linear; keys `net.0.{0,proj}`, `net.2`."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        # dim: input features; dim_out: output features (default dim)
        # mult: hidden width = dim * mult; glu: GEGLU input projection instead of Linear+GELU
        # dropout: dropout on the hidden activations
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention of `x` (B, N, query_dim) over `context` (B, M, context_dim),
    or over itself when no context is given."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        # query_dim: features of x; context_dim: features of the context (default query_dim)
        # heads: number of heads; dim_head: features per head
        # dropout: dropout after the output projection
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = default(context, x)
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if exists(mask):
            # (B, ...) boolean over the context positions; masked scores get -max, as the
            # original (a fully masked row then attends uniformly instead of giving NaN).
            keep = mask.reshape(mask.shape[0], 1, 1, -1).to(torch.bool)
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~keep, -torch.finfo(q.dtype).max)
        out = attention(q, k, v, self.scale, mask)
        return self.to_out(merge_heads(out))


class MemoryEfficientCrossAttention(CrossAttention):
    """SD v2's xformers variant: same keys and maths; SDPA picks the memory-efficient kernel."""


# ----------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------
class BasicTransformerBlock(nn.Module):
    """x + attn1(norm1 x) [self-attention], + attn2(norm2 x, context) [cross], + ff(norm3 x)."""

    ATTENTION_MODES = {"softmax": CrossAttention, "softmax-xformers": MemoryEfficientCrossAttention}

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: Optional[int] = None, gated_ff: bool = True, checkpoint: bool = True,
                 disable_self_attn: bool = False):
        super().__init__()
        # dim: token features; n_heads / d_head: heads and features per head
        # dropout: dropout in attention outputs and the feed-forward
        # context_dim: features of the cross-attention context (None: attn2 is self-attention)
        # gated_ff: GEGLU feed-forward; checkpoint: recompute activations in backward
        # disable_self_attn: attn1 also attends to the context instead of to x
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads,
                                    dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def _per_depth(value: Any, depth: int) -> list:
    """A scalar (or None) for every block, or a per-block list as SD v2 allows."""
    if isinstance(value, Sequence) and not isinstance(value, (str, torch.Tensor)):
        value = list(value)
        if len(value) == 1:
            return value * depth
        if len(value) != depth:
            raise ValueError(f"got {len(value)} context entries for a transformer of depth {depth}")
        return value
    return [value] * depth


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a (B, C, H, W) map, conditioned on a context.

    norm -> proj_in (1x1 conv, SD v1 / LDM; or Linear, `use_linear` SD v2) -> `depth`
    BasicTransformerBlocks on (B, H*W, inner) tokens -> proj_out (zero-initialised) -> + x.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: ContextDim = None, disable_self_attn: bool = False, use_linear: bool = False,
                 use_checkpoint: bool = True):
        super().__init__()
        # in_channels: channels of the feature map; n_heads / d_head: attention heads, width per head
        # depth: number of transformer blocks; dropout: dropout inside the blocks
        # context_dim: context features (an int, or one per block)
        # disable_self_attn: attn1 attends to the context instead of the pixels
        # use_linear: Linear proj_in/proj_out on tokens (SD v2) instead of 1x1 convolutions
        # use_checkpoint: activation checkpointing of each block during training
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        context_dims = _per_depth(context_dim, depth)
        self.norm = Normalize(in_channels)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dims[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)])
        if use_linear:
            # (SD v2 wrote nn.Linear(in_channels, inner_dim); equal widths in every released model)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        # note: without a context, cross-attention falls back to self-attention
        contexts = _per_depth(context, len(self.transformer_blocks))
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)           # (B, HW, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)            # (B, C, H, W), channels-last strides
        x = x.contiguous(memory_format=_memory_format(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last if `x` is laid out so (and is not trivially both), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------
# Smaller pieces of the original module (public names user code imports)
# ----------------------------------------------------------------------------------------
def uniq(arr: Sequence) -> Any:
    """The distinct elements of `arr`, in order (dict keys view)."""
    return {el: True for el in arr}.keys()


def max_neg_value(t: torch.Tensor) -> float:
    """The most negative finite value of `t`'s dtype (for masking logits)."""
    return -torch.finfo(t.dtype).max


def init_(tensor: torch.Tensor) -> torch.Tensor:
    """Uniform init in +-1/sqrt(last dim), in place."""
    std = 1 / tensor.shape[-1] ** 0.5
    return tensor.uniform_(-std, std)


class LinearAttention(nn.Module):
    """Linear attention over the pixels of a feature map: softmax over keys' positions, context =
    k v^T per head, out = context^T q (O(HW) memory)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, self.heads, -1, h * w).unbind(1)   # (B, heads, c, HW)
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual (1x1-conv q/k/v/out)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        q, k, v = (f(h_).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = attention(q, k, v, c ** -0.5)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)
