"""Throughput of a LatentDiffusion config: training step, DDIM sampling, autoencoder.

    python scripts/benchmark.py --config configs/ldm/celebahq.yaml --mode train --batch 2 --resolution 64
    python scripts/benchmark.py --config <sd-v1-inference.yaml> --mode sample --resolution 32 --compare diffusers
    python scripts/benchmark.py --config ... --mode train --precision bf16 --compare eager

Any config (ours or an original one) is built with `ckpt_path` entries removed, text encoders
with random weights (LDM_RANDOM_HUB_WEIGHTS=1) and the UNet re-drawn from a seeded generator
(the zero-initialised output layers would otherwise make every prediction 0).

Modes (one iteration each):
  train        the LatentDiffusion step: latents (first-stage encode, or --cached-latents as
               scripts/cache_latents.py writes them), forward (t, noise, UNet, loss), backward,
               optimizer step, EMA update when the config uses EMA. The conditioning encoder
               is not timed: its output is made once (random text context / class embedding).
  sample       --steps DDIM steps through DDIMSampler.sample, without and (conditional models)
               with classifier-free guidance (--cfg-scale; cond and uncond in one batched call).
  autoencoder  the first stage alone (an autoencoder config, or a LatentDiffusion config's
               first_stage_config): encode of images of resolution * f, decode of latents of
               resolution (VQ: quantisation included, as VQModelInterface.decode and
               diffusers' VQModel.decode do).

Reported per variant: ms / iteration (median, min), samples/s, UNet evaluations/s (per sample),
peak memory, and with FLOPs counted once (torch.utils.flop_counter; --flops, default on CUDA)
achieved TFLOP/s and MFU against the device's peak (ldm.perf.device_peak_tflops). Peak memory
is CUDA max_memory_allocated, or on CPU the peak RSS increase during the iteration (sampled;
an estimate, see ldm.perf.PeakMemory). Variants run interleaved in one process (warm-up first,
then rounds in alternating ABBA order) so that machine load and position affect them alike;
ratios are given of the medians and as the median of per-round paired ratios.

--compare diffusers builds the equivalent diffusers models (UNet2DConditionModel for
cross-attention UNets, UNet2DModel for AttentionBlock UNets, AutoencoderKL / VQModel) with the
same weights (converted with diffusers.loaders.single_file_utils; UNet parameters are shared,
not copied, wherever the layout is identical), checks numerical agreement, and times diffusers'
equivalent: DDPMScheduler-style noising + UNet + MSE + the same optimizer; DDIMScheduler
(steps_offset=1, set_alpha_to_one=False, the model's betas) loop. diffusers is optional
(`pip install -e .[bench]`). --compare eager adds the plain float32 eager model next to the
variant chosen with --precision / --channels-last / --compile.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm import perf  # noqa: E402
from ldm.scripting import strip_ckpt_paths  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


# ----------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------
def load_config(path: str, overrides: Optional[list[str]] = None) -> Any:
    """The `model` section of a config without its ckpt_path entries, with `--set key=value`
    overrides (keys relative to `model`)."""
    cfg = OmegaConf.load(path).model
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.create(strip_ckpt_paths(OmegaConf.to_container(cfg, resolve=True)))


def load_model_config(path: str, *, checkpoint: Optional[bool], channels_last: bool, compile_unet: bool,
                      overrides: Optional[list[str]] = None) -> Any:
    cfg = load_config(path, overrides)
    unet = cfg.params.unet_config.params
    if checkpoint is not None:
        unet.use_checkpoint = checkpoint
    if channels_last:
        unet.use_channels_last = True
    if compile_unet:
        cfg.params.compile_unet = True
    return cfg


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere, as the golden fixtures draw them: N(0,1)/sqrt(fan_in) for
    matrices / kernels, 1 + 0.1 N(0,1) for norm weights, 0.1 N(0,1) for biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        z = torch.randn(p.shape, generator=g)
        if p.ndim >= 2:
            p.copy_(z / math.sqrt(p[0].numel()))
        else:
            p.copy_(1 + 0.1 * z if name.endswith("weight") else 0.1 * z)


def build_model(cfg: Any, device: torch.device, seed: int = 0) -> Any:
    from ldm import settings
    torch.manual_seed(seed)
    with settings.override(random_hub_weights=True):
        model = instantiate_from_config(cfg)
    randomize(model.model, seed)
    if getattr(model, "use_ema", False):
        model.model_ema = type(model.model_ema)(model.model)
    return model.to(device)


def build_first_stage(config: str, device: torch.device, seed: int = 0, channels_last: bool = False,
                      precision: Optional[str] = None,
                      overrides: Optional[list[str]] = None) -> tuple[Any, dict, int, Optional[int]]:
    """(first stage, ddconfig, embed_dim, n_embed or None) of an autoencoder or LatentDiffusion
    config, with random non-zero weights; `channels_last` / `precision` set the ddconfig's
    use_channels_last / decode_precision switches."""
    cfg = load_config(config, overrides)
    if "first_stage_config" in cfg.get("params", {}):
        cfg = cfg.params.first_stage_config
    cfg.params.lossconfig = {"target": "torch.nn.Identity"}
    if channels_last:
        cfg.params.ddconfig.use_channels_last = True
    if precision:
        cfg.params.ddconfig.decode_precision = precision
    torch.manual_seed(seed)
    ae = instantiate_from_config(cfg)
    randomize(ae, seed)
    p = OmegaConf.to_container(cfg.params, resolve=True)
    return ae.to(device).eval(), p["ddconfig"], int(p["embed_dim"]), p.get("n_embed")


@torch.no_grad()
def make_conditioning(model: Any, latent_shape: tuple, device: torch.device, seed: int) -> tuple[Any, Any]:
    """(c, uc): the encoded conditioning the denoiser sees, and an 'unconditional' one, made once
    (the conditioning encoder is not timed): class embeddings of random labels, or random text
    contexts (B, 77, context_dim), or random concat maps."""
    key, batch = model.model.conditioning_key, latent_shape[0]
    if key is None:
        return None, None
    model.cond_stage_trainable = False          # the embedding is computed here, not in forward
    g = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    if key == "crossattn":
        if model.cond_stage_key in ("class_label", "cls"):
            labels = torch.randint(0, model.cond_stage_model.n_classes - 1, (batch,), generator=g)
            c = model.get_learned_conditioning({model.cond_stage_model.key: labels.to(device)})
            return c, model.get_unconditional_conditioning(batch)
        dim = next(m.to_k.in_features for m in unet.modules() if type(m).__name__.endswith("CrossAttention")
                   and m.to_k.in_features != m.to_q.in_features)
        c, uc = (torch.randn(batch, 77, dim, generator=g).to(device) for _ in range(2))
        return c, uc
    if key == "concat":
        shape = (batch, unet.in_channels - model.channels, *latent_shape[2:])
        c, uc = (torch.randn(shape, generator=g).to(device) for _ in range(2))
        return c, uc
    raise NotImplementedError(f"benchmark conditioning for conditioning_key={key!r}")


# ----------------------------------------------------------------------------------------
# diffusers equivalents (optional dependency)
# ----------------------------------------------------------------------------------------
def _assign(module: torch.nn.Module, name: str, tensor: torch.Tensor, ours: dict[int, torch.nn.Parameter]) -> bool:
    """Put `tensor` at dotted `name`: our very Parameter when the converter passed it through
    unchanged (shared weights), else a copy. Returns whether it is shared."""
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    shared = ours.get(id(tensor))
    is_param = leaf in module._parameters
    if shared is not None and is_param:
        module._parameters[leaf] = shared
        return True
    value = tensor.detach().clone().contiguous()
    if is_param:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=True)
    else:
        module._buffers[leaf] = value
    return False


def _materialize(model: torch.nn.Module, state: dict[str, torch.Tensor], ours: dict[int, torch.nn.Parameter]) -> int:
    expected = set(model.state_dict().keys())
    if set(state) != expected:
        raise RuntimeError(f"diffusers conversion: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]}")
    n_shared = sum(_assign(model, k, v, ours) for k, v in state.items())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"diffusers conversion left {name} unset")
    return n_shared


def _attention_block_keys(state: dict[str, torch.Tensor], head_channels: int, new_order: bool) -> None:
    """LDM AttentionBlock (norm, qkv Conv1d, proj_out Conv1d) -> diffusers Attention keys."""
    for k in [k for k in state if ".attentions." in k]:
        pre, rest = k.split(".attentions.", 1)
        idx, leaf = rest.split(".", 1)
        base, v = f"{pre}.attentions.{idx}.", state.pop(k)
        if leaf.startswith("norm."):
            state[base + "group_norm." + leaf[5:]] = v
        elif leaf.startswith("proj_out."):
            state[base + "to_out.0." + leaf[9:]] = v[..., 0] if v.ndim == 3 else v
        elif leaf.startswith("qkv."):
            heads = v.shape[0] // 3 // head_channels
            w = v.reshape(3, heads, head_channels, *v.shape[1:]) if new_order else \
                v.reshape(heads, 3, head_channels, *v.shape[1:]).transpose(0, 1)
            for i, n in enumerate("qkv"):
                t = w[i].reshape(-1, *v.shape[1:])
                state[base + f"to_{n}." + leaf[4:]] = t[..., 0] if t.ndim == 3 else t


def diffusers_unet(unet: torch.nn.Module, params: dict[str, Any]) -> tuple[torch.nn.Module, int]:
    """The diffusers UNet equivalent to our UNetModel(**params), sharing its weights."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    defaults = {k: v.default for k, v in inspect.signature(UNetModel).parameters.items()
                if v.default is not inspect.Parameter.empty}
    params = {**defaults, **params}
    if params["disable_self_attentions"] is None:
        params.pop("disable_self_attentions")      # diffusers' helper reads the key's presence
    ours = {id(p): p for p in unet.parameters()}
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict(keep_vars=True).items()}
    mult, att = list(params.get("channel_mult", (1, 2, 4, 8))), list(params["attention_resolutions"])
    if params.get("use_spatial_transformer"):
        wrapped = {"model": {"params": {"unet_config": {"params": params},
                                        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
        cfg = create_unet_diffusers_config_from_ldm(wrapped, sd)
        cfg["sample_size"] = params.get("image_size", 32)
        cls = UNet2DConditionModel
    else:
        if params.get("num_head_channels", -1) == -1 or params.get("num_classes") is not None:
            raise NotImplementedError("diffusers UNet2DModel equivalent needs num_head_channels and no num_classes")
        levels = [2 ** i for i in range(len(mult))]
        cfg = dict(sample_size=params.get("image_size", 32), in_channels=params["in_channels"],
                   out_channels=params["out_channels"], layers_per_block=params["num_res_blocks"],
                   down_block_types=["AttnDownBlock2D" if d in att else "DownBlock2D" for d in levels],
                   up_block_types=["AttnUpBlock2D" if d in att else "UpBlock2D" for d in levels[::-1]],
                   block_out_channels=[params["model_channels"] * m for m in mult],
                   attention_head_dim=params["num_head_channels"],
                   resnet_time_scale_shift="scale_shift" if params.get("use_scale_shift_norm") else "default")
        cls = UNet2DModel
    state = convert_ldm_unet_checkpoint(sd, {**cfg, "layers_per_block": params["num_res_blocks"]})
    if cls is UNet2DModel:
        _attention_block_keys(state, params["num_head_channels"], bool(params.get("use_new_attention_order")))
    with torch.device("meta"):
        model = cls(**cfg)
    return model, _materialize(model, state, ours)


def diffusers_autoencoder(first_stage: torch.nn.Module, ddconfig: dict[str, Any], embed_dim: int,
                          n_embed: Optional[int]) -> torch.nn.Module:
    """AutoencoderKL (KL first stage) or VQModel (VQModelInterface) with our weights."""
    from diffusers import AutoencoderKL, VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    if list(ddconfig.get("attn_resolutions", [])):
        raise NotImplementedError("diffusers autoencoders have no attention outside the middle block")
    n = len(ddconfig["ch_mult"])
    cfg = dict(in_channels=ddconfig["in_channels"], out_channels=ddconfig["out_ch"],
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
               block_out_channels=[ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
               layers_per_block=ddconfig["num_res_blocks"], latent_channels=ddconfig["z_channels"],
               sample_size=ddconfig["resolution"])
    sd = {"first_stage_model." + k: v for k, v in first_stage.state_dict(keep_vars=True).items()}
    state = convert_ldm_vae_checkpoint(sd, cfg)
    if n_embed is None:
        with torch.device("meta"):
            model = AutoencoderKL(**cfg)
    else:
        state["quantize.embedding.weight"] = first_stage.quantize.embedding.weight
        with torch.device("meta"):
            model = VQModel(**cfg, num_vq_embeddings=n_embed, vq_embed_dim=embed_dim)
    _materialize(model, state, {id(p): p for p in first_stage.parameters()})
    return model.eval()


# ----------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str                      # "ours", "diffusers", "ours-eager"
    setup: str                     # what is timed: "train", "ddim", "ddim-cfg", "encode", "decode"
    step: Callable[[], Any]        # one iteration
    samples: int                   # samples per iteration
    unet_evals: int                # per-sample UNet evaluations per iteration
    times: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    flops: Optional[int] = None
    first_output: Any = None


def timed(v: Variant, device: torch.device) -> None:
    """One timed iteration of `v` (device synchronised around it), with its peak memory."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with perf.PeakMemory(device) as mem:
        sync()
        t0 = time.perf_counter()
        v.step()
        sync()
        v.times.append(time.perf_counter() - t0)
    if mem.peak_bytes is not None:
        v.peak_bytes = max(v.peak_bytes or 0, mem.peak_bytes)


class Bench:
    """Everything one run needs: models, data, variants."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dm = self.vae = self.eager = None
        if args.mode == "autoencoder":
            self._init_autoencoder()
            return
        flags = dict(checkpoint=args.checkpoint, channels_last=args.channels_last, compile_unet=args.compile,
                     overrides=args.set)
        self.cfg = load_model_config(args.config, **flags)
        self.model = build_model(self.cfg, self.device, args.seed)
        if args.ema_offload and getattr(self.model, "use_ema", False):
            self.model.model_ema.set_offload(True)        # EMA in host memory (LitEma offload)
        self.eager = None
        if args.compare == "eager":
            plain = load_model_config(args.config, checkpoint=args.checkpoint, channels_last=False, compile_unet=False,
                                      overrides=args.set)
            self.eager = build_model(plain, self.device, args.seed)
            self.eager.load_state_dict(self.model.state_dict())
        m = self.model
        self.f = 2 ** (len(m.first_stage_model.encoder.down) - 1) if hasattr(m.first_stage_model, "encoder") else 1
        self.latent_shape = (args.batch, m.channels, args.resolution, args.resolution)
        g = torch.Generator().manual_seed(args.seed + 1)
        self.x_T = torch.randn(self.latent_shape, generator=g).to(self.device)
        self.images = (torch.rand(args.batch, 3, args.resolution * self.f, args.resolution * self.f,
                                  generator=g) * 2 - 1).to(self.device)
        self.c, self.uc = make_conditioning(m, self.latent_shape, self.device, args.seed + 2)
        if self.eager is not None:
            self.eager.cond_stage_trainable = False
        self.dm = self.vae = None
        if args.compare == "diffusers":
            if m.model.conditioning_key not in (None, "crossattn"):
                raise NotImplementedError("--compare diffusers: unconditional or cross-attention models only")
            unet_params = OmegaConf.to_container(self.cfg.params.unet_config.params, resolve=True)
            self.dm, n_shared = diffusers_unet(m.model.diffusion_model, unet_params)
            self.dm = self.dm.to(self.device)
            n_total = len(list(self.dm.parameters()))
            print(f"diffusers {type(self.dm).__name__}: {n_shared}/{n_total} parameter tensors shared with ours")
            if args.channels_last:
                self.dm.to(memory_format=torch.channels_last)
            if args.compile:
                self.dm.compile()
            if m.model.diffusion_model.use_checkpoint and args.mode == "train":
                self.dm.enable_gradient_checkpointing()
            fs = OmegaConf.to_container(self.cfg.params.first_stage_config.params, resolve=True)
            if args.mode == "autoencoder" or (args.mode == "train" and not args.cached_latents):
                self.vae = diffusers_autoencoder(m.first_stage_model, fs["ddconfig"], fs["embed_dim"],
                                                 fs.get("n_embed")).to(self.device)

    def _init_autoencoder(self) -> None:
        """--mode autoencoder: only the first stage, from an autoencoder config or the
        first_stage_config of a LatentDiffusion config (trained-loss parts replaced by Identity)."""
        a = self.args
        self.ae, ddconfig, embed_dim, n_embed = build_first_stage(a.config, self.device, a.seed,
                                                                  a.ae_channels_last, a.ae_precision, a.set)
        self.f = 2 ** (len(ddconfig["ch_mult"]) - 1)
        g = torch.Generator().manual_seed(a.seed + 1)
        self.latent_shape = (a.batch, embed_dim, a.resolution, a.resolution)
        self.x_T = torch.randn(self.latent_shape, generator=g).to(self.device)
        self.images = (torch.rand(a.batch, 3, a.resolution * self.f, a.resolution * self.f,
                                  generator=g) * 2 - 1).to(self.device)
        self.c = self.uc = None
        if a.compare == "diffusers":
            self.vae = diffusers_autoencoder(self.ae, ddconfig, embed_dim, n_embed).to(self.device)
            if a.ae_channels_last:
                self.vae.to(memory_format=torch.channels_last)

    def amp(self) -> Any:
        return perf.autocast(self.args.precision, self.device)

    def dm_call(self, x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if c is None:
            return self.dm(x, t).sample
        return self.dm(x, t, encoder_hidden_states=c).sample

    # ------------------------------------------------------------------ agreement
    @torch.no_grad()
    def agreement(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.args.mode == "autoencoder":
            return out
        m = self.model
        t = torch.linspace(0, m.num_timesteps - 1, self.args.batch).long().to(self.device)
        if self.dm is not None:
            ours = m.apply_model(self.x_T, t, self.c) if self.c is not None else m.model(self.x_T, t)
            theirs = self.dm_call(self.x_T, t, self.c)
            out["unet_max_abs_diff"] = float((ours - theirs).abs().max())
            out["unet_output_max_abs"] = float(ours.abs().max())
        if self.eager is not None:
            with self.amp():
                fast = self.model.apply_model(self.x_T, t, self.c) if self.c is not None else m.model(self.x_T, t)
            ref = self.eager.apply_model(self.x_T, t, self.c) if self.c is not None else self.eager.model(self.x_T, t)
            out["eager_max_abs_diff"] = float((fast.float() - ref).abs().max())
            out["eager_output_max_abs"] = float(ref.abs().max())
        return out

    # ------------------------------------------------------------------ train
    def train_variants(self) -> list[Variant]:
        a, B = self.args, self.args.batch
        models = [("ours", self.model)] + ([("ours-eager", self.eager)] if self.eager is not None else [])
        params: dict[int, torch.nn.Parameter] = {}
        for _, mm in models:
            params.update({id(p): p for p in mm.trainable_parameters()})
        if self.dm is not None:
            params.update({id(p): p for p in self.dm.parameters()})
        opt = perf.adamw(params.values(), lr=1e-6, fused=a.fused_adam) if a.optimizer == "adamw" else \
            torch.optim.SGD(list(params.values()), lr=1e-6)
        scaler = torch.amp.GradScaler(self.device.type, enabled=perf.autocast_dtype(a.precision) == torch.float16)
        batch = self.cached_batch() if a.cached_latents else {self.model.first_stage_key: self.images.permute(0, 2, 3, 1)}

        def update(loss: torch.Tensor) -> None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        def ours_step(mm: Any, amp: bool) -> Callable[[], Any]:
            def step() -> Any:
                with torch.no_grad():
                    z, _ = mm._first_stage_latent(batch, mm.first_stage_key)
                with self.amp() if amp else perf.autocast("32", self.device):
                    loss, _ = mm(z, self.c)
                update(loss)
                if mm.use_ema:
                    mm.model_ema(mm.model)
                return loss.detach()
            return step

        out = [Variant(n, "train", ours_step(mm, n == "ours"), B, 1) for n, mm in models]
        for mm in (m for _, m in models):
            mm.train()
        if self.dm is not None:
            self.dm.train()
            out.append(Variant("diffusers", "train", self.diffusers_train_step(batch, update), B, 1))
        return out

    def cached_batch(self) -> dict[str, torch.Tensor]:
        """What ldm.data.cached_latents yields: the first-stage encoding of the images (made once)."""
        with torch.no_grad():
            enc = self.model.encode_first_stage(self.images)
        if isinstance(enc, torch.Tensor):
            return {perf.LATENT_KEY: enc}
        return {perf.LATENT_KEY: enc.mean, perf.LATENT_LOGVAR_KEY: enc.logvar}

    def diffusers_train_step(self, batch: dict[str, torch.Tensor], update: Callable) -> Callable[[], Any]:
        m, sf = self.model, float(self.model.scale_factor)
        from diffusers import DDPMScheduler
        sched = DDPMScheduler(num_train_timesteps=m.num_timesteps, trained_betas=m.betas.cpu().numpy())
        sched.alphas_cumprod = sched.alphas_cumprod.to(self.device)
        ema = None
        if m.use_ema:
            from diffusers.training_utils import EMAModel
            ema = EMAModel(self.dm.parameters(), decay=0.9999)

        def latents() -> torch.Tensor:
            if self.vae is None:
                enc = perf.cached_first_stage_encoding(batch, self.device)
                return (enc if isinstance(enc, torch.Tensor) else enc.sample()) * sf
            enc = self.vae.encode(self.images)
            return (enc.latent_dist.sample() if hasattr(enc, "latent_dist") else enc.latents) * sf

        def step() -> Any:
            with torch.no_grad():
                z = latents()
            t = torch.randint(0, m.num_timesteps, (z.shape[0],), device=self.device).long()
            noise = torch.randn_like(z)
            with self.amp():
                pred = self.dm_call(sched.add_noise(z, noise, t), t, self.c)
                loss = F.mse_loss(pred.float(), noise.float())
            update(loss)
            if ema is not None:
                ema.step(self.dm.parameters())
            return loss.detach()
        return step

    # ------------------------------------------------------------------ sample
    def sample_variants(self) -> list[Variant]:
        from ldm.models.diffusion.ddim import DDIMSampler
        a, B = self.args, self.args.batch
        setups = [("ddim", 1.0)] + ([("ddim-cfg", a.cfg_scale)] if self.c is not None else [])
        if a.sample_setups:
            setups = [st for st in setups if st[0] in a.sample_setups.split(",")]
        models = [("ours", self.model, True)] + ([("ours-eager", self.eager, False)] if self.eager is not None else [])
        out = []
        for setup, scale in setups:
            for name, mm, amp in models:
                sampler = DDIMSampler(mm)

                def step(sampler=sampler, scale=scale, amp=amp) -> Any:
                    with torch.no_grad(), self.amp() if amp else perf.autocast("32", self.device):
                        x, _ = sampler.sample(a.steps, B, self.latent_shape[1:], conditioning=self.c, eta=0.0,
                                              x_T=self.x_T, unconditional_guidance_scale=scale,
                                              unconditional_conditioning=self.uc if scale != 1.0 else None,
                                              verbose=False, log_every_t=a.steps)
                    return x
                out.append(Variant(name, setup, step, B, a.steps * (2 if scale != 1.0 else 1)))
            if self.dm is not None:
                out.append(Variant("diffusers", setup, self.diffusers_sample(scale), B,
                                   a.steps * (2 if scale != 1.0 else 1)))
        for mm in (self.model, self.eager, self.dm):
            if mm is not None:
                mm.eval()
        return out

    def diffusers_sample(self, scale: float) -> Callable[[], Any]:
        from diffusers import DDIMScheduler
        m = self.model
        pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[m.parameterization]
        sched = DDIMScheduler(num_train_timesteps=m.num_timesteps, trained_betas=m.betas.cpu().numpy(),
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=pred)
        ctx = torch.cat([self.uc, self.c]) if scale != 1.0 else self.c   # once, as diffusers' pipelines

        def step() -> Any:
            sched.set_timesteps(self.args.steps, device=self.device)
            x = self.x_T
            with torch.no_grad(), self.amp():
                for t in sched.timesteps:
                    if scale != 1.0:
                        e_u, e_c = self.dm_call(torch.cat([x] * 2), t, ctx).chunk(2)
                        e = e_u + scale * (e_c - e_u)
                    else:
                        e = self.dm_call(x, t, ctx)
                    x = sched.step(e, t, x, eta=0.0).prev_sample
            return x
        return step

    # ------------------------------------------------------------------ autoencoder
    def autoencoder_variants(self) -> list[Variant]:
        """encode (image -> latent: the KL posterior, or VQ pre-quantisation h) and decode
        (latent -> image; VQ quantises first), ours and diffusers' on the same weights."""
        ae, B, z = self.ae, self.args.batch, self.x_T
        vq = hasattr(ae, "quantize")
        channels_last = self.args.ae_channels_last

        def inp(x: torch.Tensor) -> torch.Tensor:
            return x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def enc() -> Any:
            with torch.no_grad(), self.amp():
                return ae.encode_to_prequant(self.images) if vq else ae.encode(self.images).parameters

        def dec() -> Any:
            with torch.no_grad(), self.amp():
                return ae.decoder(ae.post_quant_conv(ae.quantize(z)[0] if vq else z))
        out = [Variant("ours", "encode", enc, B, 0), Variant("ours", "decode", dec, B, 0)]
        if self.vae is not None:
            def denc() -> Any:
                with torch.no_grad(), self.amp():
                    e = self.vae.encode(inp(self.images))
                    return e.latents if vq else e.latent_dist.parameters

            def ddec() -> Any:
                with torch.no_grad(), self.amp():
                    return self.vae.decode(inp(z)).sample
            out[1:1] = [Variant("diffusers", "encode", denc, B, 0)]
            out.append(Variant("diffusers", "decode", ddec, B, 0))
        return out


# ----------------------------------------------------------------------------------------
# Running and reporting
# ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    agreement = bench.agreement()
    for k, v in agreement.items():
        print(f"agreement: {k} = {v:.3e}")
    variants = {"train": bench.train_variants, "sample": bench.sample_variants,
                "autoencoder": bench.autoencoder_variants}[args.mode]()
    count = args.flops == "on" or (args.flops == "auto" and bench.device.type == "cuda")
    for v in variants:
        for i in range(args.warmup):
            out = v.step()
            if i == 0:
                v.first_output = out
        if count:
            v.flops = perf.count_flops(v.step)
    _sample_agreement(variants, agreement)
    for i in range(args.iters):
        # ABBA order: on a CPU the variant run first in a round measured ~5% slower than the
        # same code run second (allocator / cache state), so the order alternates
        for v in variants if i % 2 == 0 else variants[::-1]:
            timed(v, bench.device)
    return report(args, bench, variants, agreement)


def _sample_agreement(variants: list[Variant], agreement: dict[str, float]) -> None:
    """Outputs of the first warm-up iteration of every variant against ours (DDIM samples, decodes)."""
    for setup in {v.setup for v in variants if v.setup.startswith("ddim") or v.setup in ("encode", "decode")}:
        group = {v.name: v.first_output for v in variants if v.setup == setup}
        for name, out in group.items():
            if name != "ours" and out is not None and group.get("ours") is not None:
                agreement[f"{setup}_samples_max_abs_diff_{name}"] = float((out.float() - group["ours"].float()).abs().max())
                print(f"agreement: {setup} outputs, ours vs {name}: max abs diff "
                      f"{agreement[f'{setup}_samples_max_abs_diff_{name}']:.3e}")


def report(args: argparse.Namespace, bench: Bench, variants: list[Variant], agreement: dict) -> dict[str, Any]:
    peak = perf.device_peak_tflops(bench.device, args.precision)
    rows = []
    for v in variants:
        med, best = statistics.median(v.times), min(v.times)
        row = dict(variant=v.name, setup=v.setup, ms_median=1e3 * med, ms_min=1e3 * best,
                   samples_per_s=v.samples / med, unet_evals_per_s=v.samples * v.unet_evals / med,
                   peak_memory_mb=None if v.peak_bytes is None else v.peak_bytes / 2 ** 20,
                   times_s=v.times, flops=v.flops)
        if v.flops:
            row["tflops_per_s"] = v.flops / med / 1e12
            row["mfu"] = row["tflops_per_s"] / peak if peak else None
        rows.append(row)
    ratios, paired = {}, {}
    for r in rows:
        base = next(o for o in rows if o["setup"] == r["setup"] and o["variant"] == "ours")
        if r is not base:
            # > 1: ours is faster than the other variant. `paired`: the median over iterations of
            # the ratio of two adjacent (interleaved) runs, robust to load changing over the run
            key = f"{r['setup']}: ours / {r['variant']}"
            ratios[key] = r["ms_median"] / base["ms_median"]
            paired[key] = statistics.median(o / b for o, b in zip(r["times_s"], base["times_s"]))
    print(f"\n{args.mode} | {args.config} | batch {args.batch} | latent {args.resolution} | {args.precision} | "
          f"{bench.device} ({torch.get_num_threads()} threads) | {args.iters} iters after {args.warmup} warm-up")
    head = f"{'setup':10s} {'variant':11s} {'ms med':>9s} {'ms min':>9s} {'samples/s':>10s} {'UNet ev/s':>10s} " \
           f"{'peak MiB':>9s} {'TFLOP/s':>8s} {'MFU':>6s}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        tf = f"{r['tflops_per_s']:.3f}" if r.get("tflops_per_s") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        print(f"{r['setup']:10s} {r['variant']:11s} {r['ms_median']:9.1f} {r['ms_min']:9.1f} "
              f"{r['samples_per_s']:10.3f} {r['unet_evals_per_s']:10.3f} {mem:>9s} {tf:>8s} {mfu:>6s}")
    for k, v in ratios.items():
        print(f"speed ratio {k}: {v:.3f}x (medians), {paired[k]:.3f}x (paired iterations)")
    result = dict(args=vars(args), device=str(bench.device), device_name=_device_name(bench.device),
                  threads=torch.get_num_threads(), torch=torch.__version__, peak_tflops=peak,
                  agreement=agreement, results=rows, ratios=ratios, paired_ratios=paired)
    path = Path(args.json or f"logs/benchmarks/{Path(args.config).stem}_{args.mode}_{bench.device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a LatentDiffusion config (ours or an original one); or an autoencoder "
                                     "config for --mode autoencoder")
    p.add_argument("--suite", choices=["gpu"], default=None,
                   help="run the GPU report (SD v1 sampling, SD v2 / CelebA-HQ training, autoencoder decode); "
                        "see scripts/benchmark_suite.py")
    p.add_argument("--tiny", action="store_true", help="--suite: tiny models and sizes (CI smoke run on CPU)")
    p.add_argument("--out", default=None, help="--suite: report file (JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (keys relative to `model`, e.g. params.unet_config.params.model_channels=64)")
    p.add_argument("--mode", choices=["train", "sample", "autoencoder"], default="train")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None, help="latent side (default: the config's image_size)")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (autocast, as Lightning's *-mixed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5, help="DDIM steps per sampling iteration")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--sample-setups", default=None, help="--mode sample: only these of ddim,ddim-cfg")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cached-latents", action="store_true", help="train on cached first-stage encodings")
    p.add_argument("--compare", choices=["diffusers", "eager"], default=None)
    p.add_argument("--channels-last", action="store_true", help="UNet use_channels_last")
    p.add_argument("--ae-channels-last", action="store_true",
                   help="--mode autoencoder: ddconfig use_channels_last (diffusers' model converted too)")
    p.add_argument("--ae-precision", default=None, help="--mode autoencoder: ddconfig decode_precision (bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile_unet)")
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="override the UNet's use_checkpoint (activation checkpointing)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--ema-offload", action="store_true", help="keep the EMA in host memory (LitEma offload)")
    p.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True) on CUDA (use_fused_adam)")
    p.add_argument("--flops", choices=["auto", "on", "off"], default="auto", help="count FLOPs (auto: on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output file (default logs/benchmarks/<config>_<mode>_<device>.json)")
    args = p.parse_args(argv)
    if args.suite:
        return args
    if args.config is None:
        p.error("--config is required (unless --suite)")
    if args.resolution is None:
        params = OmegaConf.load(args.config).model.params
        if "image_size" not in params and "ddconfig" in params:     # an autoencoder config: its training size
            dd = params.ddconfig
            args.resolution = int(dd.resolution) // 2 ** (len(dd.ch_mult) - 1)
        else:
            args.resolution = int(params.get("image_size", 32))
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.suite:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_ldm_benchmark_suite", Path(__file__).with_name("benchmark_suite.py"))
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        return suite.run_suite(args, run, parse_args)
    return run(args)


if __name__ == "__main__":
    main()
