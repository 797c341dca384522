#!/usr/bin/env python
"""Write a random-weight checkpoint (and its config) for any model config, optionally shrunk.

  # a tiny SD v1 in the original Lightning format and as safetensors, plus tiny/config.yaml
  python scripts/make_tiny_checkpoint.py configs/stable-diffusion/v1-inference.yaml --tiny \\
      --out tiny/model.ckpt --out tiny/model.safetensors
  # the full CelebA-HQ LDM-4 architecture with random weights (e.g. for benchmarks)
  python scripts/make_tiny_checkpoint.py configs/ldm/celebahq.yaml --out celebahq/model.ckpt
  # any override (OmegaConf dot-list, applied after --tiny)
  python scripts/make_tiny_checkpoint.py CONFIG --tiny --out x.ckpt \\
      --set model.params.unet_config.params.model_channels=64

`--tiny` keeps the architecture's structure (levels, attention resolutions, conditioning,
schedule) and shrinks widths and depths: UNet 32 channels and one ResBlock per level, first
stage `ch` 32, width multipliers capped at 2, latent side 8, text / class embeddings 64-d. CLIP / OpenCLIP text encoders
become a 2-layer CLIP text model (its config is written next to the checkpoint; tokenization
stays the CLIP BPE). Parameters that the original initialises to zero (output convolutions)
are re-drawn, so that a random model's output depends on its inputs.

`.ckpt` / `.pt` outputs are Lightning checkpoints: {"state_dict", "global_step": 0, "epoch": 0};
`.safetensors` outputs hold the state dict. The config (only its `model` section, without
`ckpt_path` entries) goes to --config-out (default: config.yaml beside the first output).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm import scripting as S  # noqa: E402

CONTEXT_DIM = 64     # cross-attention width of tiny models (text / class embeddings)
LATENT_SIDE = 8      # tiny models' training latent side
ENC = "ldm.modules.encoders.modules."
CLIP_TARGETS = (ENC + "FrozenCLIPEmbedder", ENC + "FrozenOpenCLIPEmbedder")
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
TEXT_DIR = "tiny_text_encoder"


# ----------------------------------------------------------------------------------------
# The --tiny preset
# ----------------------------------------------------------------------------------------
def tiny_unet(p: dict) -> None:
    p["model_channels"] = 32
    if "channel_mult" in p:
        p["channel_mult"] = [min(int(m), 2) for m in p["channel_mult"]]
    levels = len(p.get("channel_mult", (1, 2, 4, 8)))
    p["num_res_blocks"] = [1] * levels if isinstance(p.get("num_res_blocks"), list) else 1
    p["use_checkpoint"] = False
    p["image_size"] = LATENT_SIDE
    if p.get("num_head_channels", -1) not in (-1, None):
        p["num_head_channels"] = 16
    if p.get("num_heads", -1) > 2:
        p["num_heads"] = 2
    if p.get("num_heads_upsample", -1) > 2:
        p["num_heads_upsample"] = 2
    if p.get("transformer_depth") is not None:
        p["transformer_depth"] = 1
    if p.get("context_dim") is not None:
        p["context_dim"] = CONTEXT_DIM


def tiny_first_stage(cfg: dict) -> None:
    p = cfg.setdefault("params", {})
    dd = p.get("ddconfig")
    if dd is not None:
        dd["ch"] = 32
        dd["ch_mult"] = [min(int(m), 2) for m in dd.get("ch_mult", (1, 2, 4, 4))]
        dd["num_res_blocks"] = 1
    if "n_embed" in p:
        p["n_embed"] = min(int(p["n_embed"]), 256)
    p["lossconfig"] = {"target": "torch.nn.Identity"}


def tiny_text_encoder(out_dir: Path) -> dict:
    """A 2-layer CLIP text model (random weights) whose config lives in out_dir/tiny_text_encoder."""
    from transformers import CLIPTextConfig
    text_dir = (out_dir / TEXT_DIR).resolve()
    CLIPTextConfig(vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=2 * CONTEXT_DIM,
                   projection_dim=CONTEXT_DIM, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1,
                   eos_token_id=2).save_pretrained(text_dir)
    return {"target": ENC + "FrozenCLIPEmbedder", "params": {"version": str(text_dir), "pretrained": False}}


def tiny_cond_stage(cfg: Any, out_dir: Path) -> Any:
    if not isinstance(cfg, dict):          # "__is_first_stage__" / "__is_unconditional__"
        return cfg
    target, p = cfg.get("target", ""), cfg.setdefault("params", {})
    if target in CLIP_TARGETS:
        return tiny_text_encoder(out_dir)
    if target.endswith(".ClassEmbedder"):
        p["embed_dim"] = CONTEXT_DIM
    elif target.endswith((".BERTEmbedder", ".TransformerEmbedder")):
        p["n_embed"], p["n_layer"] = CONTEXT_DIM, 1
    elif target.endswith((".AutoencoderKL", ".VQModel", ".VQModelInterface")):
        tiny_first_stage(cfg)
    return cfg


def tiny_model(model: dict, out_dir: Path) -> dict:
    """The --tiny preset applied to a `model:` section (a copy)."""
    model = copy.deepcopy(model)
    if model.get("target") == UNET_TARGET:
        tiny_unet(model.setdefault("params", {}))
        return model
    p = model.setdefault("params", {})
    if "ddconfig" in p:                     # an autoencoder on its own
        tiny_first_stage(model)
        return model
    if "image_size" in p:
        p["image_size"] = LATENT_SIDE
    if "unet_config" in p:
        tiny_unet(p["unet_config"].setdefault("params", {}))
    if "first_stage_config" in p:
        tiny_first_stage(p["first_stage_config"])
    if "cond_stage_config" in p:
        p["cond_stage_config"] = tiny_cond_stage(p["cond_stage_config"], out_dir)
    return model


# ----------------------------------------------------------------------------------------
# Building and writing
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def redraw_zero_parameters(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Re-draw parameters that are exactly zero (zero_module outputs, norm biases):
    N(0, 1/fan_in) for matrices / kernels, N(0, 0.02^2) for vectors. Returns how many."""
    n = 0
    for p in model.parameters():
        if p.numel() and not p.detach().any():
            std = 1.0 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.02
            p.copy_(torch.randn(p.shape, generator=generator) * std)
            n += 1
    return n


