#!/usr/bin/env python
"""Sampling throughput: images/s and UNet evaluations/s, without and with classifier-free
guidance, the guided run both batched (cond + uncond in one network call of 2B, as the
samplers do) and unbatched (two calls of B): the baseline, in the same process.

  python scripts/benchmark_sampling.py --config configs/quickstart/ldm_digits.yaml --steps 10 --batch 4
  python scripts/benchmark_sampling.py --config configs/ldm/celebahq.yaml --H 256 --W 256 --batch 1 --steps 10
  python scripts/benchmark_sampling.py --config C.yaml --ckpt M.ckpt --sampler dpm --precision bf16 --device cuda

Without --ckpt the model has random weights (the speed does not depend on them). A run is
conditioning + sampling + first-stage decoding; times are the median of --repeats runs after
--warmup runs. "UNet calls" counts network calls, "UNet evals" the samples they process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm import perf  # noqa: E402
from ldm.sampling import registry as sampler_registry  # noqa: E402
from ldm import scripting as S  # noqa: E402

TEXT_KEYS = ("txt", "caption")
CLASS_KEYS = ("class_label", "cls")


def split_cond(cond: Any) -> tuple[Any, Any]:
    """Inverse of ldm.sampling.guidance.cat_cond: (uncond half, cond half)."""
    if isinstance(cond, dict):
        halves = {k: split_cond(v) for k, v in cond.items()}
        return {k: h[0] for k, h in halves.items()}, {k: h[1] for k, h in halves.items()}
    if isinstance(cond, (list, tuple)):
        halves = [split_cond(c) for c in cond]
        return [h[0] for h in halves], [h[1] for h in halves]
    return tuple(cond.chunk(2))


class UnbatchedGuidance:
    """The model, except that apply_model evaluates its (uncond | cond)-batched input as two calls."""

    def __init__(self, model: Any):
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs: Any) -> torch.Tensor:
        (xu, xc), (tu, tc), (cu, cc) = x.chunk(2), t.chunk(2), split_cond(cond)
        return torch.cat([self._model.apply_model(xu, tu, cu, **kwargs), self._model.apply_model(xc, tc, cc, **kwargs)])


class CallCounter:
    """Counts the UNet's forward calls and the samples they process."""

    def __init__(self, unet: torch.nn.Module):
        self.calls = self.samples = 0
        unet.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        self.samples += int(args[0].shape[0])


def conditioning(model: Any, batch: int, device: torch.device) -> tuple[Any, Any, str]:
    """(c, uc, kind) for a benchmark batch; uc is None when the model cannot be guided."""
    key = getattr(model, "cond_stage_key", None)
    ckey = model.model.conditioning_key
    if getattr(model, "cond_stage_model", None) is None or ckey is None:
        return None, None, "unconditional"
    if key in TEXT_KEYS and ckey == "crossattn":
        c, uc = S.text_conditioning(model, batch * ["a photograph of an astronaut riding a horse"], 2.0)
        return c, uc, "text"
    if key in CLASS_KEYS:
        xc = {model.cond_stage_model.key: torch.arange(batch, device=device) % 10}
        return model.get_learned_conditioning(xc), model.get_unconditional_conditioning(batch), "class"
    if ckey == "concat":
        raise SystemExit("error: concat-conditioned models (inpainting, super-resolution) are not supported here")
    raise SystemExit(f"error: conditioning '{ckey}' with cond_stage_key '{key}' is not supported here")


def build_model(opt: argparse.Namespace, device: torch.device) -> Any:
    if opt.ckpt:
        return S.load_model(opt.config, opt.ckpt, device, unsafe_pickle=opt.unsafe_pickle)
    from ldm.util import instantiate_from_config
    cfg = S.load_config(opt.config)
    with S.clear_errors(), S.random_hub_weights():
        model = instantiate_from_config(S.strip_ckpt_paths(cfg["model"]))
    return model.to(device).eval()


def time_runs(fn: Any, device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model config")
    p.add_argument("--ckpt", help="checkpoint (default: random weights)")
    p.add_argument("--unsafe_pickle", action="store_true", help="see txt2img.py --help")
    p.add_argument("--H", type=int, help="image height (default: the model's training size)")
    p.add_argument("--W", type=int, help="image width (default: the model's training size)")
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--sampler", choices=sampler_registry.names(), default="ddim", help=sampler_registry.help_text())
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale of the guided runs")
    p.add_argument("--precision", choices=S.PRECISIONS, default="fp32")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    return p


@S.cli
def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    opt = parser().parse_args(argv)
    device = S.resolve_device(opt.device)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    model = build_model(opt, device)
    shape = S.latent_shape(model, opt.H, opt.W)
    counter = CallCounter(model.model.diffusion_model)
    with torch.no_grad():
        c, uc, kind = conditioning(model, opt.batch, device)
    modes = {"no guidance": (model, None, 1.0)}
    if uc is not None:
        modes["CFG, batched (1 call of 2B)"] = (model, uc, opt.scale)
        modes["CFG, unbatched (2 calls of B)"] = (UnbatchedGuidance(model), uc, opt.scale)
    f = S.downsampling_factor(model)[0]
    n_unet = sum(p.numel() for p in model.model.parameters()) / 1e6
    print(f"{opt.config}: {type(model).__name__} ({kind}), {n_unet:.1f}M "
          f"UNet parameters, {shape[1] * f}x{shape[2] * f} images, latent {tuple(shape)}, batch {opt.batch}, "
          f"{opt.sampler} {opt.steps} steps, {opt.precision}, {device}"
          + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))
    results: dict[str, dict[str, float]] = {}
    for name, (m, u, scale) in modes.items():
        def run(m: Any = m, u: Any = u, scale: float = scale) -> None:
            generator = torch.Generator().manual_seed(opt.seed)
            with torch.no_grad(), perf.autocast(opt.precision, device):
                z = S.sample(m, opt.sampler, opt.steps, shape, opt.batch, c, u, scale, 0.0, generator,
                             progress=False)
                S.decode(model, z)
        for _ in range(opt.warmup):
            run()
        counter.calls = counter.samples = 0
        seconds = time_runs(run, device, opt.repeats)
        calls, samples = counter.calls / opt.repeats, counter.samples / opt.repeats
        results[name] = {"seconds": seconds, "images_per_s": opt.batch / seconds, "unet_calls": calls,
                         "unet_calls_per_s": calls / seconds, "unet_evals_per_s": samples / seconds}
    print(f"{'mode':32s} {'s/batch':>9s} {'images/s':>9s} {'UNet calls':>10s} {'calls/s':>9s} {'evals/s':>9s}")
    for name, r in results.items():
        print(f"{name:32s} {r['seconds']:9.3f} {r['images_per_s']:9.3f} {r['unet_calls']:10.0f} "
              f"{r['unet_calls_per_s']:9.2f} {r['unet_evals_per_s']:9.2f}")
    if uc is None:
        print("CFG: n/a (the model has no unconditional conditioning)")
    else:
        base, batched, unbatched = (results[k]["seconds"] for k in modes)
        print(f"ratios: CFG batched / no guidance time = {batched / base:.2f}x; "
              f"CFG unbatched / batched time = {unbatched / batched:.2f}x (speed-up of batching the guidance)")
    return results


if __name__ == "__main__":
    main()
