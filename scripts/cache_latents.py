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
  cached_cond     with --text: the frozen conditioning stage's output for the item's
                  cond_stage_key input (e.g. FrozenCLIPEmbedder's (77, 768) context of the
                  caption); LatentDiffusion then uses it as c and never runs the text encoder.
                  uncond.safetensors holds the empty prompt's encoding: training with ucg_rate
                  drops a caption to it, as the encoder would have (needs string captions)
The first stage comes from --ckpt (a full LDM checkpoint) or from the config's
first_stage_config (its ckpt_path must exist); the text encoder from the same checkpoint or the
config's cond_stage_config. `--precision bf16` encodes under autocast.

Resumable: items are split into shards of --shard-size up front, each written atomically
(temporary name, then renamed) and encoded from its own seed, so a killed run started again
with the same arguments skips the finished shards and writes identical ones from the first
unfinished shard on (`plan.json` records the arguments and refuses a mismatched restart).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm import perf  # noqa: E402
from ldm.data.cached_latents import UNCOND, shard_name, write_index, write_shard  # noqa: E402
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

log = logging.getLogger("cache_latents")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_stages(cfg: Any, ckpt: Optional[str], device: torch.device,
                text: bool) -> tuple[Callable, str, Optional[Callable]]:
    """(first-stage encode x -> posterior or tensor, its class name, text encode or None)."""
    params = cfg.model.params
    if text:
        stage_cfg = params.get("cond_stage_config")
        if params.get("cond_stage_trainable", False) or not isinstance(stage_cfg, Mapping) or \
                str(stage_cfg.get("target", "")).startswith("__"):
            target = stage_cfg.get("target") if isinstance(stage_cfg, Mapping) else stage_cfg
            raise ValueError(f"--text caches a frozen cond stage's output, but the config's cond_stage_config is "
                             f"{target!r} with cond_stage_trainable={params.get('cond_stage_trainable', False)}")
    if ckpt is not None:
        from ldm import scripting
        model = scripting.load_model(OmegaConf.to_container(cfg, resolve=True), ckpt, device)
        return (model.encode_first_stage, type(model.first_stage_model).__name__,
                model.get_learned_conditioning if text else None)
    first_stage = instantiate_from_config(params.first_stage_config).eval().to(device)
    cond_encode = None
    if text:   # LatentDiffusion's own encoding rule, on the cond stage alone
        from ldm.models.diffusion.latent import LatentDiffusion
        stage = instantiate_from_config(params.cond_stage_config).eval().to(device)
        holder = SimpleNamespace(cond_stage_model=stage, cond_stage_forward=params.get("cond_stage_forward"))
        cond_encode = functools.partial(LatentDiffusion.get_learned_conditioning, holder)
    return first_stage.encode, type(first_stage).__name__, cond_encode


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


def check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Record the run's arguments; a restart into the same folder must use the same ones."""
    path = out / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan:
            diff = {k: (old.get(k), plan.get(k)) for k in set(old) | set(plan) if old.get(k) != plan.get(k)}
            raise ValueError(f"{out} holds a cache written with other arguments {diff} (old, new); "
                             "use another --out or delete it")
    else:
        path.write_text(json.dumps(plan, indent=1))


