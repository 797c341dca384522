"""Aspect-ratio bucketing: bucket sizes, one shape per batch, and every image exactly once per
epoch across 2 ranks x 2 DataLoader workers (folder source through BucketBatchSampler, tar shards
through WebBucketBatches)."""
from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.bucketing import (BucketBatchSampler, BucketedDataLoader, BucketedImageFolder, WebBucketBatches,
                                fit_to_bucket, make_buckets, nearest_bucket)

torch.set_num_threads(1)
SHAPES = [(32, 128), (64, 64), (128, 32), (40, 60), (70, 50), (30, 90)]   # (h, w) of the test images
RANKS, WORKERS = 2, 2


def test_buckets():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and max(h, w) / min(h, w) <= 2.0
    assert buckets[nearest_bucket((300, 600), buckets)] == (320, 640)
    assert buckets[nearest_bucket((1000, 1000), buckets)] == (512, 512)
    img = np.random.default_rng(0).uniform(-1, 1, (30, 90, 3)).astype(np.float32)
    out = fit_to_bucket(img, (64, 128))
    assert out.shape == (64, 128, 3) and out.dtype == np.float32 and np.abs(out).max() <= 1


def test_sampler_rule_without_workers():
    """Uneven buckets: short batches kept, largest split until the count divides the ranks."""
    ids = [0] * 9 + [1] * 2 + [2] * 5   # batch 4 -> [4, 4, 1], [2], [4, 1]: 6 batches, 3 ranks ok, 4 ranks -> split
    for world in (1, 2, 3, 4, 5):
        seen = []
        counts = set()
        for rank in range(world):
            s = BucketBatchSampler(ids, 4, num_replicas=world, rank=rank, seed=3)
            s.set_epoch(2)
            batches = list(s)
            counts.add(len(batches))
            assert len(batches) == len(s)
            for b in batches:
                assert len({ids[i] for i in b}) == 1 and 1 <= len(b) <= 4
                seen.extend(b)
        assert sorted(seen) == list(range(len(ids))) and len(counts) == 1   # once each, same steps per rank
    s = BucketBatchSampler(ids, 4, num_replicas=1, rank=0, seed=3)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first   # reshuffled per epoch, reproducibly
    s.set_epoch(0)
    assert list(s) == first
    dropped = [i for b in BucketBatchSampler(ids, 4, 2, 0, drop_last=True) for i in b]
    assert all(len(b) == 4 for b in BucketBatchSampler(ids, 4, 2, 1, drop_last=True)) and len(dropped) == 4


def test_resume_mid_epoch_continues_on_the_same_batches():
    ids = [i % 3 for i in range(20)]
    full = BucketBatchSampler(ids, 3, num_replicas=2, rank=1, seed=4)
    full.set_epoch(1)
    expected = list(full)
    loader = BucketedDataLoader(list(range(20)), batch_sampler=BucketBatchSampler(ids, 3, 2, 1, seed=4))
    loader.progress = lambda: 2
    loader.batch_sampler.set_epoch(1)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}
    resumed = BucketedDataLoader(list(range(20)), batch_sampler=BucketBatchSampler(ids, 3, 2, 1, seed=4))
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == expected[2:]
    assert [b.tolist() for b in resumed] == expected   # the next pass over the epoch is whole again
    resumed.load_state_dict({"epoch": 1, "batches_done": len(expected)})   # saved at the epoch's end
    assert resumed.batch_sampler.epoch == 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket_images")
    rng = np.random.default_rng(0)
    for i in range(23):
        h, w = SHAPES[i % len(SHAPES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_folder_two_ranks_two_workers(folder):
    ds = BucketedImageFolder(str(folder), size=128, step=64, max_aspect=4.0)
    assert ds.buckets == [(64, 256), (128, 128), (256, 64)]
    paths = Counter()
    steps = set()
    for rank in range(RANKS):
        sampler = BucketBatchSampler(ds.bucket_ids, 3, num_replicas=RANKS, rank=rank, seed=0)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=WORKERS)
        n = 0
        for batch in loader:
            n += 1
            assert batch["image"].shape[1:] in {(64, 256, 3), (128, 128, 3), (256, 64, 3)}   # one shape per batch
            paths.update(batch["file_path_"])
        steps.add(n)
    assert len(paths) == 23 and set(paths.values()) == {1} and len(steps) == 1
    wide = ds[0]["image"]   # 32 x 128 -> the 64 x 256 bucket
    assert wide.shape == (64, 256, 3)


def test_unreadable_image_is_replaced_within_its_bucket(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 128, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (128, 32, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"not a png")
    ds = BucketedImageFolder(str(tmp_path), size=128, step=64, max_aspect=4.0)
    assert [ds.buckets[b] for b in ds.bucket_ids] == [(64, 256), (256, 64), (128, 128)]
    item = ds[2]   # c.png fails: a.png's pixels, cut to c's (square) bucket, so its batch keeps one shape
    assert item["image"].shape == (128, 128, 3) and item["file_path_"].endswith("a.png") and ds.num_skipped == 1


def png(hw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*hw, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_two_ranks_two_workers(tmp_path):
    sizes = [5, 3, 4, 6, 2, 5, 3, 4]
    for s, n in enumerate(sizes):
        with tarfile.open(tmp_path / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                for ext, data in (("png", png(SHAPES[(s + i) % len(SHAPES)])), ("txt", f"c {s} {i}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    keys = Counter()
    for rank in range(RANKS):
        ds = WebBucketBatches(str(tmp_path / "{00000..00007}.tar"), batch_size=3, size=128, max_aspect=4.0,
                              rank=rank, world_size=RANKS, seed=1)
        for batch in DataLoader(ds, batch_size=None, num_workers=WORKERS):
            assert batch["image"].ndim == 4 and batch["image"].shape[1:3] in {(64, 256), (128, 128), (256, 64)}
            assert len(batch["caption"]) == batch["image"].shape[0] <= 3
            keys.update(batch["__key__"])
    assert len(keys) == sum(sizes) and set(keys.values()) == {1}


def test_data_module_builds_bucketed_train_and_plain_validation_loaders(folder):
    from ldm.data.bucketing import BucketedDataModule
    dm = BucketedDataModule(batch_size=4, num_workers=0,
                            train={"target": "ldm.data.bucketing.BucketedImageFolder",
                                   "params": {"root": str(folder), "size": 128, "max_aspect": 4.0}},
                            validation={"target": "ldm.data.base.ImageFolderDataset",
                                        "params": {"root": str(folder), "size": 32}})
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(train, BucketedDataLoader) and sum(len(b["file_path_"]) for b in train) == 23
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 32, 32, 3)
    dm.datasets["train"] = dm.datasets["validation"]
    with pytest.raises(TypeError, match="bucket_ids"):
        dm.train_dataloader()