@torch.no_grad()
def sync_ema(model: torch.nn.Module) -> None:
    """EMA shadows (LitEma `model_ema`) = the re-drawn weights of `model.model`."""
    ema, net = getattr(model, "model_ema", None), getattr(model, "model", None)
    if ema is None or net is None:
        return
    buffers = dict(ema.named_buffers())
    for name, p in net.named_parameters():
        if name in ema.m_name2s_name:
            buffers[ema.m_name2s_name[name]].copy_(p)


def make_tiny(config: Any, outs: Sequence[Path], *, tiny: bool = True, overrides: Sequence[str] = (),
              seed: int = 0, config_out: Optional[Path] = None) -> Path:
    """Build `config` (a path or mapping) shrunk by --tiny and `overrides`, with random weights
    seeded by `seed`; write each of `outs` (.ckpt/.pt: Lightning format, .safetensors) and the
    config. Returns the config path."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import save_safetensors
    from ldm.util import instantiate_from_config
    outs = [Path(o) for o in outs]
    if not outs:
        S.fail("give at least one --out (.ckpt, .pt or .safetensors)")
    bad = [str(o) for o in outs if o.suffix not in (".ckpt", ".pt", ".safetensors")]
    if bad:
        S.fail(f"--out must end in .ckpt, .pt or .safetensors: {', '.join(bad)}")
    cfg = S.load_config(config) if not isinstance(config, dict) else copy.deepcopy(config)
    out_dir = outs[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = S.strip_ckpt_paths(cfg["model"])
    if tiny:
        model_cfg = tiny_model(model_cfg, out_dir)
    merged = OmegaConf.merge({"model": model_cfg}, OmegaConf.from_dotlist(list(overrides)))
    cfg_out = Path(config_out) if config_out is not None else out_dir / "config.yaml"
    cfg_out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(merged, cfg_out)
    torch.manual_seed(seed)
    with S.clear_errors(), S.random_hub_weights():
        model = instantiate_from_config(OmegaConf.to_container(merged.model, resolve=True))
    redraw_zero_parameters(model, torch.Generator().manual_seed(seed))
    sync_ema(model)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            save_safetensors(state_dict, out)
        else:
            torch.save({"state_dict": state_dict, "global_step": 0, "epoch": 0}, out)
    return cfg_out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="model config (YAML with a `model:` section), e.g. an original or ours")
    p.add_argument("--out", action="append", required=True, type=Path,
                   help="output checkpoint (.ckpt / .pt: Lightning format; .safetensors); repeatable")
    p.add_argument("--tiny", action="store_true", help="shrink widths and depths (see above)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.params.unet_config.params.model_channels=64; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--config-out", "--config_out", dest="config_out", type=Path,
                   help="where to write the config (default: config.yaml beside the first --out)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    opt = parser().parse_args(argv)
    cfg_out = make_tiny(opt.config, opt.out, tiny=opt.tiny, overrides=opt.overrides, seed=opt.seed,
                        config_out=opt.config_out)
    print("wrote " + ", ".join(str(o) for o in [*opt.out, cfg_out]))
    return cfg_out


if __name__ == "__main__":
    main()