def encode_shard(loader: DataLoader, encode: Callable, cond_encode: Optional[Callable], args: Any,
                 image_key: str, cond_key: str, device: torch.device, bar: Any) -> tuple[dict, dict]:
    """(tensors, strings) of one shard, stacked."""
    pending: dict[str, list] = {}
    for batch in loader:
        x = rearrange(torch.as_tensor(batch[image_key]), "b h w c -> b c h w").float().to(device)
        with perf.autocast(args.precision, device):
            items = encode_batch(encode, x, args.store)
            if cond_encode is not None:
                cond = batch[cond_key]
                items[perf.CACHED_COND_KEY] = cond_encode(cond.to(device) if isinstance(cond, torch.Tensor) else cond)
        items = {k: v.float().to(DTYPES[args.dtype]).cpu() for k, v in items.items()}
        tensors, strings = split_batch(batch, image_key, args.keep_images)
        for k, v in {**items, **tensors}.items():
            pending.setdefault(k, []).extend(v.unbind(0))
        for k, v in strings.items():
            pending.setdefault(k, []).extend(v)
        bar.update(len(x))
    tensors = {k: torch.stack(v) for k, v in pending.items() if isinstance(v[0], torch.Tensor)}
    return tensors, {k: v for k, v in pending.items() if k not in tensors}


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
    p.add_argument("--text", action="store_true",
                   help="also cache the frozen cond stage's output (e.g. the CLIP text context) as cached_cond")
    p.add_argument("--seed", type=int, default=0, help="base seed (shard i encodes from seed + i)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = OmegaConf.load(args.config)
    device = torch.device(args.device)
    image_key = cfg.model.params.get("first_stage_key", "image")
    dataset = instantiate_from_config(cfg.data.params[args.split])
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    torch.manual_seed(args.seed)   # stages built without a checkpoint (random weights) are reproducible too
    encode, first_stage, cond_encode = load_stages(cfg, args.ckpt, device, args.text)
    cond_key = cfg.model.params.get("cond_stage_key", "image")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    check_plan(out, {"config": str(args.config), "split": args.split, "ckpt": args.ckpt, "store": args.store,
                     "n": n, "shard_size": args.shard_size, "dtype": args.dtype, "precision": args.precision,
                     "keep_images": args.keep_images, "text": args.text, "seed": args.seed})

    text_input = n > 0 and isinstance(dataset[0].get(cond_key), str)
    if cond_encode is not None and text_input and not (out / UNCOND).exists():   # what ucg_rate drops a caption to
        from safetensors.torch import save_file
        with torch.no_grad(), perf.autocast(args.precision, device):
            uncond = cond_encode([""])[0].float().to(DTYPES[args.dtype]).cpu()
        save_file({perf.CACHED_UNCOND_KEY: uncond.contiguous()}, str(out / UNCOND))

    from tqdm import tqdm
    starts = list(range(0, n, args.shard_size))
    counts = [min(args.shard_size, n - a) for a in starts]
    done = 0
    while done < len(starts) and (out / shard_name(done)).exists():
        done += 1   # shards are renamed into place only when complete
    if done:
        log.info("resuming: %d of %d shards already written", done, len(starts))
    bar = tqdm(total=n, initial=sum(counts[:done]), unit="img", desc="cache_latents", disable=args.no_progress)
    with torch.no_grad():
        for i in range(done, len(starts)):
            torch.manual_seed(args.seed + i)   # --store sample: the same draws whether resumed or not
            part = torch.utils.data.Subset(dataset, range(starts[i], starts[i] + counts[i]))
            loader = DataLoader(part, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
            tensors, strings = encode_shard(loader, encode, cond_encode, args, image_key, cond_key, device, bar)
            tmp = out / (shard_name(i) + ".tmp")
            write_shard(tmp, tensors, strings)
            tmp.replace(out / shard_name(i))
            log.debug("wrote %s (%d items)", shard_name(i), counts[i])
    bar.close()
    from safetensors import safe_open
    with safe_open(str(out / shard_name(0)), framework="pt") as h:
        keys = set(h.keys())
        latent_shape = list(h.get_slice(perf.LATENT_KEY).get_shape()[1:])
        cond_shape = list(h.get_slice(perf.CACHED_COND_KEY).get_shape()[1:]) if args.text else None
    kind = "posterior" if perf.LATENT_LOGVAR_KEY in keys else ("sample" if args.store == "sample" else "tensor")
    write_index(out, counts, kind=kind, latent_shape=latent_shape, dtype=args.dtype, first_stage=first_stage,
                first_stage_key=image_key, config=str(args.config), split=args.split,
                scale_factor=float(cfg.model.params.get("scale_factor", 1.0)), precision=args.precision,
                cached_cond_shape=cond_shape, cond_stage_key=cond_key if args.text else None)
    log.info("cached %d items in %d shards under %s", sum(counts), len(counts), out)
    return out


if __name__ == "__main__":
    main()
