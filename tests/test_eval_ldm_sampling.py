"""Sampling for evaluation with a real (tiny, golden-fixture) LatentDiffusion and DDIMSampler:
class-conditional with guidance, eta=1 (in-loop noise), interrupted and resumed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reference_or_skip
from ldm.checkpoint import load_model_from_config


@pytest.fixture(scope="module")
def tiny_ldm():
    ref = reference_or_skip()
    mdir = ref / "golden" / "_models" / "ldm_crossattn"
    return load_model_from_config(str(mdir / "config.yaml"), str(mdir / "weights.safetensors"))


def test_ldm_ddim_guided_eta1_resume_equals_uninterrupted(tiny_ldm, tmp_path):
    from ldm.eval.pipeline import EvalSettings, resolve_classes
    from ldm.eval.sample_for_eval import (SamplerSettings, SamplingPlan, generate, latent_shape, make_ldm_sample_fn,
                                          read_samples)

    n_classes, uncond = resolve_classes(tiny_ldm, EvalSettings(n_classes=4, uncond_label=9))
    assert (n_classes, uncond) == (4, 9)
    assert resolve_classes(tiny_ldm, EvalSettings()) == (10, None)    # 10 embeddings, no null class
    fn = make_ldm_sample_fn(tiny_ldm, SamplerSettings("ddim", steps=3, eta=1.0, scale=2.0, uncond_label=uncond))
    plan = lambda d: SamplingPlan(n=5, outdir=str(d), shape=latent_shape(tiny_ldm), batch_size=2,  # noqa: E731
                                  seed=11, n_classes=n_classes, protocol={"steps": 3})
    generate(fn, plan(tmp_path / "a"), progress=False)

    calls = []

    def crashing(x_T, labels):
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
        calls.append(labels.tolist())
        return fn(x_T, labels)

    with pytest.raises(KeyboardInterrupt):
        generate(crashing, plan(tmp_path / "b"), progress=False)
    assert calls == [[0, 1]]
    torch.manual_seed(1234)  # a different global RNG state must not matter on resume
    resumed = []
    generate(lambda x, y: (resumed.append(y.tolist()), fn(x, y))[1], plan(tmp_path / "b"), progress=False)
    assert resumed == [[2, 3], [0]]               # labels i % 4; the finished batch is not sampled again
    load = lambda d: np.stack([np.asarray(Image.open(p)) for p in read_samples(d, 5)])  # noqa: E731
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert a.shape == (5, 8, 8, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
