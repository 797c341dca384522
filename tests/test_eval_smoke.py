"""End-to-end offline smoke tests: random-weight Inception (clearly flagged), a fake sampler,
a tiny in-memory dataset as the reference split, the CLI, and the autoencoder pipeline."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ldm.eval.features import RANDOM_WEIGHTS_NOTE
from ldm.eval.pipeline import EvalSettings, run_autoencoder, run_generative

N = 6


class TinyDataset(torch.utils.data.Dataset):
    """Images as the LDM datasets hand them out: {"image": (H, W, 3) float32 in [-1, 1]}."""

    def __init__(self, n: int = N, size: int = 32, seed: int = 0):
        rs = np.random.RandomState(seed)
        base = rs.randint(30, 226, (n, 4, 4, 3)).astype(np.uint8)
        self.images = np.stack([np.kron(b, np.ones((size // 4, size // 4, 1), np.uint8)) for b in base])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": (self.images[i] / 127.5 - 1.0).astype(np.float32)}


DATA = {"target": f"{__name__}.TinyDataset", "params": {"n": N}}


def fake_sample_fn(x_T: torch.Tensor, labels) -> torch.Tensor:
    x = torch.tanh(x_T.mean(1, keepdim=True)).repeat(1, 3, 1, 1)
    return torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")


def _settings(tmp_path, **kw) -> EvalSettings:
    base = dict(outdir=str(tmp_path / "samples"), n=N, batch=3, seed=3, random_inception=True, reference_data=DATA,
                split="train", metrics=["fid", "is", "kid", "pr"], cache_dir=str(tmp_path / "cache"), device="cpu",
                progress=False, row="fake (smoke)", paper={"fid": 5.11})
    base.update(kw)
    return EvalSettings(**base)


def test_generative_end_to_end_random_inception_is_flagged_and_cached(tmp_path, capsys):
    res = run_generative(_settings(tmp_path), sample_fn=fake_sample_fn, shape=(3, 8, 8), protocol={"sampler": "fake"})
    out = capsys.readouterr().out
    assert RANDOM_WEIGHTS_NOTE in out and "RANDOM-WEIGHT Inception" in out
    flagged = "fake (smoke) [RANDOM-WEIGHT networks: not comparable]"
    assert f"| {flagged} |" in out and f"| {flagged} (paper) | 5.11" in out
    m = res["metrics"]
    assert math.isfinite(m["fid"]) and m["fid"] >= 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["is_mean"] >= 1.0
    assert m["kid_subset_size"] == N and m["n_samples"] == N and m["n_reference"] == N
    saved = json.loads((tmp_path / "samples" / "eval_results.json").read_text())
    assert saved["warnings"] == [RANDOM_WEIGHTS_NOTE]
    assert saved["protocol"]["features"]["weights"] == "RANDOM"
    assert saved["software"]["torch_fidelity"] and saved["metrics"]["fid"] == m["fid"]
    assert saved["protocol"]["reference"]["key"]["features"].startswith("inception-RANDOM")
    cache = list((tmp_path / "cache").glob("TinyDataset-train-32x32-*.npz"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    # evaluate the same folder again: reference statistics come from the cache, numbers repeat
    res2 = run_generative(_settings(tmp_path, skip_sampling=True))
    assert cache[0].stat().st_mtime_ns == stamp
    assert res2["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-9, abs=1e-12)


def test_cli_skip_sampling_with_reference_folder(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from ldm.eval.sample_for_eval import SamplingPlan, generate

    samples = tmp_path / "s"
    generate(fake_sample_fn, SamplingPlan(n=N, outdir=str(samples), shape=(3, 8, 8), batch_size=3), progress=False)
    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["--skip-sampling", "--outdir", str(samples), "--n", str(N), "--ref-dir", str(samples),
                   "--random-inception", "--metrics", "fid,pr", "--no-cache", "--device", "cpu", "--no-progress",
                   "--batch", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count(RANDOM_WEIGHTS_NOTE) >= 1
    saved = json.loads((samples / "eval_results.json").read_text())
    assert saved["metrics"]["precision"] == 1.0 and saved["metrics"]["recall"] == 1.0   # reference = samples
    assert "is_mean" not in saved["metrics"]


class ShiftAutoencoder:
    """encode = identity, decode adds 4/127.5: reconstructions are the inputs + 4 grey levels."""

    def encode(self, x):
        return x

    def decode(self, z):
        return z + 4 / 127.5


def test_autoencoder_metrics_end_to_end(tmp_path, capsys):
    metrics = ["rfid", "ris", "psnr", "ssim", "psim"]
    try:
        import ldm.modules.losses.lpips  # noqa: F401
    except ImportError:
        metrics.remove("psim")
    s = _settings(tmp_path, task="autoencoder", split="validation", metrics=metrics, random_lpips=True, n=None,
                  row="shift", paper=None)
    res = run_autoencoder(s, model=ShiftAutoencoder())
    m = res["metrics"]
    assert m["n_images"] == N
    assert m["psnr"]["mean"] == pytest.approx(20 * np.log10(255 / 4), rel=1e-12) and m["psnr"]["std"] < 1e-9
    assert 0.9 < m["ssim"]["mean"] < 1.0
    assert math.isfinite(m["rfid"]) and m["ris_mean"] >= 1.0
    if "psim" in metrics:
        assert m["psim"]["mean"] > 0
        assert any("LPIPS: RANDOM-WEIGHT" in w for w in res["warnings"])
    out = capsys.readouterr().out
    assert "RANDOM-WEIGHT Inception" in out and "| shift [RANDOM-WEIGHT networks: not comparable] |" in out
