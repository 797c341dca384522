"""Convolutional encoder / decoder of the first-stage autoencoders (KL and VQ).

The attribute tree is the original's, so released checkpoints load strictly:
`encoder.down.<level>.block.<i>.conv1`, `encoder.down.<level>.attn.<i>.q`,
`encoder.down.<level>.downsample.conv`, `encoder.mid.block_1`, `encoder.mid.attn_1.proj_out`,
`decoder.up.<level>.upsample.conv`, `decoder.norm_out`, ...  `decoder.up` is indexed by
resolution level (0 = full resolution) although it is built from the lowest level up.

Self-attention keeps the original 1x1-conv q/k/v/proj_out weights and runs through
`torch.nn.functional.scaled_dot_product_attention` (one head, channel dimension as head
dimension, so the default 1/sqrt(C) scale is the original's); the 1x1 convolutions run as
batched matmuls on token-major views, as the UNet's AttentionBlock does.

Speed switches (ddconfig keys, all off by default; the Encoder ignores the decoder-only ones):
`use_channels_last` (convolutions in channels_last memory format), `decode_precision`
("bf16" / "fp16": the decoder runs under autocast and returns the input's dtype) and
`decode_tile_size` / `decode_tile_overlap` (latent pixels: decode latents larger than a tile
tile by tile, blending overlaps linearly, so memory stays that of one tile plus the output;
an approximation near seams, since the middle attention block then sees one tile).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ldm import perf
from ldm.modules.diffusionmodules.openaimodel import _pointwise_from_tokens

logger = logging.getLogger(__name__)

ATTN_TYPES = ("vanilla", "vanilla-xformers", "linear", "none")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, x * sigmoid(x) as the original, in one fused kernel."""
    return F.silu(x)


