"""The diffusion UNet of LDM / Stable Diffusion (after openai/guided-diffusion `unet.py`).

`UNetModel` accepts every constructor keyword the released latent-diffusion, SD v1 and
SD v2 configs use and keeps the original attribute tree, so checkpoints load strictly:
`time_embed.{0,2}`, `label_emb`, `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`,
`out.{0,2}` (and `id_predictor` with `n_embed`). Each `input_blocks.N` /
`output_blocks.N` is a `TimestepEmbedSequential` of ResBlock, attention
(AttentionBlock or SpatialTransformer) and Downsample/Upsample.

Numerics follow the original (golden fixtures compare at ~1e-5 against a float64 rerun);
all attention runs through `torch.nn.functional.scaled_dot_product_attention`.
`use_checkpoint` is real activation checkpointing (`torch.utils.checkpoint`,
non-reentrant) of every ResBlock / attention block while training.
"""
from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer, attention
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldm.util import exists

logger = logging.getLogger(__name__)


# kept for scripts that import them (the original made them no-ops too)
def convert_module_to_f16(x: nn.Module) -> None:
    pass


def convert_module_to_f32(x: nn.Module) -> None:
    pass


# ----------------------------------------------------------------------------------------
# Sequential container that routes the timestep embedding and the context
# ----------------------------------------------------------------------------------------
class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to `x` given the timestep embeddings `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes `emb` to TimestepBlocks and `context` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Any = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------
class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims for 3D), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        # channels: input channels; use_conv: apply a 3x3 convolution after upsampling
        # dims: 1, 2 or 3; out_channels: output channels (default channels); padding: conv padding
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class TransposedUpsample(nn.Module):
    """Learned 2x upsampling without padding (a strided transposed convolution)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, ks: int = 5):
        super().__init__()
        # channels / out_channels: input / output channels; ks: kernel size
        self.channels = channels
        self.out_channels = out_channels or channels
        self.up = nn.ConvTranspose2d(self.channels, self.out_channels, kernel_size=ks, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class Downsample(nn.Module):
    """2x downsampling (inner two dims for 3D) by a strided 3x3 conv or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        # channels: input channels; use_conv: strided convolution (else average pooling)
        # dims: 1, 2 or 3; out_channels: output channels (default channels); padding: conv padding
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


# ----------------------------------------------------------------------------------------
# Residual block
# ----------------------------------------------------------------------------------------
class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, + timestep embedding (added, or FiLM scale/shift), GroupNorm-SiLU-
    dropout-conv (zero-initialised), + skip; optionally up/downsamples."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        # channels: input channels; emb_channels: timestep-embedding width; dropout: rate
        # out_channels: output channels (default channels)
        # use_conv: 3x3 (instead of 1x1) skip convolution when the channel count changes
        # use_scale_shift_norm: FiLM conditioning, norm(h) * (1 + scale) + shift
        # dims: 1, 2 or 3; use_checkpoint: activation checkpointing while training
        # up / down: resample by 2 inside the block (resblock_updown)
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...) features; emb: (N, emb_channels) timestep embeddings."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = self.h_upd(in_rest(x))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


# ----------------------------------------------------------------------------------------
# Pixel self-attention (non-transformer models)
# ----------------------------------------------------------------------------------------
class QKVAttentionLegacy(nn.Module):
    """Attention on a (N, H*3*C, T) qkv tensor split heads-first (the original layout)."""

    def __init__(self, n_heads: int):
        super().__init__()
        # n_heads: number of attention heads
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, H*3*C, T) -> (N, H*C, T)"""
        return self.attend_tokens(qkv.transpose(1, 2)).transpose(1, 2)

    def attend_tokens(self, qkv: torch.Tensor) -> torch.Tensor:
        """Token-major (N, T, H*3*C) -> (N, T, H*C): heads-first split, per head [q | k | v]."""
        bs, length, width = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, length, self.n_heads, 3, ch).unbind(3)          # (N, T, H, C) each
        return _attend_heads(q, k, v, ch)


class QKVAttention(nn.Module):
    """Attention on a (N, 3*H*C, T) qkv tensor split qkv-first (`use_new_attention_order`)."""

    def __init__(self, n_heads: int):
        super().__init__()
        # n_heads: number of attention heads
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, 3*H*C, T) -> (N, H*C, T)"""
        return self.attend_tokens(qkv.transpose(1, 2)).transpose(1, 2)

    def attend_tokens(self, qkv: torch.Tensor) -> torch.Tensor:
        """Token-major (N, T, 3*H*C) -> (N, T, H*C): split [q | k | v] first, then heads."""
        bs, length, width = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, length, 3, self.n_heads, ch).unbind(2)          # (N, T, H, C) each
        return _attend_heads(q, k, v, ch)


def _attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """(N, T, H, C) q, k, v -> (N, T, H*C). Heads go to dim 1 as views whose last dim stays
    contiguous, which lets SDPA use its fused (flash) kernel instead of materialising T x T."""
    a = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ch ** -0.5)   # (N, H, T, C)
    return a.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _pointwise_to_tokens(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d on (N, C, T), returned token-major (N, T, O) without a transpose copy."""
    w = conv.weight.reshape(conv.weight.shape[0], -1).t().expand(x.shape[0], -1, -1)   # (N, C, O)
    if conv.bias is None:
        return torch.bmm(x.transpose(1, 2), w)
    return torch.baddbmm(conv.bias.view(1, 1, -1), x.transpose(1, 2), w)


def _pointwise_from_tokens(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d applied to token-major (N, T, C), returned channel-major (N, O, T)."""
    w = conv.weight.reshape(conv.weight.shape[0], -1).expand(x.shape[0], -1, -1)       # (N, O, C)
    if conv.bias is None:
        return torch.bmm(w, x.transpose(1, 2))
    return torch.baddbmm(conv.bias.view(1, -1, 1), w, x.transpose(1, 2))


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions: x + proj_out(attn(qkv(norm x)))."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        # channels: feature channels; num_heads: heads (used when num_head_channels == -1)
        # num_head_channels: channels per head (overrides num_heads)
        # use_checkpoint: activation checkpointing while training
        # use_new_attention_order: split qkv before heads (QKVAttention) instead of after
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (
                f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # = proj_out(attention(qkv(norm(x)))) + x, with the 1x1 convolutions as batched matmuls
        # producing / consuming token-major (N, T, .) tensors, so that no transpose is copied
        # and attention gets last-dim-contiguous heads (3x faster on CPU than the conv layout)
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)                                               # (N, C, T)
        qkv = _pointwise_to_tokens(self.qkv, self.norm(x))                    # (N, T, 3C)
        h = _pointwise_from_tokens(self.proj_out, self.attention.attend_tokens(qkv))   # (N, C, T)
        return (x + h).reshape(b, c, *spatial)


class Timestep(nn.Module):
    """t -> timestep_embedding(t, dim) as a module (used by SD v2 noise augmentation)."""

    def __init__(self, dim: int):
        super().__init__()
        # dim: embedding width
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


# ----------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------
def _as_list(x: Any) -> Any:
    """OmegaConf ListConfig / tuples -> list (ints and None unchanged)."""
    if isinstance(x, Sequence) and not isinstance(x, str):
        return list(x)
    return x


class UNetModel(nn.Module):
    """The UNet with timestep embedding, attention and optional class / cross-attention conditioning."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[Union[int, str]] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: Optional[Union[int, Sequence[int]]] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
        use_channels_last: bool = False,
    ):
        super().__init__()
        # image_size: training resolution (informational; the model is fully convolutional)
        # in_channels / out_channels: channels of the input x and of the prediction
        # model_channels: base width; level i has model_channels * channel_mult[i] channels
        # num_res_blocks: ResBlocks per level (an int, or one per level)
        # attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention is used
        # dropout: dropout rate in ResBlocks (and transformer blocks)
        # channel_mult: width multiplier per level; len(channel_mult) levels, each but the last downsamples
        # conv_resample: learned 3x3 convolutions for up/downsampling (else nearest / avg-pool only)
        # dims: 1, 2 or 3 spatial dimensions
        # num_classes: int -> class-conditional (label_emb Embedding); "continuous" -> Linear(1, .);
        #   "sequential" -> MLP on an adm_in_channels vector (SD v2 unCLIP / upscaler ADM input)
        # use_checkpoint: activation checkpointing of every block while training (less memory)
        # use_fp16 / use_bf16: kept for config compatibility; sets `self.dtype` only (as SD v2:
        #   the cast was disabled there). Use autocast / Lightning precision for mixed precision.
        # num_heads: attention heads (-1: use num_head_channels)
        # num_head_channels: channels per attention head (-1: use num_heads)
        # num_heads_upsample: heads of the decoder AttentionBlocks (-1: num_heads; deprecated)
        # use_scale_shift_norm: FiLM-style timestep conditioning in ResBlocks
        # resblock_updown: ResBlocks with up/down=True instead of Upsample/Downsample
        # use_new_attention_order: AttentionBlock splits qkv before heads
        # use_spatial_transformer: SpatialTransformer (cross-attention) instead of AttentionBlock
        # transformer_depth: BasicTransformerBlocks per SpatialTransformer
        # context_dim: cross-attention context width (int or per-depth list)
        # n_embed: predict logits over a first-stage VQ codebook of this size (id_predictor head)
        # legacy: original head arithmetic (SpatialTransformer d_head = ch // num_heads)
        # disable_self_attentions: per level, attn1 attends to the context instead of the pixels
        # num_attention_blocks: per level, how many of the ResBlocks get an attention block
        # disable_middle_self_attn: same as disable_self_attentions for the middle block
        # use_linear_in_transformer: Linear proj_in/proj_out in SpatialTransformers (SD v2)
        # adm_in_channels: input width of the "sequential" label embedding
        # use_channels_last: keep conv weights and activations in channels_last memory format
        #   (a speed switch, not in the original; same numbers up to float rounding; see ldm.perf)
        if use_spatial_transformer:
            assert context_dim is not None, "use_spatial_transformer needs context_dim (the cross-attention width)"
        if context_dim is not None:
            assert use_spatial_transformer, "context_dim is only used with use_spatial_transformer=True"
            context_dim = _as_list(context_dim)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1:
            assert num_head_channels != -1, "Either num_heads or num_head_channels has to be set"
        if num_head_channels == -1:
            assert num_heads != -1, "Either num_heads or num_head_channels has to be set"
        channel_mult = _as_list(channel_mult)
        attention_resolutions = _as_list(attention_resolutions)
        if isinstance(num_res_blocks, int):
            self.num_res_blocks = len(channel_mult) * [num_res_blocks]
        else:
            if len(num_res_blocks) != len(channel_mult):
                raise ValueError("provide num_res_blocks either as an int (globally constant) or "
                                 "as a list/tuple (per-level) with the same length as channel_mult")
            self.num_res_blocks = list(num_res_blocks)
        if disable_self_attentions is not None:
            assert len(disable_self_attentions) == len(channel_mult)
        if num_attention_blocks is not None:
            assert len(num_attention_blocks) == len(self.num_res_blocks)
            assert all(self.num_res_blocks[i] >= n for i, n in enumerate(num_attention_blocks))
            logger.info("num_attention_blocks=%s has less priority than attention_resolutions=%s",
                        list(num_attention_blocks), attention_resolutions)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.bfloat16 if use_bf16 else (torch.float16 if use_fp16 else torch.float32)
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if self.num_classes is not None:
            if isinstance(self.num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif self.num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif self.num_classes == "sequential":
                assert adm_in_channels is not None, 'num_classes="sequential" needs adm_in_channels'
                self.label_emb = nn.Sequential(nn.Sequential(
                    linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    linear(time_embed_dim, time_embed_dim),
                ))
            else:
                raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")

        def resblock(ch_in: int, ch_out: Optional[int] = None, **kw: Any) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn_block(ch: int, heads_for_attention_block: int, disable_sa: bool) -> nn.Module:
            # head arithmetic exactly as the original (including its `legacy` quirks)
            if num_head_channels == -1:
                n_heads, dim_head = num_heads, ch // num_heads
            else:
                n_heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // n_heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, n_heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                          disable_self_attn=disable_sa, use_linear=use_linear_in_transformer,
                                          use_checkpoint=use_checkpoint)
            return AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=heads_for_attention_block,
                                  num_head_channels=dim_head, use_new_attention_order=use_new_attention_order)

        def heads_after(ch: int) -> int:
            # the original overwrote `num_heads` in its loop when num_head_channels was set
            return ch // num_head_channels if num_head_channels != -1 else num_heads

        def level_disables_self_attn(level: int) -> bool:
            return bool(disable_self_attentions[level]) if exists(disable_self_attentions) else False

        def wants_attention(ds: int, level: int, index: int) -> bool:
            # attention_resolutions decides; num_attention_blocks can only remove blocks
            limit = num_attention_blocks[level] if exists(num_attention_blocks) else index + 1
            return ds in attention_resolutions and index < limit

        # ---- encoder ----
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        self._feature_size = model_channels
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if wants_attention(ds, level, nr):
                    layers.append(attn_block(ch, heads_after(ch), level_disables_self_attn(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (resblock(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        # ---- middle ----
        self.middle_block = TimestepEmbedSequential(
            resblock(ch),
            attn_block(ch, heads_after(ch), disable_middle_self_attn),
            resblock(ch),
        )
        self._feature_size += ch

        # ---- decoder ----
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if wants_attention(ds, level, i):
                    layers.append(attn_block(ch, num_heads_upsample, level_disables_self_attn(level)))
                if level and i == self.num_res_blocks[level]:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch),
                conv_nd(dims, model_channels, n_embed, 1),
            )
        self.use_channels_last = use_channels_last and dims == 2
        if self.use_channels_last:
            self.to(memory_format=torch.channels_last)

    def convert_to_fp16(self) -> None:
        """Kept for API compatibility (a no-op, as in the original)."""
        self.input_blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        """Kept for API compatibility (a no-op, as in the original)."""
        self.input_blocks.apply(convert_module_to_f32)

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None, context: Any = None,
                y: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """x: (N, C, ...) input; timesteps: (N,) diffusion steps; context: (N, L, context_dim)
        cross-attention conditioning (or one per transformer depth); y: (N,) class labels or
        (N, adm_in_channels) ADM vectors. Returns (N, out_channels, ...) (or codebook logits)."""
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))   # (N, 4 * model_channels)
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)

        hs = []
        h = x.contiguous(memory_format=torch.channels_last) if self.use_channels_last else x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out.contiguous() if self.use_channels_last else out


# ========================================================================================
# The original module's encoder half of the UNet (appended): the noisy-image classifier of
# guided diffusion / LDM's `NoisyLatentImageClassifier`, with its pooling heads.
# ========================================================================================
def count_flops_attn(model: nn.Module, _x: tuple, y: tuple) -> None:
    """A counter for `thop.profile(custom_ops=...)`: the two matmuls of attention over T tokens."""
    b, c, *spatial = y[0].shape
    num_spatial = int(torch.tensor(spatial).prod())
    model.total_ops += torch.DoubleTensor([2 * b * (num_spatial ** 2) * c])


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token (plus learned positions) attends over all positions."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: Optional[int] = None):
        super().__init__()
        # spacial_dim: side of the input feature map; embed_dim: its channels
        # num_heads_channels: channels per head; output_dim: channels out (default embed_dim)
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)                                         # (B, C, HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)        # (B, C, HW + 1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class EncoderUNetModel(nn.Module):
    """The UNet's input blocks and middle block with a pooling head: (x, timesteps) -> (B, out_channels)."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False, pool: str = "adaptive",
                 *args: Any, **kwargs: Any):
        super().__init__()
        # keys as UNetModel (num_heads_upsample unused: there is no output half); extra UNet keys of a
        # diffusion config (context_dim, use_spatial_transformer, ...) are accepted and ignored
        # pool: "adaptive" (avg-pool + 1x1 conv), "attention" (AttentionPool2d; needs num_head_channels),
        #   "spatial" / "spatial_v2" (MLP over the per-block spatial means)
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, attention_resolutions
        self.dropout, self.channel_mult, self.conv_resample = dropout, channel_mult, conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.pool = pool
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))

        def res(ch_in: int, ch_out: Optional[int] = None, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, down=down)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=num_heads,
                                  num_head_channels=num_head_channels, use_new_attention_order=use_new_attention_order)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3,
                                                                           padding=1))])
        self._feature_size = ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims,
                                                                                  out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                ds *= 2
                self._feature_size += ch
        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch), res(ch))
        self._feature_size += ch
        if pool == "adaptive":
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            assert num_head_channels != -1, "pool='attention' needs num_head_channels"
            self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        elif pool == "spatial_v2":
            self.out = nn.Sequential(nn.Linear(self._feature_size, 2048), normalization(2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))
        else:
            raise NotImplementedError(f"Unexpected {pool} pooling")
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W), (B,) -> (B, out_channels) logits."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        results, h = [], x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(results, dim=-1))
        return self.out(h.type(x.dtype))
