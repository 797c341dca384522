"""Whole models <-> diffusers folders.

`export_diffusers(model, config, out_dir)` writes unet/, vae/ (or vqvae/), text_encoder/ +
tokenizer/ or class_embedder/, scheduler/ and model_index.json for
- text-conditional LDMs (SD v1/v2-style, CLIP text encoder) -> StableDiffusionPipeline,
- unconditional LDMs -> LDMPipeline,
- class-conditional LDMs -> ldm.interop.pipelines.LDMClassConditionalPipeline,
and a first stage on its own as a single AutoencoderKL / VQModel folder. Our config is stored
beside them as ldm_config.yaml (information diffusers has no field for).

`import_diffusers(dir)` -> (our config in the original YAML layout, strict-loading state dict).
It derives the config from the diffusers configs (so folders from elsewhere work), unless
`use_stored_config` and ldm_config.yaml is present.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.interop.autoencoder import (FIRST_STAGE_PARTS, diffusers_vae_config, first_stage_config_from_diffusers,
                                     first_stage_rules)
from ldm.interop.keymap import InteropError, to_ours, to_theirs
from ldm.interop.unet import diffusers_unet_config, unet_params_from_diffusers, unet_rules

log = logging.getLogger(__name__)
WEIGHTS = "diffusion_pytorch_model.safetensors"
LDM_CONFIG = "ldm_config.yaml"
EXTRA = "ldm_extra.safetensors"     # our weights without a diffusers place, under our keys
INDEX_COND = "_ldm_cond_stage"      # our text encoder's {target, params} (diffusers ignores "_" keys)
INDEX_SCALE_BY_STD = "_ldm_scale_by_std"   # scale_factor was measured (a buffer): keep it one on import
UNET = "model.diffusion_model."
FIRST = "first_stage_model."
COND = "cond_stage_model."
PIPELINE_MODULE = "ldm.interop.pipelines"

# our beta_schedule <-> diffusers' (our "linear" is linear in sqrt(beta))
SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
def _save_model(root: Path, name: str, class_name: str, config: dict, sd: dict[str, torch.Tensor],
                dtype: Optional[torch.dtype]) -> None:
    from safetensors.torch import save_file
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    import diffusers
    (d / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": diffusers.__version__,
                                               **config}, indent=2))
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(out, str(d / WEIGHTS))


def scheduler_config(cfg: Any) -> dict[str, Any]:
    """DDIMScheduler config matching our schedule (DDIM's +1 timestep offset = steps_offset 1)."""
    p = cfg.get("params", {}) if cfg is not None else {}
    schedule = p.get("beta_schedule", "linear")
    out: dict[str, Any] = {"_class_name": "DDIMScheduler", "num_train_timesteps": int(p.get("timesteps", 1000)),
                           "beta_start": float(p.get("linear_start", 1e-4)), "beta_end": float(p.get("linear_end", 2e-2)),
                           "beta_schedule": SCHEDULES.get(schedule, "linear"), "trained_betas": None,
                           "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                           "prediction_type": PREDICTION[p.get("parameterization", "eps")],
                           "timestep_spacing": "leading", "thresholding": False}
    if p.get("given_betas") is not None or schedule not in SCHEDULES:
        from ldm.diffusion.schedule import make_beta_schedule
        betas = p.get("given_betas") or make_beta_schedule(schedule, out["num_train_timesteps"], out["beta_start"],
                                                           out["beta_end"], p.get("cosine_s", 8e-3))
        out.update(beta_schedule="linear", trained_betas=[float(b) for b in betas])
    return out


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def _weights(model: torch.nn.Module, use_ema: bool) -> dict[str, torch.Tensor]:
    """The model's state dict, with the EMA weights in place of `model.*` when asked."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if use_ema:
        ema = getattr(model, "model_ema", None)
        if ema is None:
            raise InteropError("--use-ema: the model has no EMA weights (use_ema: False in its config)")
        for name, _ in model.model.named_parameters():
            sd["model." + name] = getattr(ema, ema.m_name2s_name[name]).detach().cpu()
    return sd


def _write_index(root: Path, class_name: str, parts: dict[str, Any], extra: Optional[dict] = None) -> None:
    import diffusers
    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **parts, **(extra or {})}

    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def export_diffusers(model: torch.nn.Module, config: Any, out_dir: str | Path, *, use_ema: bool = False,
                     dtype: Optional[torch.dtype] = None) -> Path:
    """Write `model` (built from `config`, weights loaded) as a diffusers folder; returns the path."""
    from omegaconf import OmegaConf
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    model_cfg = config["model"] if "model" in config else config
    sd = _weights(model, use_ema)
    stored = OmegaConf.to_container(OmegaConf.create(model_cfg), resolve=True)
    if "use_ema" in stored.get("params", {}) or hasattr(model, "model_ema"):
        stored.setdefault("params", {})["use_ema"] = False   # the folder holds one set of weights
    _no_ckpt(stored)
    OmegaConf.save(OmegaConf.create({"model": stored}), root / LDM_CONFIG)
    if not hasattr(model, "first_stage_model"):
        if not hasattr(model, "encoder"):
            raise InteropError(f"{type(model).__name__}: neither a latent diffusion model nor an autoencoder")
        kind, cfg = diffusers_vae_config(model, 1.0)
        sd = {k: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PARTS)}
        _save_vae_root(root, kind, cfg, to_theirs(first_stage_rules(model), sd, "first stage"), dtype)
        return root
    flags = {INDEX_SCALE_BY_STD: True} if getattr(model, "scale_by_std", False) else {}
    unet = model.model.diffusion_model
    ukind, ucfg = diffusers_unet_config(unet)
    _save_model(root, "unet", ukind, ucfg, to_theirs(unet_rules(unet, UNET), _sub(sd, UNET), "unet"), dtype)
    first = model.first_stage_model
    vkind, vcfg = diffusers_vae_config(first, float(model.scale_factor))
    fsd = {k: v for k, v in _sub(sd, FIRST).items() if k[len(FIRST):].startswith(FIRST_STAGE_PARTS)}
    vname = "vqvae" if vkind == "VQModel" else "vae"
    _save_model(root, vname, vkind, vcfg, to_theirs(first_stage_rules(first, FIRST), fsd, "first stage"), dtype)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(model_cfg), indent=2))
    sched = ["diffusers", "DDIMScheduler"]
    cond = getattr(model, "cond_stage_model", None)
    ckey = model.model.conditioning_key
    if cond is None or ckey is None:
        if ukind == "UNet2DModel" and unet.num_classes is not None:
            _write_index(root, "LDMClassConditionalPipeline",
                         {"vqvae": ["diffusers", vkind], "unet": ["diffusers", ukind], "scheduler": sched,
                          "class_embedder": [None, None]}, flags)
        else:
            _write_index(root, "LDMPipeline", {"vqvae": ["diffusers", vkind], "unet": ["diffusers", ukind],
                                               "scheduler": sched}, flags)
        return root
    if ckey != "crossattn":
        raise InteropError(f"conditioning_key {ckey!r}: only cross-attention (text / class) models and "
                           "unconditional ones have a diffusers pipeline")
    from ldm.modules.encoders.modules import ClassEmbedder
    if isinstance(cond, ClassEmbedder):
        emb = cond.embedding.weight.detach().cpu()
        _save_model(root, "class_embedder", "ClassEmbedding",
                    {"num_classes": emb.shape[0], "embed_dim": emb.shape[1]}, {"embedding.weight": emb}, dtype)
        _write_index(root, "LDMClassConditionalPipeline",
                     {"vqvae": ["diffusers", vkind], "unet": ["diffusers", ukind], "scheduler": sched,
                      "class_embedder": [PIPELINE_MODULE, "ClassEmbedding"]}, flags)
        return root
    from ldm.interop.text import save_text_encoder
    arch = ((model_cfg.get("params", {}).get("cond_stage_config") or {}).get("params") or {}).get("arch", "ViT-H-14")
    extras, cond_cfg = save_text_encoder(cond, {k[len(COND):]: v for k, v in _sub(sd, COND).items()}, root, dtype,
                                         arch)
    if extras:   # weights diffusers has no place for (OpenCLIP's unused last block, projection)
        from safetensors.torch import save_file
        save_file({COND + k: v.contiguous() for k, v in extras.items()}, str(root / EXTRA))
    _write_index(root, "StableDiffusionPipeline",
                 {"vae": ["diffusers", vkind], "text_encoder": ["transformers", "CLIPTextModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", ukind], "scheduler": sched,
                  "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None]},
                 {"requires_safety_checker": False, INDEX_COND: cond_cfg, **flags})
    return root


def _save_vae_root(root: Path, kind: str, cfg: dict, sd: dict, dtype: Optional[torch.dtype]) -> None:
    from safetensors.torch import save_file
    import diffusers
    (root / "config.json").write_text(json.dumps({"_class_name": kind, "_diffusers_version": diffusers.__version__,
                                                  **cfg}, indent=2))
    save_file({k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in sd.items()}, str(root / WEIGHTS))


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
def _read_model(d: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise InteropError(f"'{cfg_file}' not found: not a diffusers model folder")
    cfg = json.loads(cfg_file.read_text())
    files = sorted(d.glob("*.safetensors"))
    if not files:
        bins = sorted(d.glob("*.bin"))
        if not bins:
            raise InteropError(f"no weights (*.safetensors / *.bin) in '{d}'")
        sd = {}
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    else:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
    return cfg.pop("_class_name"), cfg, sd


def _schedule_params(root: Path) -> dict[str, Any]:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        raise InteropError(f"'{f}' not found")
    c = json.loads(f.read_text())
    inverse = {v: k for k, v in SCHEDULES.items()}
    p: dict[str, Any] = {"linear_start": c.get("beta_start", 1e-4), "linear_end": c.get("beta_end", 2e-2),
                         "timesteps": c.get("num_train_timesteps", 1000)}
    if c.get("trained_betas"):
        p["given_betas"] = list(c["trained_betas"])
    elif c.get("beta_schedule", "linear") in inverse:
        p["beta_schedule"] = inverse[c["beta_schedule"]]
    else:
        raise InteropError(f"beta_schedule {c['beta_schedule']!r} has no counterpart in our schedules")
    pred = {v: k for k, v in PREDICTION.items()}[c.get("prediction_type", "epsilon")]
    if pred != "eps":
        p["parameterization"] = pred
    if c.get("steps_offset", 1) != 1 or c.get("set_alpha_to_one", False):
        log.warning("scheduler steps_offset=%s set_alpha_to_one=%s: our DDIM uses offset 1 and alpha_prev "
                    "alphas_cumprod[0] (sampling differs slightly)", c.get("steps_offset"), c.get("set_alpha_to_one"))
    return p


def derive_config(root: Path, text_dir: Optional[Path] = None) -> dict[str, Any]:
    """Our config ({"model": {target, params}}) for a diffusers folder, from its configs only."""
    index_file = root / "model_index.json"
    if not index_file.is_file():
        kind, c, _ = _read_model(root)
        if kind not in ("AutoencoderKL", "VQModel"):
            raise InteropError(f"'{root}': a single {kind}; only AutoencoderKL / VQModel folders are models of ours")
        return {"model": first_stage_config_from_diffusers(kind, c)}
    index = json.loads(index_file.read_text())
    ukind, ucfg, _ = _read_model(root / "unet")
    vname = "vqvae" if (root / "vqvae").is_dir() else "vae"
    vkind, vcfg, _ = _read_model(root / vname)
    first = first_stage_config_from_diffusers(
        vkind, vcfg, "ldm.models.autoencoder.VQModelInterface" if vkind == "VQModel" else None)
    unet_p = unet_params_from_diffusers(ukind, ucfg)
    down = 2 ** (len(vcfg["block_out_channels"]) - 1)
    params: dict[str, Any] = {**_schedule_params(root), "num_timesteps_cond": 1, "log_every_t": 200,
                              "first_stage_key": "image", "image_size": unet_p["image_size"],
                              "channels": unet_p["in_channels"], "monitor": "val/loss_simple_ema",
                              "use_ema": False, "scale_factor": float(vcfg.get("scaling_factor", 1.0)),
                              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                              "params": unet_p},
                              "first_stage_config": first}
    cls = index["_class_name"]
    if index.get(INDEX_SCALE_BY_STD):
        params["scale_by_std"] = True   # its buffer starts at scale_factor = the VAE's scaling_factor
    cond_cfg = index.get(INDEX_COND) or {}
    if (root / "text_encoder").is_dir() and cond_cfg.get("target", "").endswith("FrozenOpenCLIPEmbedder"):
        params.update(cond_stage_key="txt", conditioning_key="crossattn", cond_stage_trainable=False,
                      cond_stage_config={"target": cond_cfg["target"],
                                         "params": {**cond_cfg.get("params", {}), "pretrained": False}})
    elif (root / "text_encoder").is_dir():
        from ldm.interop.text import text_encoder_config_dir
        tdir = text_encoder_config_dir(root, text_dir or root / "text_encoder")
        params.update(cond_stage_key="txt", conditioning_key="crossattn", cond_stage_trainable=False,
                      cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                         "params": {"version": str(tdir), "pretrained": False}})
    elif (root / "class_embedder").is_dir():
        _, ccfg, _ = _read_model(root / "class_embedder")
        params.update(cond_stage_key="class_label", conditioning_key="crossattn", cond_stage_trainable=True,
                      cond_stage_config={"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                         "params": {"embed_dim": ccfg["embed_dim"], "n_classes": ccfg["num_classes"],
                                                    "key": "class_label"}})
    elif unet_p.get("num_classes") is not None:
        params.update(cond_stage_key="class_label", conditioning_key="adm", cond_stage_config="__is_unconditional__")
    else:
        params.update(cond_stage_key="image", cond_stage_config="__is_unconditional__")
    log.info("derived our config from a %s folder (latent f=%d)", cls, down)
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def import_diffusers(root: str | Path, *, use_stored_config: bool = False,
                     text_dir: Optional[Path] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(our config, our state dict) of a diffusers folder; the state dict loads strictly into
    the model the config builds (checked here)."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    root = Path(root)
    if not root.is_dir():
        raise InteropError(f"'{root}' is not a directory (expected a diffusers folder with model_index.json)")
    stored = root / LDM_CONFIG
    if use_stored_config and stored.is_file():
        config = OmegaConf.to_container(OmegaConf.load(stored), resolve=True)
    else:
        config = derive_config(root, text_dir)
    model_cfg = copy.deepcopy(config["model"])
    _no_ckpt(model_cfg)
    from ldm.scripting import random_hub_weights
    with random_hub_weights():
        model = instantiate_from_config(model_cfg)
    sd = _our_state_dict(root, model)
    from ldm.checkpoint import load_into
    load_into(model, sd, source=f"'{root}'")
    return config, sd


def _no_ckpt(cfg: Any) -> None:
    if isinstance(cfg, dict):
        cfg.pop("ckpt_path", None)
        for v in cfg.values():
            _no_ckpt(v)


def _our_state_dict(root: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    if not hasattr(model, "first_stage_model"):
        _, _, vsd = _read_model(root)
        sd = to_ours(first_stage_rules(model), vsd, "first stage")
        return _with_buffers(sd, own, ())
    _, _, usd = _read_model(root / "unet")
    sd = to_ours(unet_rules(model.model.diffusion_model, UNET), usd, "unet")
    vname = "vqvae" if (root / "vqvae").is_dir() else "vae"
    _, _, vsd = _read_model(root / vname)
    sd.update(to_ours(first_stage_rules(model.first_stage_model, FIRST), vsd, "first stage"))
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    if (root / "text_encoder").is_dir() and isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder):
        from ldm.interop.text import TEXT_PREFIX, clip_text_to_openclip, load_text_encoder_weights
        text = {k[len(TEXT_PREFIX):]: v for k, v in load_text_encoder_weights(root).items()}
        layers = len(model.cond_stage_model.model.transformer.resblocks) - model.cond_stage_model.layer_idx
        sd.update({COND + k: v for k, v in clip_text_to_openclip(text, layers).items()})
    elif (root / "text_encoder").is_dir():
        from ldm.interop.text import load_text_encoder_weights
        sd.update({COND + k: v for k, v in load_text_encoder_weights(root).items()})
    if (root / EXTRA).is_file():
        from safetensors.torch import load_file
        sd.update(load_file(str(root / EXTRA)))
    elif (root / "class_embedder").is_dir():
        _, _, csd = _read_model(root / "class_embedder")
        sd[COND + "embedding.weight"] = csd["embedding.weight"]
    return _with_buffers(sd, own, (UNET, FIRST, COND))


def _with_buffers(sd: dict, own: dict, weight_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Add what the config itself determines (schedule buffers, scale_factor, loss weights of
    an Identity loss: none) from the freshly built model; weights come from the folder."""
    out = dict(sd)
    for k, v in own.items():
        if k not in out and not (weight_prefixes and k.startswith(weight_prefixes)):
            out[k] = v
    # dtypes of the folder (fp16 exports) become the model's
    return {k: (v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v) for k, v in out.items()}
