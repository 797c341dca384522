"""Encode a dataset once with the first stage and write the latents to disk (safetensors shards).

    python scripts/cache_latents.py --config configs/ldm/celebahq.yaml --split train \\
        --out data/latents/celebahq-train [--ckpt model.ckpt] [--store posterior|sample|mean]

Training then reads them with `ldm.data.cached_latents.CachedLatents` (set it as the data
config's `train` target) and LatentDiffusion skips the encoder: a batch carrying `latent`
(+ `latent_logvar`) is taken as the first-stage encoding (see `ldm.perf`).

What is stored per item:
  latent          the encoding before scale_factor: KL posterior mean (--store posterior / mean),
                  one posterior sample (--store sample), or the VQ pre-quantisation map
  latent_logvar   KL posterior log-variance (--store posterior, the default): every epoch then
                  draws a fresh z = mean + exp(logvar / 2) * eps, exactly as encoding on the fly
  <other keys>    the dataset's conditioning inputs as they are (class labels, captions, ...);
                  the images themselves only with --keep-images
The first stage comes from --ckpt (a full LDM checkpoint) or from the config's
first_stage_config (its ckpt_path must exist). `--precision bf16` encodes under autocast.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm import perf  # noqa: E402
from ldm.data.cached_latents import shard_name, write_index, write_shard  # noqa: E402
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

log = logging.getLogger("cache_latents")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_encoder(cfg: Any, ckpt: Optional[str], device: torch.device) -> tuple[Any, str]:
    """(encode function x -> posterior or tensor, target of the first stage)."""
    if ckpt is not None:
        from ldm import scripting
        model = scripting.load_model(OmegaConf.to_container(cfg, resolve=True), ckpt, device)
        return model.encode_first_stage, type(model.first_stage_model).__name__
    first_stage = instantiate_from_config(cfg.model.params.first_stage_config).eval().to(device)
    return first_stage.encode, type(first_stage).__name__


def split_batch(batch: dict[str, Any], image_key: str, keep_images: bool) -> tuple[dict, dict]:
    """The conditioning entries of a collated batch: (tensors, string lists); others are skipped."""
    tensors, strings = {}, {}
    for key, value in batch.items():
        if key == image_key and not keep_images:
            continue
        if isinstance(value, (torch.Tensor, np.ndarray)):
            tensors[key] = torch.as_tensor(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            strings[key] = list(value)
        else:
            log.warning("not caching batch key %r (%s)", key, type(value).__name__)
    return tensors, strings


def encode_batch(encode: Any, x: torch.Tensor, store: str) -> dict[str, torch.Tensor]:
    enc = encode(x)
    if isinstance(enc, DiagonalGaussianDistribution):
        if store == "posterior":
            return {perf.LATENT_KEY: enc.mean, perf.LATENT_LOGVAR_KEY: enc.logvar}
        return {perf.LATENT_KEY: enc.sample() if store == "sample" else enc.mean}
    if isinstance(enc, (tuple, list)):   # VQModel.encode -> (quant, loss, info)
        enc = enc[0]
    return {perf.LATENT_KEY: enc}


def main(argv: Optional[list[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="LatentDiffusion config with a data section")
    p.add_argument("--split", default="train", help="data.params.<split> to encode")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ckpt", default=None, help="full LDM checkpoint (else the first_stage_config's ckpt_path)")
    p.add_argument("--store", choices=["posterior", "sample", "mean"], default="posterior")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=4096, help="items per shard")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="encode only the first N items")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of the latents")
    p.add_argument("--precision", default="fp32", help="encode precision: fp32 | bf16 | fp16 (autocast)")
    p.add_argument("--keep-images", action="store_true", help="also store the images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = OmegaConf.load(args.config)
    device = torch.device(args.device)
    image_key = cfg.model.params.get("first_stage_key", "image")
    dataset = instantiate_from_config(cfg.data.params[args.split])
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    encode, first_stage = load_encoder(cfg, args.ckpt, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    counts: list[int] = []
    pending: dict[str, list] = {}
    latent_shape, kind = None, "tensor"

    def flush(final: bool = False) -> None:
        while pending and (len(next(iter(pending.values()))) >= args.shard_size or final):
            n = min(args.shard_size, len(next(iter(pending.values()))))
            if n == 0:
                return
            tensors = {k: torch.stack(v[:n]) for k, v in pending.items() if isinstance(v[0], torch.Tensor)}
            strings = {k: v[:n] for k, v in pending.items() if not isinstance(v[0], torch.Tensor)}
            write_shard(out / shard_name(len(counts)), tensors, strings)
            counts.append(n)
            for v in pending.values():
                del v[:n]
            log.info("wrote %s (%d items)", shard_name(len(counts) - 1), n)

    with torch.no_grad():
        for batch in loader:
            x = rearrange(torch.as_tensor(batch[image_key]), "b h w c -> b c h w").float().to(device)
            with perf.autocast(args.precision, device):
                latents = encode_batch(encode, x, args.store)
            latents = {k: v.float().to(DTYPES[args.dtype]).cpu() for k, v in latents.items()}
            latent_shape = list(latents[perf.LATENT_KEY].shape[1:])
            kind = "posterior" if perf.LATENT_LOGVAR_KEY in latents else (
                "sample" if args.store == "sample" else "tensor")
            tensors, strings = split_batch(batch, image_key, args.keep_images)
            for k, v in {**latents, **tensors}.items():
                pending.setdefault(k, []).extend(v.unbind(0))
            for k, v in strings.items():
                pending.setdefault(k, []).extend(v)
            flush()
    flush(final=True)
    write_index(out, counts, kind=kind, latent_shape=latent_shape, dtype=args.dtype, first_stage=first_stage,
                first_stage_key=image_key, config=str(args.config), split=args.split,
                scale_factor=float(cfg.model.params.get("scale_factor", 1.0)), precision=args.precision)
    log.info("cached %d items in %d shards under %s", sum(counts), len(counts), out)
    return out


if __name__ == "__main__":
    main()
