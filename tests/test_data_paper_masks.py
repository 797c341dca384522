"""Inpainting masks: LaMa protocol statistics over 1,000 draws (ranges stated in ldm/data/masks.py)."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.data.masks import PROTOCOLS, Boxes, MaskProtocol, make_mask

N = 1000
# protocol: (mean area range, 5th percentile range, 95th percentile range, max area bound)
AREA = {
    "thin": ((0.22, 0.32), (0.03, 0.10), (0.40, 0.50), 0.5),
    "medium": ((0.22, 0.32), (0.02, 0.09), (0.40, 0.50), 0.5),
    "thick": ((0.22, 0.32), (0.02, 0.09), (0.40, 0.50), 0.5),
    "large": ((0.27, 0.37), (0.02, 0.07), (0.62, 0.80), 1.0),
}


def edge_per_area(m: np.ndarray) -> float:
    return float((np.abs(np.diff(m, axis=1)).sum() + np.abs(np.diff(m, axis=0)).sum()) / max(m.sum(), 1))


@pytest.fixture(scope="module")
def draws():
    out = {}
    for name in AREA:
        rng = np.random.default_rng(0)
        out[name] = [make_mask(512, 512, name, rng) for _ in range(N)]
    return out


@pytest.mark.parametrize("name", list(AREA))
def test_area_statistics(draws, name):
    masks = draws[name]
    assert all(m.shape == (512, 512) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in masks[:50])
    area = np.array([m.mean() for m in masks])
    (mlo, mhi), (p5lo, p5hi), (p95lo, p95hi), bound = AREA[name]
    assert mlo <= area.mean() <= mhi, area.mean()
    assert p5lo <= np.percentile(area, 5) <= p5hi
    assert p95lo <= np.percentile(area, 95) <= p95hi
    assert area.min() > 0 and area.max() <= bound
    if name == "large":  # training masks are not capped: some cover most of the image
        assert area.max() > 0.8


def test_protocols_differ_in_shape(draws):
    """thin strokes have far more boundary per hole pixel than medium, medium than thick."""
    e = {n: np.mean([edge_per_area(m) for m in draws[n][:200]]) for n in ("thin", "medium", "thick")}
    assert e["thin"] > 2.5 * e["medium"] > 2.5 * 1.2 * e["thick"], e
    assert 0.12 < e["thin"] < 0.18


def test_box_masks_and_seeding():
    p = MaskProtocol(None, Boxes(1, 1, 30, 60, 10), irregular_p=0.0, box_p=1.0, base_size=128)
    for seed in range(50):
        m = make_mask(128, 128, p, seed)
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert m.sum() == h * w and 30 <= h < 60 and 30 <= w < 60  # one solid box of the stated size
        assert ys.min() >= 10 and xs.min() >= 10 and ys.max() < 118 and xs.max() < 118  # margin kept
    assert np.array_equal(make_mask(64, 96, "thick", 3), make_mask(64, 96, "thick", 3))
    assert not np.array_equal(make_mask(64, 96, "thick", 3), make_mask(64, 96, "thick", 4))
    assert make_mask(64, 96, "thin", 0).shape == (64, 96)
    assert set(PROTOCOLS) >= {"thin", "medium", "thick", "large", "256narrow", "256train", "512train", "512train-large"}
