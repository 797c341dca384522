"""The GPU report: `python scripts/benchmark.py --suite gpu --out report.json` (one GPU, < 8 min).

Runs scripts/benchmark.py's measurements one after another, in one process, and writes one
table (printed) and one JSON file:
- SD v1 UNet, 512^2 images (64^2 latents), bf16, DDIM with classifier-free guidance
  (cond + uncond in one batched call): denoising iterations/s at batch 1, 4, 16, ours and
  diffusers' UNet2DConditionModel (SDPA) on the same weights; then both torch.compiled;
- SD v2 UNet training step (64^2 latents, cached, bf16, AdamW, EMA): images/s and MFU at
  batch 8 (also with the EMA offloaded to host memory: the peak-memory difference) and at the
  largest batch that fits (doubling until out of memory);
- CelebA-HQ LDM-4 training step (64^2x3 latents, cached, bf16): samples/s and MFU at batch 48;
- KL-f8 autoencoder decode of 512^2 images (bf16): images/s, ours and diffusers' AutoencoderKL;
- peak memory of each (CUDA max_memory_allocated; on CPU an RSS estimate).
Jobs that would start after the time budget (--budget-s, default 450 s) are skipped and say
so. `--device cpu --tiny` runs the same jobs with tiny widths and sizes (the CI smoke test;
compiled runs are skipped there: compiling takes minutes on a CPU).
"""
from __future__ import annotations

import gc
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

SD1, SD2 = "configs/stable-diffusion/v1-inference.yaml", "configs/stable-diffusion/v2-inference.yaml"
CELEBA, KLF8 = "configs/ldm/celebahq.yaml", "configs/autoencoder/kl-f8.yaml"
# the text encoder is not built: the benchmark feeds random contexts (the encoder is not timed)
TEXT_FREE = ["params.cond_stage_config=__is_unconditional__", "params.force_null_conditioning=true"]


def jobs(tiny: bool) -> list[dict[str, Any]]:
    """(name, benchmark.py argv, what to report) of every measurement."""
    r, steps, iters = ("8", "2", "1") if tiny else ("64", "10", "3")
    common = ["--precision", "bf16", "--iters", iters, "--warmup", "1"]
    # --tiny: 2 levels of 32 channels, one block each; first stages of 2 levels of 32 channels
    small_unet = ["num_res_blocks=1", "channel_mult=[1,2]", "attention_resolutions=[1]", "model_channels=32"]
    small_ae = ["ch=32", "ch_mult=[1,2]", "num_res_blocks=1"]

    def unet(heads: int) -> list[str]:
        if not tiny:
            return []
        return [f"--set=params.unet_config.params.{o}" for o in small_unet + [f"num_head_channels={heads}"]] + \
            [f"--set=params.first_stage_config.params.ddconfig.{o}" for o in small_ae]
    sd1 = unet(-1) + [f"--set={o}" for o in TEXT_FREE]
    out: list[dict[str, Any]] = []
    for compiled in (False, True):
        for batch in ((1, 2) if tiny else (1, 4, 16)):
            out.append(dict(name=f"sd1-sample{'-compiled' if compiled else ''}-b{batch}", kind="sample",
                            skip="compile skipped with --tiny" if compiled and tiny else None,
                            argv=["--config", SD1, "--mode", "sample", "--batch", str(batch), "--resolution", r,
                                  "--steps", steps, "--sample-setups", "ddim-cfg", "--compare", "diffusers",
                                  "--flops", "off", *common, *sd1] + (["--compile"] if compiled else [])))
    sd2 = ["--config", SD2, "--mode", "train", "--resolution", r, "--cached-latents", "--flops", "on",
           "--fused-adam", "--set=params.use_ema=true", *common, *[f"--set={o}" for o in TEXT_FREE], *unet(16)]
    out.append(dict(name="sd2-train-b8", kind="train", argv=sd2 + ["--batch", "2" if tiny else "8"]))
    out.append(dict(name="sd2-train-b8-ema-offload", kind="train",
                    argv=sd2 + ["--batch", "2" if tiny else "8", "--ema-offload"]))
    out.append(dict(name="sd2-train-largest", kind="largest", argv=sd2,
                    batches=[4] if tiny else [16, 32, 64, 128, 256]))
    out.append(dict(name="celebahq-train-b48", kind="train",
                    argv=["--config", CELEBA, "--mode", "train", "--batch", "2" if tiny else "48",
                          "--resolution", r, "--cached-latents", "--flops", "on", "--fused-adam", *common,
                          *unet(16)]))
    out.append(dict(name="kl-f8-decode", kind="autoencoder",
                    argv=["--config", KLF8, "--mode", "autoencoder", "--batch", "2" if tiny else "4",
                          "--resolution", r, "--compare", "diffusers", "--flops", "off", *common]
                    + ([f"--set=params.ddconfig.{o}" for o in small_ae] if tiny else [])))
    return out


