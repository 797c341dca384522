"""ldm.diffusion.tiling: patch-wise processing with border weighting reconstructs exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.diffusion import tiling

PARAMS = dict(clip_min_weight=0.01, clip_max_weight=0.5, tie_braker=False,
              clip_min_tie_weight=0.01, clip_max_tie_weight=0.5)


def test_delta_border():
    d = tiling.delta_border(5, 5)
    assert d.shape == (5, 5)
    assert float(d[0, 0]) == 0.0 and float(d[0, 2]) == 0.0 and float(d[2, 2]) == 0.5
    assert float(d[1, 2]) == pytest.approx(0.25)


@pytest.mark.parametrize("tie_braker", [False, True])
@pytest.mark.parametrize("hw,ks,stride", [((20, 20), (8, 8), (4, 4)), ((16, 24), (8, 8), (8, 8)),
                                          ((17, 21), (9, 7), (4, 7))])
def test_identity_reconstructs_exactly(tie_braker, hw, ks, stride):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    params = dict(PARAMS, tie_braker=tie_braker)
    calls = []
    out = tiling.tiled_apply(lambda p, i: calls.append(i) or p, x, ks, stride, params)
    n = ((hw[0] - ks[0]) // stride[0] + 1) * ((hw[1] - ks[1]) // stride[1] + 1)
    assert calls == list(range(n))
    covered = ((hw[0] - ks[0]) // stride[0]) * stride[0] + ks[0], ((hw[1] - ks[1]) // stride[1]) * stride[1] + ks[1]
    assert out.shape == x.shape
    assert torch.allclose(out[..., :covered[0], :covered[1]], x[..., :covered[0], :covered[1]], atol=1e-6, rtol=0)


def test_weighting_blends_overlaps():
    # a patch-dependent constant output: overlapping pixels get a convex combination, weighted by border distance
    x = torch.zeros(1, 1, 12, 12)
    out = tiling.tiled_apply(lambda p, i: torch.full_like(p, float(i)), x, (8, 8), (4, 4), PARAMS)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 3.0
    assert float(out[0, 0, 0, 0]) == 0.0 and float(out[0, 0, -1, -1]) == 3.0
    # the centre of the overlap of all four patches is an average
    assert 0.0 < float(out[0, 0, 6, 6]) < 3.0


def test_upsampling_fn_uf():
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    up = lambda p, i: F.interpolate(p, scale_factor=4, mode="nearest")   # noqa: E731
    out = tiling.tiled_apply(up, x, (8, 8), (4, 4), PARAMS, uf=4)
    assert out.shape == (1, 2, 64, 64)
    assert torch.allclose(out, F.interpolate(x, scale_factor=4, mode="nearest"), atol=1e-6)


def test_upsampling_non_square_kernel():
    # (the original built the output fold with kernel_size[0] twice, which crashed here)
    x = torch.randn(1, 1, 12, 16, generator=torch.Generator().manual_seed(3))
    up = lambda p, i: F.interpolate(p, scale_factor=2, mode="nearest")   # noqa: E731
    out = tiling.tiled_apply(up, x, (8, 4), (4, 4), PARAMS, uf=2)
    assert torch.allclose(out, F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)


def test_downsampling_fn_df():
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    down = lambda p, i: F.avg_pool2d(p, 2)   # noqa: E731
    out = tiling.tiled_apply(down, x, (8, 8), (4, 4), PARAMS, df=2)
    assert out.shape == (1, 2, 8, 8)
    assert torch.allclose(out, F.avg_pool2d(x, 2), atol=1e-6)


def test_fit_to_small_images():
    assert tiling.fit_to((128, 128), (64, 64), 32, 48) == ((32, 48), (32, 48))
    assert tiling.fit_to((16, 16), (8, 8), 32, 48) == ((16, 16), (8, 8))


def test_uf_and_df_together_rejected():
    with pytest.raises(NotImplementedError):
        tiling.get_fold_unfold(torch.zeros(1, 1, 8, 8), (4, 4), (4, 4), PARAMS, uf=2, df=2)
