"""Reference statistics: dataset preprocessing -> uint8, streamed mean/cov, kept subset, cache keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.eval.features import POOL
from ldm.eval.reference_stats import RunningStats, dataset_config, reference_statistics


class Pictures(torch.utils.data.Dataset):
    """{"image": HWC float32 in [-1, 1]} from fixed uint8 pictures, like the LDM datasets."""

    def __init__(self, n: int = 12, seed: int = 0):
        self.uint8 = np.random.RandomState(seed).randint(0, 256, (n, 6, 5, 3)).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.uint8)

    def __getitem__(self, i: int) -> dict:
        return {"image": (self.uint8[i] / 127.5 - 1.0).astype(np.float32), "label": i}


class FakeExtractor:
    """Features = flattened pixels (90-d); records the uint8 batches it was given."""

    cache_id = "fake-features"

    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        b = np.asarray(batch)
        self.seen.append(b)
        return {POOL: b.reshape(len(b), -1).astype(np.float64)}


def _data(split_params=None, **params):
    ds = {"target": f"{__name__}.Pictures", "params": params}
    return {"target": "main.DataModuleFromConfig",
            "params": {"batch_size": 4, "train": ds, "validation": split_params or ds}}


def test_running_stats_equal_numpy_mean_and_cov():
    f = np.random.RandomState(1).randn(37, 6) * 3 + 100.0       # large offset: needs the shifted sums
    rs = RunningStats()
    for lo in range(0, 37, 5):
        rs.update(f[lo:lo + 5])
    mu, cov = rs.finalize()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)


def test_dataset_config_from_data_section_or_dataset():
    d = _data()
    assert dataset_config(d, "train")["target"].endswith("Pictures")
    assert dataset_config(d["params"]["train"], "train") == d["params"]["train"]
    with pytest.raises(KeyError, match="no 'test' split"):
        dataset_config(d, "test")


def test_reference_statistics_preprocessing_subset_and_cache(tmp_path):
    ex = FakeExtractor()
    ref = reference_statistics(ex, data_config=_data(), split="train", max_features=5, batch_size=4,
                               cache_dir=tmp_path, progress=False)
    imgs = Pictures().uint8
    assert np.array_equal(np.concatenate(ex.seen), imgs)          # exactly the dataset's pictures, as uint8
    feats = imgs.reshape(12, -1).astype(np.float64)
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    keep = np.sort(np.random.RandomState(0).choice(12, 5, replace=False))
    np.testing.assert_array_equal(ref.features, feats[keep].astype(np.float32))
    assert ref.n == 12 and ref.path.name.startswith("Pictures-train-6x5-")
    # second call: from the cache, the extractor is not used
    ex2 = FakeExtractor()
    again = reference_statistics(ex2, data_config=_data(), split="train", max_features=5, cache_dir=tmp_path,
                                 progress=False)
    assert ex2.seen == [] and again.path == ref.path
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    # a different split, dataset parameter or limit is a different cache entry
    other = reference_statistics(FakeExtractor(), data_config=_data({"target": f"{__name__}.Pictures",
                                 "params": {"seed": 1}}), split="validation", cache_dir=tmp_path, progress=False)
    limited = reference_statistics(FakeExtractor(), data_config=_data(), split="train", limit=7, max_features=5,
                                   cache_dir=tmp_path, progress=False)
    assert len({ref.path, other.path, limited.path}) == 3 and limited.n == 7
    assert len(list(tmp_path.glob("*.npz"))) == 3
