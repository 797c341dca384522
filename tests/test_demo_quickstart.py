"""`make demo` shortened: scripts/demo.py end to end with a few steps per stage writes every
picture and result.json, with numbers in range."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_shortened_demo_writes_pictures_and_results(tmp_path: Path) -> None:
    out, logs = tmp_path / "demo", tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LDM_RUN_NOW", None)
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--logdir", str(logs),
                           "--ae-steps", "4", "--ldm-steps", "4", "--per-class", "3", "--grid-per-class", "2",
                           "--ddim-steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"samples_grid.png", "reconstructions.png", "loss_stage1.png", "loss_stage2.png", "result.json"} <= files

    # grids: 10 classes x 2 samples; 2 x (10 inputs above 10 reconstructions); 2 px padding, upscaled x2
    assert Image.open(out / "samples_grid.png").size == (2 * (2 + 2 * 34), 2 * (2 + 10 * 34))
    assert Image.open(out / "reconstructions.png").size == (2 * (2 + 10 * 34), 2 * (2 + 4 * 34))
    for name in ("loss_stage1.png", "loss_stage2.png"):
        assert Image.open(out / name).size == (600, 360)

    r = json.loads((out / "result.json").read_text())
    s1, s2 = r["stage1"], r["stage2"]
    assert s1["steps"] == 4 and s2["steps"] == 4
    assert s1["n_images"] == 180 and 5.0 < s1["psnr_min"] <= s1["psnr_mean"] < 60.0
    assert s2["n_samples"] == 30 and 0.0 <= s2["sample_accuracy"] <= 1.0
    assert sorted(s2["per_class_accuracy"]) == [str(k) for k in range(10)]
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in s2["per_class_accuracy"].values())
    assert sum(s2["per_class_accuracy"].values()) / 10 == pytest.approx(s2["sample_accuracy"])
    assert s2["classifier_real_heldout_accuracy"] >= 0.98          # the judge itself is good (real digits)
    assert s2["sampler"] == {"sampler": "DDIM", "steps": 2, "eta": 0.0, "guidance_scale": 8.0,
                             "unconditional_class": 10, "weights": "EMA", "seed": 0, "per_class": 3}
    assert 0 < s1["train_seconds"] and 0 < s2["train_seconds"] and 0 < s2["sample_seconds"]
    assert r["total_seconds"] >= s1["train_seconds"] + s2["train_seconds"]
    assert "train/rec_loss" in r["loss_curves"]["loss_stage1.png"]
    assert "train/loss_simple_step" in r["loss_curves"]["loss_stage2.png"]
    # the summary table
    assert "PSNR" in proc.stdout and "recognised as their class" in proc.stdout and "total" in proc.stdout
