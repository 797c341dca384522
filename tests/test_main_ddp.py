"""main.py with Lightning DDP on CPU: two processes (gloo) started by main.py itself share one
log folder, see different shards of the data, and end with identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_main_toy import ROOT, ToyImages, toy_config

pytestmark = pytest.mark.slow


def test_two_cpu_processes_train_in_sync(tmp_path: Path) -> None:
    cfg, logs = toy_config(tmp_path), tmp_path / "logs"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1")
    env.pop("LDM_RUN_NOW", None)
    proc = subprocess.run(
        [sys.executable, "main.py", "-b", str(cfg), "-t", "-l", str(logs), "-n", "ddp",
         "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
         "lightning.trainer.max_steps=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(logs.iterdir())
    assert len(runs) == 1, runs  # both ranks used the launcher's log folder
    run = runs[0]
    h0, h1 = (run / "hash_rank0.txt").read_text(), (run / "hash_rank1.txt").read_text()
    assert h0 == h1  # identical weights and buffers on both ranks after 4 synchronised steps
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    # lr scaled by 2 devices: 1 x 2 x 4 x 1e-4
    assert "8.00e-04 = 1 (accumulate_grad_batches) * 2 (num_devices) * 4 (batchsize)" in proc.stderr + proc.stdout
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # DistributedSampler-style sharding: per rank 10 of the 20 samples per epoch = batches of 4, 4, 2;
    # in epoch 0 the two ranks together saw every sample exactly once
    seen = [(run / f"batches_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 + 4 + 2 + 4
    everything = sorted(f"{v:.6f}" for v in ToyImages(n=20).x[:, 0, 0, 0].tolist())
    assert sorted(seen[0][:10] + seen[1][:10]) == everything
