"""Our `UNetModel` <-> diffusers' `UNet2DConditionModel` (cross-attention UNets: SD v1/v2,
the LDM-zoo text / class / layout models) or `UNet2DModel` (pixel-attention UNets of the LDM
zoo: unconditional and `num_classes` models, legacy attention, scale-shift norm, resblock
up/down, `num_head_channels`).

The structure is read from the built module (not re-derived from the YAML), so every quirk of
the original head arithmetic is honoured. What diffusers cannot express (per-block head widths
in a pixel-attention UNet, attention on only some blocks of a level, 1-D/3-D UNets, ...)
raises `InteropError` naming the reason.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.interop.keymap import InteropError, Rule, module_rules, rename, split_qkv, squeeze_to_linear
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import (AttentionBlock, Downsample, QKVAttentionLegacy, ResBlock,
                                                      UNetModel, Upsample)

RESBLOCK_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _level_layout(unet: UNetModel) -> list[dict[str, Any]]:
    """Per level: channels, res blocks, attention modules of down and up path, resampler kind."""
    levels, idx = [], 1
    n = len(unet.channel_mult)
    for level, mult in enumerate(unet.channel_mult):
        down = []
        for _ in range(unet.num_res_blocks[level]):
            down.append((idx, list(unet.input_blocks[idx])))
            idx += 1
        sampler = None
        if level != n - 1:
            sampler = (idx, unet.input_blocks[idx][0])
            idx += 1
        levels.append({"ch": unet.model_channels * mult, "down": down, "downsampler": sampler, "up": []})
    idx = 0
    for level in reversed(range(n)):
        for _ in range(unet.num_res_blocks[level] + 1):
            levels[level]["up"].append((idx, list(unet.output_blocks[idx])))
            idx += 1
    return levels


def _attn_of(layers: list) -> Optional[torch.nn.Module]:
    found = [m for m in layers if isinstance(m, (SpatialTransformer, AttentionBlock))]
    return found[0] if found else None


def _resample_kind(m: torch.nn.Module, what: str) -> str:
    if isinstance(m, ResBlock):
        return "resnet"
    if isinstance(m, (Downsample, Upsample)):
        if not m.use_conv:
            raise InteropError(f"{what}: conv_resample=False (resampling without convolution) has no diffusers "
                               "equivalent in UNet2DModel / UNet2DConditionModel")
        return "conv"
    raise InteropError(f"{what}: {type(m).__name__} resampling has no diffusers equivalent")


def _level_attention(level: dict, i: int) -> Optional[list]:
    """The attention modules of a level (down blocks then up blocks), None if it has none;
    raises if only some blocks of the level have attention (diffusers: all or none)."""
    down = [_attn_of(layers) for _, layers in level["down"]]
    up = [_attn_of(layers) for _, layers in level["up"]]
    if all(a is None for a in down + up):
        return None
    if any(a is None for a in down + up):
        raise InteropError(f"level {i}: attention on only some of its blocks (num_attention_blocks) cannot be "
                           "expressed in diffusers, whose blocks have attention on all layers or none")
    return down + up


def _check_common(unet: UNetModel) -> None:
    if unet.input_blocks[0][0].weight.ndim != 4:
        raise InteropError("only 2-D UNets (dims=2) have a diffusers counterpart")
    if unet.predict_codebook_ids:
        raise InteropError("n_embed (codebook-id prediction head) has no diffusers counterpart")


def _heads_of(attn: torch.nn.Module) -> tuple[int, int]:
    """(heads, channels per head) of an attention module."""
    if isinstance(attn, SpatialTransformer):
        a = attn.transformer_blocks[0].attn1
        return a.heads, a.dim_head
    return attn.num_heads, attn.channels // attn.num_heads


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------
def diffusers_unet_config(unet: UNetModel) -> tuple[str, dict[str, Any]]:
    """("UNet2DConditionModel" | "UNet2DModel", its config) for our UNet, or InteropError."""
    _check_common(unet)
    levels = _level_layout(unet)
    attn = [_level_attention(lv, i) for i, lv in enumerate(levels)]
    mid_attn = unet.middle_block[1]
    spatial = isinstance(mid_attn, SpatialTransformer)
    kinds = {_resample_kind(lv["downsampler"][1], f"level {i} downsampler")
             for i, lv in enumerate(levels) if lv["downsampler"]}
    resample = kinds.pop() if len(kinds) == 1 else "conv"
    if kinds:
        raise InteropError("mixed resampler kinds across levels")
    scale_shift = unet.middle_block[0].use_scale_shift_norm
    common = dict(sample_size=unet.image_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
                  flip_sin_to_cos=True, freq_shift=0, block_out_channels=[lv["ch"] for lv in levels],
                  downsample_padding=1, norm_num_groups=32, norm_eps=1e-5, dropout=float(unet.dropout),
                  act_fn="silu", resnet_time_scale_shift="scale_shift" if scale_shift else "default")
    if spatial:
        return "UNet2DConditionModel", _cond_config(unet, levels, attn, mid_attn, resample, common)
    return "UNet2DModel", _pixel_config(unet, levels, attn, mid_attn, resample, common)


def _cond_config(unet, levels, attn, mid_attn, resample, common) -> dict[str, Any]:
    if resample != "conv":
        raise InteropError("resblock_updown=True with cross-attention: diffusers' UNet2DConditionModel resamples "
                           "with convolutions only (its ResnetDownsample blocks have no cross-attention)")
    blocks = [a[0] if a else None for a in attn]
    if any(b is not None and not isinstance(b, SpatialTransformer) for b in blocks):
        raise InteropError("a UNet mixing pixel attention and cross-attention has no diffusers counterpart")
    heads, depth, only_cross, ctx, linear = [], [], [], set(), set()
    mid_heads = _heads_of(mid_attn)[0]
    for i, (lv, a) in enumerate(zip(levels, attn)):
        if a is None:   # values unused by attention-free blocks, but the last level's are the middle's
            heads.append(mid_heads)
            depth.append(len(mid_attn.transformer_blocks))
            only_cross.append(False)
            continue
        h, d = _heads_of(a[0])
        if h * d != lv["ch"] or any(_heads_of(m) != (h, d) for m in a):
            raise InteropError(f"level {i}: attention width heads*dim_head={h}*{d} != {lv['ch']} channels; "
                               "diffusers' Transformer2DModel needs them equal")
        depths = {len(m.transformer_blocks) for m in a}
        if len(depths) > 1:
            raise InteropError(f"level {i}: transformer depths {sorted(depths)} differ between down and up blocks")
        heads.append(h)
        depth.append(depths.pop())
        only_cross.append(bool(a[0].transformer_blocks[0].disable_self_attn))
        for m in a:
            ctx.add(m.transformer_blocks[0].attn2.to_k.in_features)
            linear.add(bool(m.use_linear))
    h, d = _heads_of(mid_attn)
    if h != heads[-1] or h * d != levels[-1]["ch"]:
        raise InteropError("middle block heads differ from the last level's; no diffusers counterpart")
    if len(mid_attn.transformer_blocks) != depth[-1]:
        raise InteropError("middle block transformer depth differs from the last level's; diffusers uses one")
    ctx.add(mid_attn.transformer_blocks[0].attn2.to_k.in_features)
    linear.add(bool(mid_attn.use_linear))
    if len(ctx) != 1 or len(linear) != 1:
        raise InteropError(f"per-block context widths {sorted(ctx)} / linear projections: one value needed")
    nrb = list(unet.num_res_blocks)
    cfg = dict(common,
               down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
               up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn][::-1],
               mid_block_type="UNetMidBlock2DCrossAttn",
               layers_per_block=nrb[0] if len(set(nrb)) == 1 else nrb,
               cross_attention_dim=ctx.pop(), attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
               transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
               use_linear_projection=linear.pop(),
               only_cross_attention=only_cross[0] if len(set(only_cross)) == 1 else only_cross,
               mid_block_only_cross_attention=bool(mid_attn.transformer_blocks[0].disable_self_attn),
               upcast_attention=False)
    cfg.update(_class_config(unet, conditional=True))
    return cfg


def _pixel_config(unet, levels, attn, mid_attn, resample, common) -> dict[str, Any]:
    nrb = set(unet.num_res_blocks)
    if len(nrb) != 1:
        raise InteropError(f"per-level num_res_blocks {unet.num_res_blocks}: UNet2DModel has one layers_per_block")
    head_dims = {_heads_of(m)[1] for a in attn if a for m in a} | {_heads_of(mid_attn)[1]}
    if len(head_dims) != 1:
        raise InteropError(f"attention head widths {sorted(head_dims)} differ between blocks (num_heads with "
                           "varying channels): diffusers' UNet2DModel has one attention_head_dim for all blocks; "
                           "only num_head_channels UNets (or one attention width) can be exported")
    orders = {type(m.attention) for a in attn if a for m in a} | {type(mid_attn.attention)}
    if len(orders) != 1:
        raise InteropError("mixed legacy / new attention orders")
    down = {"conv": ("DownBlock2D", "AttnDownBlock2D"), "resnet": ("ResnetDownsampleBlock2D", "AttnDownBlock2D")}
    up = {"conv": ("UpBlock2D", "AttnUpBlock2D"), "resnet": ("ResnetUpsampleBlock2D", "AttnUpBlock2D")}
    cfg = dict(common,
               down_block_types=[down[resample][a is not None] for a in attn],
               up_block_types=[up[resample][a is not None] for a in attn][::-1],
               mid_block_type="UNetMidBlock2D", layers_per_block=nrb.pop(), attention_head_dim=head_dims.pop(),
               attn_norm_num_groups=32, add_attention=True, downsample_type=resample, upsample_type=resample,
               mid_block_scale_factor=1, center_input_sample=False, time_embedding_type="positional")
    cfg.update(_class_config(unet, conditional=False))
    return cfg


def _class_config(unet: UNetModel, conditional: bool) -> dict[str, Any]:
    if unet.num_classes is None:
        return {}
    if isinstance(unet.num_classes, int):
        return {"num_class_embeds": unet.num_classes}
    if unet.num_classes == "sequential" and conditional:
        return {"class_embed_type": "projection",
                "projection_class_embeddings_input_dim": unet.label_emb[0][0].in_features}
    raise InteropError(f"num_classes={unet.num_classes!r} has no diffusers counterpart for this UNet")


# ----------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------
def _attention_rules(m: torch.nn.Module, ours: str, theirs: str) -> list[Rule]:
    if isinstance(m, SpatialTransformer):
        # same sub-module names in diffusers' Transformer2DModel / BasicTransformerBlock
        return [rename(ours + k, theirs + k) for k in m.state_dict()]
    heads_first = isinstance(m.attention, QKVAttentionLegacy)
    q = [f"{theirs}to_{s}" for s in "qkv"]
    return [rename(ours + "norm.weight", theirs + "group_norm.weight"),
            rename(ours + "norm.bias", theirs + "group_norm.bias"),
            split_qkv(ours + "qkv.weight", [k + ".weight" for k in q], m.num_heads, heads_first),
            split_qkv(ours + "qkv.bias", [k + ".bias" for k in q], m.num_heads, heads_first),
            squeeze_to_linear(ours + "proj_out.weight", theirs + "to_out.0.weight", 3),
            rename(ours + "proj_out.bias", theirs + "to_out.0.bias")]


def _resampler_rules(m: torch.nn.Module, ours: str, theirs: str) -> list[Rule]:
    if isinstance(m, ResBlock):
        return module_rules(m, ours, theirs, RESBLOCK_NAMES)
    return module_rules(m, ours, theirs, {"op": "conv", "conv": "conv"})


def unet_rules(unet: UNetModel, prefix: str = "") -> list[Rule]:
    """Rules mapping `prefix + <our UNet key>` <-> `<diffusers UNet key>`."""
    diffusers_unet_config(unet)   # validates the structure
    p = prefix
    rules = module_rules(unet.time_embed, p + "time_embed.", "time_embedding.", {"0": "linear_1", "2": "linear_2"})
    rules += [rename(f"{p}input_blocks.0.0.{k}", f"conv_in.{k}") for k in unet.input_blocks[0][0].state_dict()]
    if isinstance(unet.num_classes, int):
        rules += [rename(f"{p}label_emb.{k}", f"class_embedding.{k}") for k in unet.label_emb.state_dict()]
    elif unet.num_classes is not None:
        rules += module_rules(unet.label_emb, p + "label_emb.", "class_embedding.",
                              {"0.0": "linear_1", "0.2": "linear_2"})
    n = len(unet.channel_mult)
    for i, lv in enumerate(_level_layout(unet)):
        for j, (idx, layers) in enumerate(lv["down"]):
            rules += module_rules(layers[0], f"{p}input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}.",
                                  RESBLOCK_NAMES)
            if len(layers) > 1:
                rules += _attention_rules(layers[1], f"{p}input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}.")
        if lv["downsampler"]:
            idx, m = lv["downsampler"]
            rules += _resampler_rules(m, f"{p}input_blocks.{idx}.0.", f"down_blocks.{i}.downsamplers.0.")
        u = n - 1 - i
        for j, (idx, layers) in enumerate(lv["up"]):
            rules += module_rules(layers[0], f"{p}output_blocks.{idx}.0.", f"up_blocks.{u}.resnets.{j}.",
                                  RESBLOCK_NAMES)
            pos = 1
            if len(layers) > pos and isinstance(layers[pos], (SpatialTransformer, AttentionBlock)):
                rules += _attention_rules(layers[pos], f"{p}output_blocks.{idx}.{pos}.",
                                          f"up_blocks.{u}.attentions.{j}.")
                pos += 1
            if len(layers) > pos:
                rules += _resampler_rules(layers[pos], f"{p}output_blocks.{idx}.{pos}.", f"up_blocks.{u}.upsamplers.0.")
    rules += module_rules(unet.middle_block[0], p + "middle_block.0.", "mid_block.resnets.0.", RESBLOCK_NAMES)
    rules += _attention_rules(unet.middle_block[1], p + "middle_block.1.", "mid_block.attentions.0.")
    rules += module_rules(unet.middle_block[2], p + "middle_block.2.", "mid_block.resnets.1.", RESBLOCK_NAMES)
    rules += module_rules(unet.out, p + "out.", "", {"0": "conv_norm_out", "2": "conv_out"})
    return rules


# ----------------------------------------------------------------------------------------
# Import: a diffusers UNet config -> our UNetModel params
# ----------------------------------------------------------------------------------------
def _per_level(v: Any, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_params_from_diffusers(kind: str, c: dict[str, Any]) -> dict[str, Any]:
    """Our UNetModel params (the original's YAML keys) for a diffusers UNet config."""
    boc = list(c["block_out_channels"])
    n = len(boc)
    mc = boc[0]
    if any(b % mc for b in boc):
        raise InteropError(f"block_out_channels {boc} are not multiples of the first; no channel_mult")
    down = list(c["down_block_types"])
    attn_levels = [i for i, t in enumerate(down) if t.startswith(("CrossAttn", "Attn"))]
    p: dict[str, Any] = dict(image_size=c.get("sample_size") or 32, in_channels=c["in_channels"],
                             out_channels=c["out_channels"], model_channels=mc,
                             attention_resolutions=[2 ** i for i in attn_levels],
                             num_res_blocks=c["layers_per_block"], channel_mult=[b // mc for b in boc])
    if c.get("dropout"):
        p["dropout"] = c["dropout"]
    if c.get("resnet_time_scale_shift") == "scale_shift":
        p["use_scale_shift_norm"] = True
    if kind == "UNet2DConditionModel":
        heads = _per_level(c.get("num_attention_heads") or c["attention_head_dim"], n)
        hd = [b // h for b, h in zip(boc, heads)]
        if len(set(hd[i] for i in attn_levels + [n - 1])) == 1:
            p.update(num_head_channels=hd[n - 1], legacy=False)
        elif len(set(heads[i] for i in attn_levels + [n - 1])) == 1:
            p.update(num_heads=heads[n - 1], legacy=False)
        else:
            raise InteropError(f"attention heads {heads} over widths {boc}: neither a constant head count nor a "
                               "constant head width, which our UNet config cannot express")
        depth = c.get("transformer_layers_per_block", 1)
        if isinstance(depth, (list, tuple)) and len(set(depth)) > 1:
            raise InteropError(f"per-level transformer depths {depth} are not supported by our UNetModel")
        depth = depth[0] if isinstance(depth, (list, tuple)) else depth
        p.update(use_spatial_transformer=True, transformer_depth=depth, context_dim=c["cross_attention_dim"])
        if c.get("use_linear_projection"):
            p["use_linear_in_transformer"] = True
        oc = c.get("only_cross_attention", False)
        if any(_per_level(oc, n)):
            p["disable_self_attentions"] = _per_level(oc, n)
        if c.get("mid_block_only_cross_attention"):
            p["disable_middle_self_attn"] = True
        if c.get("class_embed_type") == "projection":
            p.update(num_classes="sequential", adm_in_channels=c["projection_class_embeddings_input_dim"])
    else:
        p.update(num_head_channels=c["attention_head_dim"])
        if c.get("downsample_type") == "resnet":
            p["resblock_updown"] = True
    if c.get("num_class_embeds"):
        p["num_classes"] = c["num_class_embeds"]
    return p
