"""scripts/benchmark_sampling.py: counts network calls right and compares guidance batched vs unbatched."""
from __future__ import annotations

import pytest
import torch

from test_scripts_common import script, tiny  # noqa: F401


def test_benchmark_counts_unet_calls(tiny, capsys):
    cfg, _ = tiny("configs/ldm/cin256.yaml")
    results = script("benchmark_sampling").main(["--config", str(cfg), "--steps", "3", "--batch", "2",
                                                 "--warmup", "0", "--repeats", "1", "--device", "cpu"])
    plain, batched, unbatched = results.values()
    assert (plain["unet_calls"], batched["unet_calls"], unbatched["unet_calls"]) == (3, 3, 6)
    # a guided step evaluates 2B samples, in one call (batched) or two (unbatched)
    assert batched["unet_evals_per_s"] * batched["seconds"] == pytest.approx(12)
    assert unbatched["unet_evals_per_s"] * unbatched["seconds"] == pytest.approx(12)
    out = capsys.readouterr().out
    assert "CFG unbatched / batched time" in out and "images/s" in out


def test_unbatched_guidance_gives_the_batched_result(tiny):
    bench = script("benchmark_sampling")
    from ldm import scripting as S
    model = S.load_model(*tiny("configs/ldm/cin256.yaml"), "cpu")
    with torch.no_grad():
        c, uc, kind = bench.conditioning(model, 2, torch.device("cpu"))
        runs = [S.sample(m, "ddim", 2, (3, 8, 8), 2, c, uc, 3.0, generator=torch.Generator().manual_seed(0),
                         progress=False) for m in (model, bench.UnbatchedGuidance(model))]
        x, t = torch.randn(4, 3, 8, 8), torch.tensor([5, 700, 5, 700])
        one_call = model.apply_model(x, t, torch.cat([uc, c]))
        two_calls = bench.UnbatchedGuidance(model).apply_model(x, t, torch.cat([uc, c]))
    assert kind == "class" and torch.allclose(one_call, two_calls, atol=1e-4)
    # the same samples up to float reassociation (batch-size dependent kernels), amplified by the guidance
    assert (runs[0] - runs[1]).abs().max() <= 1e-3 * runs[0].abs().max()


def test_unconditional_model_has_no_guided_runs(tiny, capsys):
    cfg, _ = tiny("configs/ldm/celebahq.yaml")
    results = script("benchmark_sampling").main(["--config", str(cfg), "--steps", "2", "--warmup", "0",
                                                 "--repeats", "1"])
    assert list(results) == ["no guidance"] and "CFG: n/a" in capsys.readouterr().out
