"""WebDataset text-image source: exactly-once epochs over ranks x workers, resuming, filters."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.webdataset_source import ShardProgress, WebImageText, expand_shards

torch.set_num_threads(1)

N_SHARDS, RANKS, WORKERS, BUFFER = 8, 2, 2, 4
SIZES = [3 + i % 4 for i in range(N_SHARDS)]  # unequal shards: 3..6 samples


def png(hw=(12, 12), value=100) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for s, n in enumerate(SIZES):
        write_shard(str(root / f"{s:05d}.tar"),
                    [(f"s{s}_{i}", {"jpg": png(), "txt": f"caption {s} {i}".encode()}) for i in range(n)])
    return str(root / "{00000..00007}.tar")


ALL_KEYS = {f"s{s}_{i}" for s, n in enumerate(SIZES) for i in range(n)}


def run_rank(pattern: str, rank: int, epoch: int = 0, state: dict | None = None, stop_after: int | None = None,
             tracker: ShardProgress | None = None, shuffle: int = BUFFER, **kw) -> list[str]:
    ds = WebImageText(pattern, size=8, shuffle=shuffle, seed=1, rank=rank, world_size=RANKS, **kw)
    if state is not None:
        ds.load_state_dict(state)
    else:
        ds.set_epoch(epoch)
    keys = []
    for b in DataLoader(ds, batch_size=2, num_workers=WORKERS):
        assert b["image"].shape[1:] == (8, 8, 3) and b["image"].dtype == torch.float32
        assert all(c == "caption " + k[1:].replace("_", " ") for c, k in zip(b["caption"], b["__key__"]))
        if tracker is not None:
            tracker.update(b)
        keys += b["__key__"]
        if stop_after is not None and len(keys) >= stop_after:
            break
    return keys


def test_brace_expansion(shards):
    urls = expand_shards(shards)
    assert len(urls) == 8 and urls[0].endswith("00000.tar") and urls[-1].endswith("00007.tar")
    assert expand_shards(["a{0..2}.tar", "b.tar"]) == ["a0.tar", "a1.tar", "a2.tar", "b.tar"]
    assert expand_shards("a{0..1}.tar::c.tar") == ["a0.tar", "a1.tar", "c.tar"]


def test_every_sample_exactly_once_per_epoch(shards):
    orders = []
    for epoch in (0, 1):
        seen = Counter()
        per_rank = []
        for rank in range(RANKS):
            keys = run_rank(shards, rank, epoch)
            per_rank.append(keys)
            seen.update(keys)
        assert set(seen) == ALL_KEYS and max(seen.values()) == 1  # none missing, no duplicates
        assert all(per_rank)  # both ranks got data
        orders.append(per_rank)
    assert orders[0] != orders[1]  # shards and samples reshuffled per epoch


def test_shard_assignment_partitions(shards):
    ds = WebImageText(shards, seed=3)
    for epoch in range(3):
        parts = [ds.shards_for(epoch, r, RANKS, w, WORKERS) for r in range(RANKS) for w in range(WORKERS)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(ds.urls) and all(len(p) == 2 for p in parts)


@pytest.mark.parametrize("buffer", [0, BUFFER])
def test_resume_mid_epoch(shards, buffer):
    # documented bound on shards read again: R * W * (1 + ceil(buffer / smallest shard))
    bound = RANKS * WORKERS * (1 + math.ceil(buffer / min(SIZES)))
    n_done = 0
    for stop in (5, 13):
        first, second, repeated_shards = Counter(), Counter(), set()
        for rank in range(RANKS):
            tracker = ShardProgress(epoch=0)
            before = run_rank(shards, rank, 0, stop_after=stop, tracker=tracker, shuffle=buffer)
            state = tracker.state_dict()
            n_done += len(state["done"])
            after = run_rank(shards, rank, state=state, shuffle=buffer)
            first.update(before)
            second.update(after)
            again = {k.split("_")[0] for k in set(before) & set(after)}
            repeated_shards |= {(rank, s) for s in again}
            # finished shards never come again; only those in flight at save time do
            finished = {f"s{int(os.path.basename(u)[:5])}" for u in state["done"]}
            assert not finished & {k.split("_")[0] for k in after}
            assert again <= {f"s{int(os.path.basename(u)[:5])}" for u in tracker.in_flight()}
        assert set(first) | set(second) == ALL_KEYS  # nothing lost
        assert max(second.values()) == 1
        assert len(repeated_shards) <= bound
    assert n_done > 0  # some resumes did skip finished shards


def test_resume_from_union_of_rank_states(shards):
    """Loading the union of every rank's state resumes consistently too."""
    trackers = [ShardProgress(0) for _ in range(RANKS)]
    before = [run_rank(shards, r, 0, stop_after=9, tracker=trackers[r], shuffle=0) for r in range(RANKS)]
    union = {"epoch": 0, "done": sorted({u for t in trackers for u in t.done()})}
    after = [run_rank(shards, r, state=union, shuffle=0) for r in range(RANKS)]
    seen = Counter(k for part in before + after for k in part)
    assert set(seen) == ALL_KEYS
    assert sum(seen.values()) - len(ALL_KEYS) <= RANKS * WORKERS * max(SIZES)


