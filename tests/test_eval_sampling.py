"""Resumable, seeded, multi-rank sample generation for evaluation (fake sampler, no model)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.sample_for_eval import (SamplingPlan, class_labels, generate, initial_noise, rank_indices, read_samples,
                                      sample_path, sample_seed)

ROOT = Path(__file__).resolve().parents[1]

# A fake sampler: the image depends on x_T, the label and (stochastic=True) on torch's global RNG,
# like DDIM with eta > 0. Shared verbatim with the subprocess that gets killed.
FAKE_SRC = textwrap.dedent("""
    import torch, torch.nn.functional as F
    def fake_sample_fn(x_T, labels, stochastic=True, calls=None):
        if calls is not None:
            calls.extend(labels.tolist())
        x = torch.tanh(x_T.mean(1, keepdim=True)).repeat(1, 3, 1, 1)
        x = F.interpolate(x, scale_factor=2, mode="nearest") * 0.8
        x = x + (labels.float() / 1000 - 0.5)[:, None, None, None] * 0.2
        if stochastic:
            x = x + 0.05 * torch.randn(x.shape)
        return x.clamp(-1, 1)
""")
_ns: dict = {}
exec(FAKE_SRC, _ns)
fake_sample_fn = _ns["fake_sample_fn"]

N_CLASSES = 1000   # >= n, so a sample's label equals its index: the fake sampler records which ran


def _plan(outdir, n=24, batch=4, rank=0, world=1, seed=7, protocol=None):
    return SamplingPlan(n=n, outdir=str(outdir), shape=(3, 8, 8), batch_size=batch, seed=seed, n_classes=N_CLASSES,
                        rank=rank, world_size=world, protocol=protocol or {"sampler": "fake"})


def _load(outdir, n):
    return np.stack([np.asarray(Image.open(p)) for p in read_samples(outdir, n)])


def test_seeds_labels_and_rank_partition():
    seeds = {sample_seed(0, i) for i in range(10000)}
    assert len(seeds) == 10000 and sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5)
    parts = [rank_indices(103, r, 4) for r in range(4)]
    assert sorted(sum(parts, [])) == list(range(103))          # every index once, no duplicates
    assert parts[1][:3] == [1, 5, 9]
    counts = Counter(class_labels(range(50000), 1000).tolist())
    assert len(counts) == 1000 and set(counts.values()) == {50}  # class-uniform
    a = initial_noise([3, 4], (2, 2, 2), seed=1)
    assert torch.equal(a[1], initial_noise([4], (2, 2, 2), seed=1)[0])   # x_T independent of batching


def test_resume_after_kill_keeps_finished_samples_and_equals_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    generate(fake_sample_fn, _plan(ref_dir), progress=False)
    script = tmp_path / "sample.py"
    script.write_text(FAKE_SRC + textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        torch.set_num_threads(1)
        from ldm.eval.sample_for_eval import SamplingPlan, generate
        def slow(x_T, labels):
            time.sleep(0.5)
            return fake_sample_fn(x_T, labels)
        generate(slow, SamplingPlan(n=24, outdir={str(run_dir)!r}, shape=(3, 8, 8), batch_size=4, seed=7,
                                    n_classes={N_CLASSES}, protocol={{"sampler": "fake"}}), progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while len(list(run_dir.glob("[0-9]*.png"))) < 8 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sampling process finished before it could be killed"
    done = {int(p.stem) for p in run_dir.glob("[0-9]*.png")}
    assert 8 <= len(done) < 24
    stamps = {i: sample_path(run_dir, i).stat().st_mtime_ns for i in done}
    calls: list = []
    counts = generate(lambda x, y: fake_sample_fn(x, y, calls=calls), _plan(run_dir), progress=False)
    complete_batches = {i for b in _plan(run_dir).batches() if set(b) <= done for i in b}
    assert not complete_batches & set(calls), "finished batches were sampled again"
    assert counts["kept"] == len(done) and counts["written"] == 24 - len(done)
    rewritten = [i for i, t in stamps.items() if sample_path(run_dir, i).stat().st_mtime_ns != t]
    assert not rewritten, "finished PNGs were rewritten"
    assert np.array_equal(_load(run_dir, 24), _load(ref_dir, 24))
    calls.clear()
    assert generate(lambda x, y: fake_sample_fn(x, y, calls=calls), _plan(run_dir), progress=False)["written"] == 0
    assert calls == []


def test_multi_rank_covers_every_index_once_and_matches_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    det = lambda calls: (lambda x, y: fake_sample_fn(x, y, stochastic=False, calls=calls))  # noqa: E731
    generate(det([]), _plan(single, n=10, batch=3), progress=False)
    calls: list = []
    for r in range(3):
        generate(det(calls), _plan(multi, n=10, batch=3, rank=r, world=3), progress=False)
    assert sorted(calls) == list(range(10))
    assert np.array_equal(_load(multi, 10), _load(single, 10))


def test_resume_refuses_other_protocol(tmp_path):
    generate(fake_sample_fn, _plan(tmp_path, n=4), progress=False)
    with pytest.raises(RuntimeError, match="protocol"):
        generate(fake_sample_fn, _plan(tmp_path, n=4, protocol={"sampler": "other"}), progress=False)
    with pytest.raises(RuntimeError, match="seed"):
        generate(fake_sample_fn, _plan(tmp_path, n=4, seed=8), progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_samples(tmp_path, 5)
