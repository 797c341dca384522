"""`scripts/benchmark.py --suite gpu` runs end to end with `--device cpu --tiny` (so the GPU
report cannot rot): every job reports, nothing errors, the JSON holds the table."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT

pytest.importorskip("diffusers", reason="optional benchmark dependency (pip install -e .[bench])")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_ldm_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                       # its dataclasses need it registered
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_gpu_suite_runs_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)                            # configs are named relative to the root
    out = tmp_path / "report.json"
    report = load("benchmark").main(["--suite", "gpu", "--device", "cpu", "--tiny", "--threads", "1",
                                     "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"], default=str))
    errors = {e["name"]: e["error"] for e in report["jobs"] if "error" in e}
    assert errors == {}
    ran = {e["name"] for e in report["jobs"] if "skipped" not in e}
    assert ran == {"sd1-sample-b1", "sd1-sample-b2", "sd2-train-b8", "sd2-train-b8-ema-offload", "sd2-train-largest",
                   "celebahq-train-b48", "kl-f8-decode"}
    assert {e["name"] for e in report["jobs"] if "skipped" in e} == {"sd1-sample-compiled-b1",
                                                                     "sd1-sample-compiled-b2"}
    rows = {(r["job"], r["variant"]): r for r in report["rows"]}
    # sampling: ours beside diffusers (same weights: the guided DDIM chains agree), it/s reported
    for b in (1, 2):
        assert rows[f"sd1-sample-b{b}", "diffusers"]["it_per_s"] > 0 and rows[f"sd1-sample-b{b}", "ours"]["batch"] == b
    job = next(e for e in report["jobs"] if e["name"] == "sd1-sample-b2")
    assert job["agreement"]["ddim-cfg_samples_max_abs_diff_diffusers"] < 5e-2      # bf16 autocast
    # training: FLOPs counted (MFU needs a device peak: None on CPU)
    assert rows["sd2-train-b8", "ours"]["tflops_per_s"] > 0 and rows["sd2-train-largest", "ours"]["batch"] == 4
    assert rows["celebahq-train-b48", "ours"]["mfu"] is None
    assert rows["kl-f8-decode", "ours"]["samples_per_s"] > 0 and ("kl-f8-decode", "diffusers") in rows


def test_suite_jobs_cover_the_report():
    suite = load("benchmark_suite")
    names = [j["name"] for j in suite.jobs(tiny=False)]
    assert names == [f"sd1-sample{c}-b{b}" for c in ("", "-compiled") for b in (1, 4, 16)] + \
        ["sd2-train-b8", "sd2-train-b8-ema-offload", "sd2-train-largest", "celebahq-train-b48", "kl-f8-decode"]
    args = {j["name"]: j["argv"] for j in suite.jobs(tiny=False)}
    assert "--compile" in args["sd1-sample-compiled-b16"] and "bf16" in args["sd2-train-b8"]
    assert args["celebahq-train-b48"][args["celebahq-train-b48"].index("--batch") + 1] == "48"