def test_resampled_equal_length(shards):
    counts = []
    for rank in range(RANKS):
        keys = run_rank(shards, rank, resampled=True, samples_per_epoch=14)
        counts.append(len(keys))
        assert set(keys) <= ALL_KEYS
    assert counts == [14, 14]


def test_filters_and_corrupt_samples(tmp_path):
    samples = [
        ("ok", {"jpg": png((20, 20)), "txt": b"fine"}),
        ("small", {"jpg": png((6, 20)), "txt": b"too small"}),
        ("wide", {"jpg": png((16, 64)), "txt": b"aspect 4"}),
        ("meta_small", {"jpg": png((20, 20)), "txt": b"json says small",
                        "json": json.dumps({"original_width": 8, "original_height": 8}).encode()}),
        ("broken", {"jpg": b"\xff\xd8\xff garbage", "txt": b"corrupt"}),
        ("noimage", {"txt": b"caption only"}),
        ("ok2", {"png": png((24, 30)), "txt": b"fine too"}),
    ]
    write_shard(str(tmp_path / "f.tar"), samples)
    ds = WebImageText(str(tmp_path / "f.tar"), size=8, min_size=10, max_aspect=2.0, shardshuffle=False)
    items = list(ds)
    assert [it["__key__"] for it in items] == ["ok", "ok2"]
    assert [it["__index__"] for it in items] == [0, 1] and [it["__last__"] for it in items] == [False, True]
    assert ds.skipped == 1 and ds.filtered == 4


def test_sd2_inpainting_data_config(tmp_path):
    """The data section of SD 2's v2-inpainting config, pointed at local shards and shrunk to 32 px."""
    from omegaconf import OmegaConf

    from conftest import reference_or_skip
    from ldm.util import instantiate_from_config
    ref = reference_or_skip()
    cfg = OmegaConf.load(ref / "configs/stablediffusion/configs/stable-diffusion/v2-inpainting-inference.yaml").data
    meta = lambda w, h, wm=0.1: json.dumps({"original_width": w, "original_height": h, "pwatermark": wm,  # noqa: E731
                                            "punsafe": 0.0}).encode()
    for s in range(2):
        write_shard(str(tmp_path / f"{s:05d}.tar"), [
            (f"k{s}_{i}", {"jpg": png((40, 48), 30 + 40 * i), "txt": f"a photo {s} {i}".encode(),
                           "json": meta(600, 700, 0.9 if i == 3 else 0.1)}) for i in range(5)]
            + [(f"small{s}", {"jpg": png((40, 48)), "txt": b"small", "json": meta(300, 700)})])
    cfg.params.tar_base = str(tmp_path)
    cfg.params.batch_size = 4
    cfg.params.num_workers = 2
    for split in ("train", "validation"):
        cfg.params[split].shards = ["{00000..00001}.tar"]
        cfg.params[split].image_transforms[0].params.size = 32
        cfg.params[split].image_transforms[1].params.size = 32
    dm = instantiate_from_config(cfg)
    pickle.loads(pickle.dumps(dm.make_dataset(cfg.params.train, train=True)))  # spawn-safe
    val = list(dm.val_dataloader())
    keys = [k for b in val for k in b["__key__"]]
    assert sorted(keys) == sorted(f"k{s}_{i}" for s in range(2) for i in (0, 1, 2, 4))  # min_size, pwatermark filters
    b = next(iter(dm.train_dataloader()))
    x, m, mx = b["jpg"], b["mask"], b["masked_image"]
    assert x.shape == (4, 32, 32, 3) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert m.shape == (4, 32, 32, 1) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mx, x * (m < 0.5)) and all(isinstance(t, str) for t in b["txt"])
