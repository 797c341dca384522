"""Text-image pairs streamed from WebDataset tar shards (`<key>.jpg` + `<key>.txt` [+ `<key>.json`]).

Pipeline per epoch, for rank r of R and DataLoader worker w of W:

1. shard list: brace-expanded (`data/{00000..00099}.tar`, several patterns with a list or
   `::`), any URL `webdataset.gopen` opens (files, `pipe:`, http...);
2. shard order: shuffled with (seed, epoch) when `shardshuffle`, the same on every rank;
3. split: rank r takes `order[r::R]`, its worker w takes `[w::W]` of that: every shard is
   read by exactly one (rank, worker), so an epoch sees every sample exactly once; shards
   already finished in this epoch (see resuming) are then dropped;
   with `resampled=True` instead each worker draws shards with replacement forever
   (seeded by seed, epoch, rank, worker) for multi-epoch / infinite streams;
4. samples: image decoded (unreadable ones logged and counted in `self.skipped`, never
   raised), filtered by `min_size` and `max_aspect` (from the `.json` `original_width` /
   `original_height` when present, else from the decoded image), transformed;
5. shuffle buffer of up to `shuffle` samples (seeded by seed, epoch, rank, worker), which
   starts yielding at `shuffle_initial` samples and grows by one per output, as webdataset's;
6. `samples_per_epoch` (per rank) caps the stream: use it with `resampled` to give every
   rank the same number of batches.

Items: {"image": (size, size, 3) float32 in [-1, 1], "caption": str, "__key__", "__url__",
"__index__" (position among the shard's kept samples), "__last__" (True on its last one)}.

Resuming mid-epoch: feed delivered batches to a `ShardProgress`; its `state_dict()` lists
the shards every sample of which was delivered. `dataset.load_state_dict(state)` skips those
for the rest of that epoch (each rank may load its own state, or the union of all ranks';
with a different number of ranks, load the union). A shard that was partially delivered when the state was saved
is read again from its start, so the samples repeated after a resume are bounded by those
of the shards in flight at that moment: per (rank, worker) the shard being read plus the
shards whose samples still sat in the shuffle buffer, i.e. at most
R * W * (1 + ceil(shuffle / smallest shard)) shards. No fully delivered shard is repeated,
and no sample is lost. (With `resampled`, shards repeat by design: resume with a new epoch.)

Epochs: each `__iter__` of the same object advances the epoch by itself (the main process
with num_workers=0, and persistent workers, which keep their copy). A DataLoader with
non-persistent workers copies the dataset at every epoch: call `set_epoch(e)` before each.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data._image import process_rng, smallest_side_to, square_crop, to_float

log = logging.getLogger("ldm.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Brace-expand one pattern (or '::'-separated patterns) or a list of them."""
    from webdataset.shardlists import expand_urls
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls = [u.strip() for p in patterns for u in expand_urls(str(p))]
    if not urls:
        raise ValueError(f"no shards in {shards!r}")
    return urls


def dist_rank_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed, else $RANK / $WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ResizeCrop:
    """Default image transform: smallest side to `size`, square crop, [-1, 1] float32 HWC."""

    def __init__(self, size: Optional[int], random_crop: bool = False) -> None:
        self.size, self.random_crop = size, random_crop

    def __call__(self, img: Image.Image) -> np.ndarray:
        arr = np.asarray(img, dtype=np.uint8)
        if self.size is not None:
            arr = square_crop(smallest_side_to(arr, self.size), self.size, process_rng() if self.random_crop else None)
        return to_float(arr)