def _rows(job: dict[str, Any], result: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    rows = []
    for r in result["results"]:
        if job["kind"] == "autoencoder" and r["setup"] != "decode":
            continue
        row = dict(job=job["name"], setup=r["setup"], variant=r["variant"], batch=result["args"]["batch"],
                   samples_per_s=r["samples_per_s"], peak_memory_mb=r["peak_memory_mb"],
                   tflops_per_s=r.get("tflops_per_s"), mfu=r.get("mfu"), ms_median=r["ms_median"])
        if r["setup"].startswith("ddim"):
            row["it_per_s"] = steps / (r["ms_median"] / 1e3)      # denoising iterations (CFG: one batched call)
        rows.append(row)
    return rows


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_suite(args: Any, run: Callable[[Any], dict], parse_args: Callable[[list[str]], Any]) -> dict[str, Any]:
    """Run every job of `jobs(args.tiny)` on args.device; print the table, write args.out."""
    t_start = time.perf_counter()
    budget = getattr(args, "budget_s", None) or 450.0
    device = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    rows, entries = [], []
    for job in jobs(args.tiny):
        elapsed = time.perf_counter() - t_start
        entry: dict[str, Any] = dict(name=job["name"], started_s=elapsed)
        if job.get("skip"):
            entry["skipped"] = job["skip"]
        elif elapsed > budget:
            entry["skipped"] = f"time budget ({budget:.0f} s) spent"
        else:
            try:
                json_path = str(Path(args.out or "report.json").with_suffix("")) + f".{job['name']}.json"
                if job["kind"] == "largest":
                    best = None
                    for b in job["batches"]:
                        try:
                            res = run(parse_args(job["argv"] + ["--batch", str(b), "--json", json_path, *device]))
                            best = res
                        except Exception as e:       # noqa: BLE001 -- out of memory ends the search
                            if not _is_oom(e):
                                raise
                            entry["oom_at_batch"] = b
                            break
                        finally:
                            _free()
                    if best is None:
                        raise RuntimeError("no batch size fitted")
                    res = best
                else:
                    res = run(parse_args(job["argv"] + ["--json", json_path, *device]))
                new = _rows(job, res, int(res["args"]["steps"]))
                rows += new
                entry.update(ratios=res["ratios"], agreement=res["agreement"], rows=new)
            except Exception as e:                   # noqa: BLE001 -- one failed job must not lose the report
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc(limit=5)
            finally:
                if "--compile" in job["argv"]:
                    torch._dynamo.reset()
                _free()
        entry["wall_s"] = time.perf_counter() - t_start - elapsed
        entries.append(entry)
    report = dict(device=args.device, device_name=torch.cuda.get_device_name() if torch.cuda.is_available()
                  and args.device.startswith("cuda") else "cpu", torch=torch.__version__, tiny=args.tiny,
                  total_s=time.perf_counter() - t_start, jobs=entries, rows=rows)
    _print(report)
    out = Path(args.out or "report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"\nGPU report | {report['device_name']} | torch {report['torch']} | {report['total_s']:.0f} s"
          + (" | TINY" if report["tiny"] else ""))
    head = f"{'job':22s} {'variant':10s} {'batch':>5s} {'it/s':>8s} {'img/s':>9s} {'MFU':>6s} {'peak MiB':>9s}"
    print(head + "\n" + "-" * len(head))
    for r in report["rows"]:
        it = f"{r['it_per_s']:.2f}" if "it_per_s" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(f"{r['job']:22s} {r['variant']:10s} {r['batch']:5d} {it:>8s} {r['samples_per_s']:9.3f} {mfu:>6s} {mem:>9s}")
    for e in report["jobs"]:
        if "skipped" in e or "error" in e:
            print(f"{e['name']}: {e.get('skipped') or e.get('error')}")
