"""Our first stages <-> diffusers: `AutoencoderKL` <-> `AutoencoderKL`, `VQModel` /
`VQModelInterface` <-> `VQModel`. Encoder / decoder trees are walked level by level; the 1x1
convolutions of our attention blocks become diffusers' Linear q/k/v/out (a reshape)."""
from __future__ import annotations

from typing import Any

import torch

from ldm.interop.keymap import InteropError, Rule, module_rules, rename, squeeze_to_linear
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder, ResnetBlock

RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "nin_shortcut": "conv_shortcut"}
FIRST_STAGE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def _resnet_rules(m: torch.nn.Module, ours: str, theirs: str) -> list[Rule]:
    if not isinstance(m, ResnetBlock):
        raise InteropError(f"'{ours}': {type(m).__name__} has no diffusers counterpart")
    if getattr(m, "use_conv_shortcut", False) and m.in_channels != m.out_channels:
        raise InteropError(f"'{ours}': a 3x3 conv shortcut has no diffusers counterpart")
    return module_rules(m, ours, theirs, RESNET_NAMES)


def _attn_rules(m: torch.nn.Module, ours: str, theirs: str) -> list[Rule]:
    if not isinstance(m, AttnBlock):
        raise InteropError(f"'{ours}': attention type {type(m).__name__} has no diffusers counterpart "
                           "(only attn_type 'vanilla')")
    rules = [rename(ours + "norm.weight", theirs + "group_norm.weight"),
             rename(ours + "norm.bias", theirs + "group_norm.bias")]
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        rules += [squeeze_to_linear(f"{ours}{a}.weight", f"{theirs}{b}.weight", 4),
                  rename(f"{ours}{a}.bias", f"{theirs}{b}.bias")]
    return rules


def _mid_rules(mid: torch.nn.Module, ours: str, theirs: str) -> list[Rule]:
    return (_resnet_rules(mid.block_1, ours + "block_1.", theirs + "resnets.0.")
            + _attn_rules(mid.attn_1, ours + "attn_1.", theirs + "attentions.0.")
            + _resnet_rules(mid.block_2, ours + "block_2.", theirs + "resnets.1."))


def encoder_rules(enc: Encoder, ours: str, theirs: str) -> list[Rule]:
    rules = [rename(f"{ours}conv_in.{k}", f"{theirs}conv_in.{k}") for k in ("weight", "bias")]
    for i, level in enumerate(enc.down):
        for j, block in enumerate(level.block):
            rules += _resnet_rules(block, f"{ours}down.{i}.block.{j}.", f"{theirs}down_blocks.{i}.resnets.{j}.")
        for j, attn in enumerate(level.attn):
            rules += _attn_rules(attn, f"{ours}down.{i}.attn.{j}.", f"{theirs}down_blocks.{i}.attentions.{j}.")
        if hasattr(level, "downsample"):
            rules += module_rules(level.downsample, f"{ours}down.{i}.downsample.",
                                  f"{theirs}down_blocks.{i}.downsamplers.0.", {"conv": "conv"})
    rules += _mid_rules(enc.mid, ours + "mid.", theirs + "mid_block.")
    rules += [rename(f"{ours}norm_out.{k}", f"{theirs}conv_norm_out.{k}") for k in ("weight", "bias")]
    rules += [rename(f"{ours}conv_out.{k}", f"{theirs}conv_out.{k}") for k in ("weight", "bias")]
    return rules


def decoder_rules(dec: Decoder, ours: str, theirs: str) -> list[Rule]:
    n = len(dec.up)
    rules = [rename(f"{ours}conv_in.{k}", f"{theirs}conv_in.{k}") for k in ("weight", "bias")]
    rules += _mid_rules(dec.mid, ours + "mid.", theirs + "mid_block.")
    for i, level in enumerate(dec.up):
        u = n - 1 - i
        for j, block in enumerate(level.block):
            rules += _resnet_rules(block, f"{ours}up.{i}.block.{j}.", f"{theirs}up_blocks.{u}.resnets.{j}.")
        for j, attn in enumerate(level.attn):
            rules += _attn_rules(attn, f"{ours}up.{i}.attn.{j}.", f"{theirs}up_blocks.{u}.attentions.{j}.")
        if hasattr(level, "upsample"):
            rules += module_rules(level.upsample, f"{ours}up.{i}.upsample.",
                                  f"{theirs}up_blocks.{u}.upsamplers.0.", {"conv": "conv"})
    rules += [rename(f"{ours}norm_out.{k}", f"{theirs}conv_norm_out.{k}") for k in ("weight", "bias")]
    rules += [rename(f"{ours}conv_out.{k}", f"{theirs}conv_out.{k}") for k in ("weight", "bias")]
    return rules


def is_vq(model: torch.nn.Module) -> bool:
    return hasattr(model, "quantize")


