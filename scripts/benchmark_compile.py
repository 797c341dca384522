#!/usr/bin/env python
"""Cold torch.compile time of the SD v1 UNet: whole model vs regional (repeated blocks).

    python scripts/benchmark_compile.py --mode whole            # one mode per process:
    python scripts/benchmark_compile.py --mode regional         # no shared compile caches
    python scripts/benchmark_compile.py --mode regional --model-channels 32   # less memory / time

Prints one JSON line: wall time of compile + first call (cold; inductor's caches point at a
fresh directory), CPU time of the process and its compile workers, later call times, and the
max abs difference to the eager output (compile parity tolerance: 1e-4 x max |output|).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["whole", "regional", "regional-dynamic"], required=True)
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--model-channels", type=int, default=None, help="narrower UNet (same block structure)")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{a.mode}-")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    import torch
    from omegaconf import OmegaConf

    from ldm import perf
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    params = OmegaConf.to_container(OmegaConf.load(a.config).model.params.unet_config.params)
    if a.model_channels:
        params["model_channels"] = a.model_channels
    params["use_checkpoint"] = False
    torch.manual_seed(0)
    unet = UNetModel(**params).eval().to(a.device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in unet.parameters():
            q.copy_(torch.randn(q.shape, generator=g) / (q[0].numel() ** 0.5 if q.ndim > 1 else 10))
    x = torch.randn(1, params["in_channels"], a.latent, a.latent, device=a.device)
    t, c = torch.tensor([500], device=a.device), torch.randn(1, 77, params["context_dim"], device=a.device)
    with torch.no_grad():
        ref = unet(x, t, context=c)
        t0 = time.perf_counter()
        if a.mode == "whole":
            unet.compile()
            blocks = ["<whole model>"]
        else:
            blocks = perf.compile_repeated_blocks(unet, {"dynamic": True} if a.mode == "regional-dynamic" else None)
        out = unet(x, t, context=c)
        cold = time.perf_counter() - t0
        later = []
        for _ in range(2):
            t0 = time.perf_counter()
            unet(x, t, context=c)
            later.append(time.perf_counter() - t0)
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    res = dict(mode=a.mode, model_channels=params["model_channels"], params=sum(q.numel() for q in unet.parameters()),
               n_compiled=len(blocks), cold_compile_and_first_call_s=cold, process_cpu_s=cpu, later_calls_s=later,
               max_abs_diff=float((out - ref).abs().max()), rel_diff=float((out - ref).abs().max() / ref.abs().max()))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