def _norm_swish(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nonlinearity(norm(x)); in place on the fresh normalised tensor when no gradient is recorded."""
    h = norm(x)
    return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))


def _residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + h, accumulated into h (a layer's fresh output that autograd keeps no reference to)
    unless that would change the result's dtype (autocast: x float32, h bfloat16)."""
    return h.add_(x) if h.dtype == torch.result_type(x, h) and h.shape == x.shape else x + h


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine) as every block of the autoencoder uses."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, size): every `stride`, the last flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _edge_ramp(length: int, ramp: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """(length,) blending weight: rising linearly over `ramp` pixels at an inner edge, 1 elsewhere."""
    w = torch.ones(length, device=device)
    if ramp > 0:
        rise = (torch.arange(min(ramp, length), device=device) + 0.5) / ramp
        if not at_start:
            w[:rise.numel()] = torch.minimum(w[:rise.numel()], rise)
        if not at_end:
            w[length - rise.numel():] = torch.minimum(w[length - rise.numel():], rise.flip(0))
    return w


def tiled_decode(decode, z: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """decode(z) for a large latent z (B, C, h, w), one (tile x tile) latent tile at a time.

    Tiles overlap by `overlap` latent pixels; outputs are accumulated into the (B, C', h*f, w*f)
    image with weights ramping linearly across each overlap, then normalised. Peak memory is
    one tile's activations plus the output and its weight map."""
    if not 0 <= overlap < tile:
        raise ValueError(f"decode_tile_overlap must be in [0, decode_tile_size={tile}), got {overlap}")
    h, w = z.shape[-2:]
    ys, xs = _tile_starts(h, tile, tile - overlap), _tile_starts(w, tile, tile - overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            part = decode(z[..., y0:y0 + tile, x0:x0 + tile]).float()           # (B, C', th*f, tw*f)
            th, tw = part.shape[-2:]
            wy = _edge_ramp(th, overlap * factor, y0 == 0, y0 + tile >= h, z.device)
            wx = _edge_ramp(tw, overlap * factor, x0 == 0, x0 + tile >= w, z.device)
            wt = wy[:, None] * wx[None, :]
            if out is None:
                out = part.new_zeros(*part.shape[:2], h * factor, w * factor)
                weight = part.new_zeros(h * factor, w * factor)
            ys_, xs_ = slice(y0 * factor, y0 * factor + th), slice(x0 * factor, x0 * factor + tw)
            out[..., ys_, xs_] += part * wt
            weight[ys_, xs_] += wt
    return out / weight


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (`conv`)."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return _upsample_conv(x, self.conv)


def _upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_x2(x)) for a 3x3, padding-1 conv, without making the upsampled image.

    Output pixel (2i+a, 2j+b) sees only input rows {i-1, i} (a = 0) or {i, i+1} (a = 1), and
    likewise columns, with the 3x3 taps that land on the same input pixel summed: rows
    (W0, W1+W2) for a = 0, (W0+W1, W2) for a = 1. So each of the 4 output phases is a 2x2 conv
    of x: 16 instead of 36 multiply-adds per input pixel and channel pair, same result up to
    float rounding of the summation order."""
    w, bias = conv.weight, conv.bias                                  # (O, I, 3, 3)
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),    # a = 0: rows i-1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))    # a = 1: rows i, i+1
    xp = F.pad(x, (1, 1, 1, 1))
    h, wd = x.shape[-2:]
    phases = []
    for a, wr in enumerate(rows):                                     # wr: (O, I, 2, 3)
        cols = (torch.stack([wr[..., 0], wr[..., 1] + wr[..., 2]], 3),
                torch.stack([wr[..., 0] + wr[..., 1], wr[..., 2]], 3))
        for b, k in enumerate(cols):                                  # k: (O, I, 2, 2)
            phases.append(F.conv2d(xp[..., a:a + h + 1, b:b + wd + 1], k, bias))
    out = torch.stack(phases, 2).unflatten(2, (2, 2))                 # (B, O, 2, 2, H, W): (a, b)
    out = out.permute(0, 1, 4, 2, 5, 3).reshape(x.shape[0], -1, 2 * h, 2 * wd)
    return out.contiguous(memory_format=_memory_format(x))


class Downsample(nn.Module):
    """x2 downsampling: stride-2 3x3 conv after an asymmetric (right/bottom) zero pad, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm-swish-conv, (+ timestep projection), norm-swish-dropout-conv, plus a (projected) skip."""

    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels            # input channels
        self.out_channels = out_channels          # output channels (default: same as input)
        self.use_conv_shortcut = conv_shortcut    # 3x3 conv instead of 1x1 on the skip when channels change
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:                     # 0 in the autoencoder (no timestep embedding)
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(_norm_swish(self.norm1, x))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(_norm_swish(self.norm2, h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return _residual(x, h)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual, over all H*W positions."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h_ = self.norm(x).reshape(b, c, hh * ww)                               # (B, C, T)
        # q, k, v in one batched matmul producing token-major (B, T, 3C) without a transpose
        # copy; each of q, k, v is then a (B, 1, T, C) view with a contiguous last dim (one head
        # of width C), which SDPA's fused kernels take as is
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight]).reshape(3 * c, c)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        qkv = torch.baddbmm(bias.view(1, 1, -1), h_.transpose(1, 2), w.t().expand(b, -1, -1))
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        h_ = F.scaled_dot_product_attention(q, k, v).squeeze(1)                # (B, T, C)
        out = _pointwise_from_tokens(self.proj_out, h_).reshape(b, c, hh, ww)
        return _residual(x, out.contiguous(memory_format=_memory_format(x)))


class LinAttnBlock(nn.Module):
    """Linear attention (one head of width C, no norm, no residual) as `attn_type: linear` built it."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.to_qkv = nn.Conv2d(in_channels, 3 * in_channels, 1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, c, hh * ww).unbind(1)   # each (B, C, N)
        k = k.softmax(dim=-1)
        context = torch.einsum("bdn,ben->bde", k, v)
        out = torch.einsum("bde,bdn->ben", context, q)
        return self.to_out(out.reshape(b, c, hh, ww))


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """'vanilla' (and SD2's 'vanilla-xformers': same weights) -> AttnBlock, 'linear' -> LinAttnBlock, 'none' -> Identity."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type '{attn_type}' unknown; expected one of {ATTN_TYPES}")
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    return LinAttnBlock(in_channels)


class _Stack(nn.Module):
    """Shared helper: run a sub-module, through activation checkpointing when asked and training."""

    use_checkpoint: bool = False
    use_channels_last: bool = False

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def set_channels_last(self, enabled: bool = True) -> None:
        """Convolution weights (and the activations of `forward`) in channels_last memory format."""
        self.use_channels_last = enabled
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def _input_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.use_channels_last else x


class Encoder(_Stack):
    """Image (B, in_channels, H, W) -> latent moments (B, 2*z_channels or z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", use_checkpoint: bool = False,
                 use_channels_last: bool = False, **ignore_kwargs):
        # ch: base width; ch_mult: width multiplier per resolution level (one downsampling between levels)
        # out_ch: decoder output channels (unused here; ddconfig is shared with the Decoder)
        # num_res_blocks: ResnetBlocks per level; attn_resolutions: feature sizes (e.g. 16) that get attention
        # dropout: inside ResnetBlocks; resamp_with_conv: strided conv (else avg-pool) to downsample
        # in_channels: image channels; resolution: nominal input size (only decides where attention goes)
        # z_channels: latent channels; double_z: output mean and logvar (KL) instead of one tensor (VQ)
        # use_linear_attn / attn_type: "vanilla" | "linear" | "none" attention blocks
        # use_checkpoint: activation checkpointing of every block while training (saves memory)
        # use_channels_last: convolutions in channels_last memory format (often faster on CPU / GPU)
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.use_checkpoint = use_checkpoint

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.in_ch_mult = in_ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)
        if use_channels_last:
            self.set_channels_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self._input_format(x))
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = self._run(block, h)
                if len(down.attn) > 0:
                    h = self._run(down.attn[i_block], h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        return self.conv_out(_norm_swish(self.norm_out, h)).contiguous()


class Decoder(_Stack):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla",
                 use_checkpoint: bool = False, use_channels_last: bool = False,
                 decode_precision: Optional[str] = None, decode_tile_size: Optional[int] = None,
                 decode_tile_overlap: int = 8, **ignorekwargs):
        # Same keys as Encoder (the ddconfig is shared); in addition:
        # out_ch: output image channels; give_pre_end: return features before norm_out/conv_out
        # tanh_out: squash the output with tanh; num_res_blocks + 1 ResnetBlocks per level
        # decode_precision: None (the input's dtype) | "bf16" | "fp16": autocast inside the decoder
        # decode_tile_size / decode_tile_overlap: tiled decoding of large latents (latent pixels)
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        self.use_checkpoint = use_checkpoint

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.debug("Decoder works with z of shape %s", self.z_shape)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)   # index by level: up[0] works at full resolution

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)
        self.decode_precision = decode_precision
        if decode_precision is not None:
            perf.autocast_dtype(decode_precision)      # an unknown name fails here, at build time
        self.decode_tile_size = decode_tile_size
        self.decode_tile_overlap = decode_tile_overlap
        if use_channels_last:
            self.set_channels_last()

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last_z_shape = z.shape
        amp = contextlib.nullcontext() if self.decode_precision is None else \
            perf.autocast(self.decode_precision, z.device)
        with amp:
            tile = self.decode_tile_size
            if tile is not None and (z.shape[-2] > tile or z.shape[-1] > tile):
                h = tiled_decode(self._decode, z, tile, self.decode_tile_overlap, self.upsampling_factor)
            else:
                h = self._decode(z)
        return h.to(z.dtype).contiguous()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self._input_format(z))
        h = self._run(self.mid.block_1, h)
        h = self._run(self.mid.attn_1, h)
        h = self._run(self.mid.block_2, h)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = self._run(block, h)
                if len(up.attn) > 0:
                    h = self._run(up.attn[i_block], h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(_norm_swish(self.norm_out, h))
        return torch.tanh(h) if self.tanh_out else h


# ========================================================================================
# The rest of the original module's public classes (appended; the autoencoders above do not
# use them): the DDPM pixel-space UNet `Model`, small decoders and the latent rescalers of
# the original's experiments, `FirstStagePostProcessor` (a pretrained first stage + projection).
# ========================================================================================
import math  # noqa: E402

from ldm.util import instantiate_from_config  # noqa: E402


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """DDPM's sinusoidal embedding (B,) -> (B, embedding_dim): [sin | cos] with frequencies
    10000^(-i / (half - 1)) (note: half - 1, unlike openaimodel's timestep_embedding)."""
    assert timesteps.dim() == 1
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -(math.log(10000) / (half - 1)))
    emb = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 == 1 else emb