def _check_levels(model: torch.nn.Module) -> None:
    enc, dec = model.encoder, model.decoder
    for what, levels in (("encoder", enc.down), ("decoder", dec.up)):
        for i, level in enumerate(levels):
            if len(level.attn) not in (0, len(level.block)):
                raise InteropError(f"{what} level {i}: attention on only some blocks")
    if getattr(dec, "give_pre_end", False) or getattr(dec, "tanh_out", False):
        raise InteropError("decoder give_pre_end / tanh_out have no diffusers counterpart")


def first_stage_rules(model: torch.nn.Module, prefix: str = "") -> list[Rule]:
    """Rules for `prefix + <our first-stage key>` <-> `<diffusers VAE / VQModel key>`."""
    _check_levels(model)
    rules = encoder_rules(model.encoder, prefix + "encoder.", "encoder.")
    rules += decoder_rules(model.decoder, prefix + "decoder.", "decoder.")
    for conv in ("quant_conv", "post_quant_conv"):
        rules += [rename(f"{prefix}{conv}.{k}", f"{conv}.{k}") for k in ("weight", "bias")]
    if is_vq(model):
        rules += [rename(prefix + "quantize.embedding.weight", "quantize.embedding.weight")]
        if model.quantize.state_dict().keys() - {"embedding.weight"}:
            raise InteropError("the quantizer holds more than its codebook (remap / EMA codebook): "
                               "no diffusers VectorQuantizer counterpart")
    return rules


def _block_types(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    down = ["AttnDownEncoderBlock2D" if len(level.attn) else "DownEncoderBlock2D" for level in model.encoder.down]
    up = ["AttnUpDecoderBlock2D" if len(level.attn) else "UpDecoderBlock2D" for level in model.decoder.up][::-1]
    return down, up


def diffusers_vae_config(model: torch.nn.Module, scaling_factor: float) -> tuple[str, dict[str, Any]]:
    """("AutoencoderKL" | "VQModel", config) for our first stage."""
    _check_levels(model)
    enc = model.encoder
    ch, mult = enc.ch, [int(m) for m in enc.in_ch_mult[1:]]
    nrb = enc.num_res_blocks
    z = model.post_quant_conv.out_channels
    down, up = _block_types(model)
    if len(model.decoder.up[0].block) != nrb + 1:
        raise InteropError("decoder and encoder num_res_blocks differ")
    cfg: dict[str, Any] = dict(in_channels=enc.in_channels, out_channels=model.decoder.conv_out.out_channels,
                               down_block_types=down, up_block_types=up, block_out_channels=[ch * m for m in mult],
                               layers_per_block=nrb, act_fn="silu", latent_channels=z, norm_num_groups=32,
                               sample_size=enc.resolution, scaling_factor=float(scaling_factor))
    embed_dim = model.post_quant_conv.in_channels
    if is_vq(model):
        cfg.update(num_vq_embeddings=model.quantize.embedding.num_embeddings, vq_embed_dim=embed_dim,
                   norm_type="group")
        return "VQModel", cfg
    if embed_dim != z:
        raise InteropError(f"AutoencoderKL with embed_dim {embed_dim} != z_channels {z}: diffusers' quant_conv "
                           "maps 2*latent_channels to itself")
    return "AutoencoderKL", cfg


def first_stage_config_from_diffusers(kind: str, c: dict[str, Any], target: str | None = None) -> dict[str, Any]:
    """Our first-stage config (target + params, lossconfig Identity) for a diffusers VAE config."""
    boc = list(c["block_out_channels"])
    ch = boc[0]
    if any(b % ch for b in boc):
        raise InteropError(f"VAE block_out_channels {boc} are not multiples of the first")
    res = c.get("sample_size") or 256
    res = res[0] if isinstance(res, (list, tuple)) else res
    attn_res = [res // 2 ** i for i, t in enumerate(c["down_block_types"]) if t.startswith("Attn")]
    up_attn = [res // 2 ** i for i, t in enumerate(reversed(c["up_block_types"])) if t.startswith("Attn")]
    if attn_res != up_attn:
        raise InteropError("encoder and decoder attention levels differ; our ddconfig has one attn_resolutions")
    z = c["latent_channels"]
    dd = dict(double_z=kind == "AutoencoderKL", z_channels=z, resolution=res, in_channels=c["in_channels"],
              out_ch=c["out_channels"], ch=ch, ch_mult=[b // ch for b in boc], num_res_blocks=c["layers_per_block"],
              attn_resolutions=attn_res, dropout=0.0)
    params: dict[str, Any] = {"ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}
    if kind == "VQModel":
        params.update(embed_dim=c.get("vq_embed_dim") or z, n_embed=c["num_vq_embeddings"])
        target = target or "ldm.models.autoencoder.VQModel"
    else:
        params["embed_dim"] = z
        target = target or "ldm.models.autoencoder.AutoencoderKL"
    return {"target": target, "params": params}