class ShardProgress:
    """Main-process record of delivered samples per shard, for resuming mid-epoch."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.count: Counter[str] = Counter()
        self.size: dict[str, int] = {}

    def update(self, batch: dict) -> None:
        for url, idx, last in zip(batch["__url__"], batch["__index__"], batch["__last__"]):
            self.count[url] += 1
            if bool(last):
                self.size[url] = int(idx) + 1

    def done(self) -> list[str]:
        return sorted(u for u, n in self.size.items() if self.count[u] == n)

    def in_flight(self) -> list[str]:
        done = set(self.done())
        return sorted(u for u in self.count if u not in done)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "done": self.done()}


class WebImageText(IterableDataset):
    def __init__(
        self,
        shards: str | Sequence[str],  # tar URLs / brace patterns
        size: Optional[int] = None,  # default transform: smallest side to size + square crop
        random_crop: bool = False,  # default transform: random instead of center crop
        image_transform: Optional[Callable[[Image.Image], Any]] = None,  # replaces the default transform
        shuffle: int = 0,  # sample shuffle buffer size (0: none)
        shuffle_initial: int = 100,  # start yielding once the buffer holds this many (it keeps growing)
        shardshuffle: bool = True,  # shuffle the shard order each epoch
        resampled: bool = False,  # draw shards with replacement forever (multi-epoch streams)
        samples_per_epoch: Optional[int] = None,  # per-rank cap on samples per epoch
        seed: int = 0,  # base of every shuffle's seed
        rank: Optional[int] = None,  # this process' rank (None: torch.distributed / $RANK)
        world_size: Optional[int] = None,  # number of ranks (None: torch.distributed / $WORLD_SIZE)
        image_keys: Sequence[str] = IMAGE_KEYS,  # tar member extensions tried for the image
        caption_key: str = "txt",  # tar member extension of the caption
        min_size: Optional[int] = None,  # drop images whose smaller side is below this
        max_aspect: Optional[float] = None,  # drop images with long / short side above this
        select: Optional[Callable[[dict], bool]] = None,  # extra predicate on the raw sample (bytes + "json")
        image_out_key: str = "image",  # output key names
        caption_out_key: str = "caption",
        postprocess: Optional[Callable[[dict], dict]] = None,  # applied to each output item
    ) -> None:
        self.urls = expand_shards(shards)
        self.image_transform = image_transform or ResizeCrop(size, random_crop)
        self.shuffle, self.shardshuffle, self.resampled = shuffle, shardshuffle, resampled
        self.shuffle_initial = min(shuffle_initial, shuffle)
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.rank, self.world_size = rank, world_size
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self.min_size, self.max_aspect, self.select = min_size, max_aspect, select
        self.image_out_key, self.caption_out_key = image_out_key, caption_out_key
        self.postprocess = postprocess
        self.epoch = 0
        self._explicit_epoch = False
        self.skip: dict[int, set[str]] = {}
        self.skipped = 0
        self.filtered = 0

    # -- epochs and resuming ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._explicit_epoch = True

    def load_state_dict(self, state: dict) -> None:
        """Resume inside `state["epoch"]`, skipping its finished shards `state["done"]`."""
        self.set_epoch(int(state["epoch"]))
        self.skip = {int(state["epoch"]): set(state.get("done", []))}

    # -- which shards ------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[str]:
        order = list(self.urls)
        if self.shardshuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order

    def shards_for(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
        """This (rank, worker)'s shards: the split ignores finished shards, which are then dropped,
        so any rank's state (or the union of all ranks' states) resumes consistently."""
        done = self.skip.get(epoch, set())
        return [u for u in self.epoch_order(epoch)[rank::world_size][worker::num_workers] if u not in done]

    def _shard_stream(self, epoch: int, rank: int, world: int, worker: int, nw: int) -> Iterator[str]:
        if not self.resampled:
            mine = self.shards_for(epoch, rank, world, worker, nw)
            if not mine and world * nw > len(self.urls):
                log.warning("rank %d worker %d has no shard: %d shards for %d ranks x %d workers",
                            rank, worker, len(self.urls), world, nw)
            yield from mine
            return
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
        while True:
            yield self.urls[int(rng.integers(len(self.urls)))]

    # -- samples -----------------------------------------------------------------------------
    def _keep_size(self, sample: dict, hw: Optional[tuple[int, int]]) -> bool:
        if self.min_size is None and self.max_aspect is None:
            return True
        meta = sample.get("json") or {}
        if "original_width" in meta and "original_height" in meta:
            h, w = int(meta["original_height"]), int(meta["original_width"])
        elif hw is not None:
            h, w = hw
        else:
            return True
        if self.min_size is not None and min(h, w) < self.min_size:
            return False
        return self.max_aspect is None or max(h, w) / max(1, min(h, w)) <= self.max_aspect

    def _decode(self, raw: dict) -> Optional[dict]:
        import json
        name = f"{raw.get('__url__')}:{raw.get('__key__')}"
        if "json" in raw and isinstance(raw["json"], (bytes, str)):
            try:
                raw["json"] = json.loads(raw["json"])
            except ValueError:
                raw["json"] = {}
        key = next((k for k in self.image_keys if k in raw), None)
        if key is None or (self.select is not None and not self.select(raw)) or not self._keep_size(raw, None):
            self.filtered += 1
            return None
        try:
            with Image.open(io.BytesIO(raw[key])) as img:
                img.load()
                pil = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            self.skipped += 1
            log.warning("skipping unreadable image %s (%s); %d skipped so far", name, e, self.skipped)
            return None
        if not self._keep_size({}, (pil.height, pil.width)):
            self.filtered += 1
            return None
        caption = raw.get(self.caption_key, b"")
        caption = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)
        return {self.image_out_key: self.image_transform(pil), self.caption_out_key: caption,
                "__key__": raw["__key__"], "__url__": raw["__url__"]}

    def _shard_samples(self, url: str) -> Iterator[dict]:
        """Decoded, kept samples of one shard with __index__ / __last__ (one-sample lookahead)."""
        from webdataset.tariterators import tarfile_samples

        def handler(exn: Exception) -> bool:
            self.skipped += 1
            log.warning("skipping unreadable data in shard %s: %s", url, exn)
            return True

        prev: Optional[dict] = None
        index = 0
        for raw in tarfile_samples(iter([{"url": url}]), handler=handler):
            item = self._decode(raw)
            if item is None:
                continue
            if prev is not None:
                yield prev
            prev = {**item, "__index__": index, "__last__": False}
            index += 1
        if prev is not None:
            prev["__last__"] = True
            yield prev

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = dist_rank_world(self.rank, self.world_size)
        epoch = self.epoch
        if not self._explicit_epoch:
            self.epoch += 1  # next __iter__ of this object is the next epoch
        self._explicit_epoch = False
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 2])
        cap = None if self.samples_per_epoch is None else math.ceil(self.samples_per_epoch / nw)
        buffer: list[dict] = []
        emitted = 0
        items = (item for url in self._shard_stream(epoch, rank, world, worker, nw) for item in self._shard_samples(url))
        for item in items:
            if self.shuffle > 1:  # webdataset's shuffle: the buffer gains one sample per output up to `shuffle`
                buffer.append(item)
                if len(buffer) < self.shuffle:
                    buffer.extend(itertools.islice(items, 1))
                if len(buffer) < self.shuffle_initial:
                    continue
                item = self._pick(buffer, rng)
            yield self._post(item)
            emitted += 1
            if cap is not None and emitted >= cap:
                return
        while buffer and (cap is None or emitted < cap):
            yield self._post(self._pick(buffer, rng))
            emitted += 1

    @staticmethod
    def _pick(buffer: list[dict], rng: np.random.Generator) -> dict:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        return buffer.pop()

    def _post(self, item: dict) -> dict:
        return self.postprocess(item) if self.postprocess is not None else item