class Model(nn.Module):
    """The DDPM (Ho et al. 2020) pixel-space UNet: ResnetBlocks with timestep embedding, attention
    at `attn_resolutions`, skip connections; input (B, in_channels, H, W), optional `context`
    concatenated on channels."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, use_timestep: bool = True, use_linear_attn: bool = False,
                 attn_type: str = "vanilla"):
        # keys as Encoder/Decoder; use_timestep: embed t (False: an unconditional network)
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch, self.temb_ch = ch, ch * 4
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels, self.use_timestep = resolution, in_channels, use_timestep
        if use_timestep:
            self.temb = nn.Module()
            self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        res_block = lambda i, o: ResnetBlock(in_channels=i, out_channels=o, temb_channels=self.temb_ch,  # noqa: E731
                                             dropout=dropout)
        curr_res, in_ch_mult = resolution, (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                down.block.append(res_block(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(make_attn(block_in, attn_type))
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = res_block(block_in, block_in)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = res_block(block_in, block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = skip_in = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]
                up.block.append(res_block(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(make_attn(block_in, attn_type))
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if context is not None:
            x = torch.cat((x, context), dim=1)
        temb = None
        if self.use_timestep:
            assert t is not None
            temb = self.temb.dense[1](nonlinearity(self.temb.dense[0](get_timestep_embedding(t, self.ch))))
        hs = [self.conv_in(x)]
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                hs.append(down.attn[i_block](h) if len(down.attn) > 0 else h)
            if i_level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))

    def get_last_layer(self) -> torch.Tensor:
        return self.conv_out.weight


class SimpleDecoder(nn.Module):
    """1x1 conv, three ResnetBlocks (x2, x4, x2 width), 1x1 conv, 2x upsampling, output conv."""

    def __init__(self, in_channels: int, out_channels: int, *args, **kwargs):
        super().__init__()
        c = in_channels
        self.model = nn.ModuleList([
            nn.Conv2d(c, c, 1),
            ResnetBlock(in_channels=c, out_channels=2 * c, temb_channels=0, dropout=0.0),
            ResnetBlock(in_channels=2 * c, out_channels=4 * c, temb_channels=0, dropout=0.0),
            ResnetBlock(in_channels=4 * c, out_channels=2 * c, temb_channels=0, dropout=0.0),
            nn.Conv2d(2 * c, c, 1),
            Upsample(c, with_conv=True)])
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model:
            x = layer(x, None) if isinstance(layer, ResnetBlock) else layer(x)
        return self.conv_out(nonlinearity(self.norm_out(x)))


class UpsampleDecoder(nn.Module):
    """num_res_blocks + 1 ResnetBlocks per level (width ch * ch_mult[level]), 2x upsampling between levels."""

    def __init__(self, in_channels: int, out_channels: int, ch: int, num_res_blocks: int, resolution: int,
                 ch_mult: Sequence[int] = (2, 2), dropout: float = 0.0):
        super().__init__()
        self.temb_ch = 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = in_channels
        self.res_blocks, self.upsample_blocks = nn.ModuleList(), nn.ModuleList()
        for i_level in range(self.num_resolutions):
            blocks = []
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch,
                                          dropout=dropout))
                block_in = block_out
            self.res_blocks.append(nn.ModuleList(blocks))
            if i_level != self.num_resolutions - 1:
                self.upsample_blocks.append(Upsample(block_in, True))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i_level, blocks in enumerate(self.res_blocks):
            for block in blocks:
                h = block(h, None)
            if i_level != self.num_resolutions - 1:
                h = self.upsample_blocks[i_level](h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class LatentRescaler(nn.Module):
    """Resize a latent by `factor` between two stacks of `depth` ResnetBlocks and an attention block."""

    def __init__(self, factor: float, in_channels: int, mid_channels: int, out_channels: int, depth: int = 2):
        super().__init__()
        self.factor = factor
        self.conv_in = nn.Conv2d(in_channels, mid_channels, kernel_size=3, stride=1, padding=1)
        block = lambda: ResnetBlock(in_channels=mid_channels, out_channels=mid_channels, temb_channels=0,  # noqa: E731
                                    dropout=0.0)
        self.res_block1 = nn.ModuleList([block() for _ in range(depth)])
        self.attn = AttnBlock(mid_channels)
        self.res_block2 = nn.ModuleList([block() for _ in range(depth)])
        self.conv_out = nn.Conv2d(mid_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.res_block1:
            x = block(x, None)
        x = F.interpolate(x, size=(int(round(x.shape[2] * self.factor)), int(round(x.shape[3] * self.factor))))
        x = self.attn(x)
        for block in self.res_block2:
            x = block(x, None)
        return self.conv_out(x)


class MergedRescaleEncoder(nn.Module):
    """Encoder (single z of ch * ch_mult[-1] channels) followed by a LatentRescaler to out_ch."""

    def __init__(self, in_channels: int, ch: int, resolution: int, out_ch: int, num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 ch_mult: Sequence[int] = (1, 2, 4, 8), rescale_factor: float = 1.0, rescale_module_depth: int = 1):
        super().__init__()
        mid = ch * ch_mult[-1]
        self.encoder = Encoder(in_channels=in_channels, num_res_blocks=num_res_blocks, ch=ch, ch_mult=ch_mult,
                               z_channels=mid, double_z=False, resolution=resolution, attn_resolutions=attn_resolutions,
                               dropout=dropout, resamp_with_conv=resamp_with_conv, out_ch=None)
        self.rescaler = LatentRescaler(factor=rescale_factor, in_channels=mid, mid_channels=mid, out_channels=out_ch,
                                       depth=rescale_module_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rescaler(self.encoder(x))


class MergedRescaleDecoder(nn.Module):
    """LatentRescaler (z_channels -> z_channels * ch_mult[-1]) followed by a Decoder."""

    def __init__(self, z_channels: int, out_ch: int, resolution: int, num_res_blocks: int,
                 attn_resolutions: Sequence[int], ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8),
                 dropout: float = 0.0, resamp_with_conv: bool = True, rescale_factor: float = 1.0,
                 rescale_module_depth: int = 1):
        super().__init__()
        mid = z_channels * ch_mult[-1]
        self.decoder = Decoder(out_ch=out_ch, z_channels=mid, attn_resolutions=attn_resolutions, dropout=dropout,
                               resamp_with_conv=resamp_with_conv, in_channels=None, num_res_blocks=num_res_blocks,
                               ch_mult=ch_mult, resolution=resolution, ch=ch)
        self.rescaler = LatentRescaler(factor=rescale_factor, in_channels=z_channels, mid_channels=mid,
                                       out_channels=mid, depth=rescale_module_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rescaler(x))


class Upsampler(nn.Module):
    """in_size -> out_size latents/images: a LatentRescaler, then a Decoder with log2(out/in) + 1 levels."""

    def __init__(self, in_size: int, out_size: int, in_channels: int, out_channels: int, ch_mult: int = 2):
        super().__init__()
        assert out_size >= in_size
        num_blocks = int(math.log2(out_size // in_size)) + 1
        factor_up = 1.0 + (out_size % in_size)
        logger.debug("Building %s with in_size %d --> out_size %d and factor %s", type(self).__name__, in_size,
                     out_size, factor_up)
        self.rescaler = LatentRescaler(factor=factor_up, in_channels=in_channels, mid_channels=2 * in_channels,
                                       out_channels=in_channels)
        self.decoder = Decoder(out_ch=out_channels, resolution=out_size, z_channels=in_channels, num_res_blocks=2,
                               attn_resolutions=[], in_channels=None, ch=in_channels,
                               ch_mult=[ch_mult for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rescaler(x))


class Resize(nn.Module):
    """Fixed interpolation by `scale_factor` (learned resizing is not implemented, as the original)."""

    def __init__(self, in_channels: Optional[int] = None, learned: bool = False, mode: str = "bilinear"):
        super().__init__()
        self.with_conv, self.mode = learned, mode
        if self.with_conv:
            raise NotImplementedError(f"{type(self).__name__}: learned resizing is not implemented")

    def forward(self, x: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
        if scale_factor == 1.0:
            return x
        return F.interpolate(x, mode=self.mode, align_corners=False, scale_factor=scale_factor)


class FirstStagePostProcessor(nn.Module):
    """A frozen pretrained first stage's latent, projected to n_channels and run through
    ResnetBlock + 2x average-pool stages (one per entry of ch_mult); reshape: (B, HW, C) tokens."""

    def __init__(self, ch_mult: Sequence[int], in_channels: int, pretrained_model: Optional[nn.Module] = None,
                 reshape: bool = False, n_channels: Optional[int] = None, dropout: float = 0.0,
                 pretrained_config: Optional[dict] = None):
        super().__init__()
        if pretrained_config is None:
            if pretrained_model is None:
                raise ValueError("pass pretrained_model or pretrained_config")
            self.pretrained_model = pretrained_model
        else:
            self.instantiate_pretrained(pretrained_config)
        self.do_reshape = reshape
        n_channels = self.pretrained_model.encoder.ch if n_channels is None else n_channels
        self.proj_norm = Normalize(in_channels, num_groups=in_channels // 2)
        self.proj = nn.Conv2d(in_channels, n_channels, kernel_size=3, stride=1, padding=1)
        blocks, downs, ch_in = [], [], n_channels
        for m in ch_mult:
            blocks.append(ResnetBlock(in_channels=ch_in, out_channels=m * n_channels, dropout=dropout))
            ch_in = m * n_channels
            downs.append(Downsample(ch_in, with_conv=False))
        self.model = nn.ModuleList(blocks)
        self.downsampler = nn.ModuleList(downs)

    def instantiate_pretrained(self, config: dict) -> None:
        self.pretrained_model = instantiate_from_config(config).eval()
        for param in self.pretrained_model.parameters():
            param.requires_grad = False

    @torch.no_grad()
    def encode_with_pretrained(self, x: torch.Tensor) -> torch.Tensor:
        c = self.pretrained_model.encode(x)
        return c.mode() if hasattr(c, "mode") and callable(c.mode) else c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = nonlinearity(self.proj(self.proj_norm(self.encode_with_pretrained(x))))
        for block, down in zip(self.model, self.downsampler):
            z = down(block(z, temb=None))
        return z.flatten(2).transpose(1, 2) if self.do_reshape else z


class MemoryEfficientAttnBlock(AttnBlock):
    """SD2's xformers AttnBlock: the same weights and math (AttnBlock already uses fused SDPA)."""


def _cross_attention_wrapper() -> type:
    from ldm.modules.attention import MemoryEfficientCrossAttention

    class MemoryEfficientCrossAttentionWrapper(MemoryEfficientCrossAttention):
        """Cross-attention over the pixels of a feature map (B, C, H, W), residual."""

        def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)                         # (B, HW, C)
            out = super().forward(tokens, context=context, mask=mask)
            return x + out.transpose(1, 2).reshape(b, c, h, w)
    return MemoryEfficientCrossAttentionWrapper


MemoryEfficientCrossAttentionWrapper = _cross_attention_wrapper()
