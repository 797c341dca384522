"""Aspect-ratio bucketing (as NovelAI / kohya-ss sd-scripts): images keep roughly their aspect
ratio by training at one of a few sizes of about the same area, each batch from one bucket.

Buckets (`make_buckets`): for each short side (a multiple of `step`, 64, up to `size`), the longest
long side (a multiple of `step`) with h * w <= size^2 and long / short <= `max_aspect`, both
orientations, the largest of each aspect ratio. An image goes
to the bucket of nearest log aspect ratio, is resized to cover it (bicubic, antialiased) and
centre- (or randomly) cropped.

Map-style sources (`BucketedImageFolder`) give every item its bucket up front (from the file
headers); `BucketBatchSampler` makes the batches. Per epoch (seed + epoch, as DistributedSampler):
each bucket's images are shuffled and cut into batches of `batch_size`, the short last batch of a
bucket is KEPT (so no image is dropped or repeated), the batches are shuffled, and while their
number is not a multiple of the number of ranks the largest batch is split in two (so every rank
runs the same number of steps, and still each image appears exactly once per epoch); rank r takes
batches r, r + R, ... DataLoader workers then take whole batches. `drop_last=True` instead drops
each bucket's short batch and the batches past the last multiple of R.

WebDataset shards (`WebBucketBatches`) are grouped in the stream: each (rank, worker) reads its
own shards (WebImageText's split), fills one buffer per bucket and yields a batch when a buffer
is full; the partial buffers are yielded at the end of the epoch (unless drop_last). Ranks may
then yield different numbers of batches, which DDP cannot step through unevenly: bound the epoch
(`resampled: true` streams with `max_steps`, or `limit_train_batches`) as usual for WebDataset.

    data:
      target: ldm.data.bucketing.BucketedDataModule      # instead of main.DataModuleFromConfig
      params:
        batch_size: 8
        train:
          target: ldm.data.bucketing.BucketedImageFolder
          params: {root: data/my_images, size: 512, caption_ext: .txt}
    lightning:
      trainer:
        use_distributed_sampler: false   # the batch sampler shards by rank itself

`BucketedDataModule` is DataModuleFromConfig with bucketed loaders (the train set must be bucketed;
validation / test sets without buckets load as usual; a resumed run continues mid-epoch on the
batches an uninterrupted one would have seen).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, Sampler, default_collate

from ldm.data._image import crop, crop_box, process_rng
from ldm.data.base import IMAGE_EXTENSIONS, ImageFolderDataset
from ldm.data.webdataset_source import WebImageText, dist_rank_world
from ldm.training.data import DataModuleFromConfig, _EpochLoader


def make_buckets(size: int = 512, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes (h, w), multiples of `step`, area <= size^2, aspect <= max_aspect, sorted."""
    if size % step:
        raise ValueError(f"bucket size {size} is not a multiple of step {step}")
    area, best = size * size, {}
    for short in range(step, size + 1, step):
        # the longest side the area allows, capped by max_aspect
        long = min((area // short) // step, int(short * max_aspect) // step) * step
        if long >= short:
            ratio = round(long / short, 9)   # of equal aspect ratios keep the largest
            if ratio not in best or best[ratio][0] * best[ratio][1] < short * long:
                best[ratio] = (short, long)
    return sorted({hw for short, long in best.values() for hw in ((short, long), (long, short))})


def nearest_bucket(hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket of nearest log aspect ratio (ties: the larger area)."""
    ratio = math.log(hw[0] / hw[1])
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio),
                                                    -buckets[i][0] * buckets[i][1]))


def fit_to_bucket(img: np.ndarray, hw: tuple[int, int], rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """HWC float image resized to cover `hw` (bicubic, antialiased) and cropped to it."""
    h, w = img.shape[:2]
    scale = max(hw[0] / h, hw[1] / w)
    size = (max(hw[0], round(h * scale)), max(hw[1], round(w * scale)))
    if size != (h, w):
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        img = x[0].permute(1, 2, 0).clamp(-1, 1).numpy()
    top, left = crop_box(img.shape[:2], hw, rng)
    return np.ascontiguousarray(crop(img, top, left, *hw), dtype=np.float32)


class BucketedImageFolder(ImageFolderDataset):
    """ImageFolderDataset whose items are resized and cropped to their aspect bucket;
    `bucket_ids[i]` is item i's bucket in `buckets`."""

    def __init__(self, root: str, size: int = 512, step: int = 64, max_aspect: float = 2.0,
                 random_crop: bool = False, flip_p: float = 0.0, class_subfolders: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, caption_ext: Optional[str] = None):
        # size: bucket area is about size x size; step: side granularity; max_aspect: long / short side
        super().__init__(root, size=None, random_crop=random_crop, flip_p=flip_p,
                         class_subfolders=class_subfolders, extensions=extensions, caption_ext=caption_ext)
        self.buckets = make_buckets(size, step, max_aspect)
        self.bucket_ids = []
        for path in self.paths:
            try:
                with Image.open(path) as img:   # header only
                    w, h = img.size
            except OSError:
                w = h = 1   # unreadable: __getitem__ replaces it by the next readable image
            self.bucket_ids.append(nearest_bucket((h, w), self.buckets))

    def __getitem__(self, i: int) -> dict[str, Any]:
        # an unreadable file is replaced by the next readable one, cut to item i's bucket
        self._bucket = self.buckets[self.bucket_ids[i]]
        return super().__getitem__(i)

    def _load(self, j: int) -> dict[str, Any]:
        example = super()._load(j)   # the file's own size
        rng = process_rng() if self.random_crop else None
        example["image"] = fit_to_bucket(example["image"], self._bucket, rng)
        return example


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of one bucket each, sharded over ranks (see the module docstring for the rule)."""

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        # bucket_ids: bucket of each dataset index; num_replicas / rank: default torch.distributed's
        self.bucket_ids = list(bucket_ids)
        self.batch_size = int(batch_size)
        self.rank, self.num_replicas = dist_rank_world(rank, num_replicas)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} not in [0, {self.num_replicas})")
        if len(self.bucket_ids) < self.num_replicas and not drop_last:
            raise ValueError(f"{len(self.bucket_ids)} images cannot be shared by {self.num_replicas} ranks")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._resume: Optional[tuple[int, int]] = None   # (epoch, batches of this rank to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip_batches: int) -> None:
        """The next pass over `epoch` starts after this rank's first `skip_batches` batches."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip_batches)

    def epoch_batches(self) -> list[list[int]]:
        """All ranks' batches of this epoch, in order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        members: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            members.setdefault(b, []).append(i)
        batches: list[list[int]] = []
        for b in sorted(members):
            idx = members[b]
            if self.shuffle:
                idx = [idx[k] for k in torch.randperm(len(idx), generator=g).tolist()]
            for k in range(0, len(idx), self.batch_size):
                if not self.drop_last or k + self.batch_size <= len(idx):
                    batches.append(idx[k:k + self.batch_size])
        if self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        if self.drop_last:
            return batches[:len(batches) - len(batches) % self.num_replicas]
        while len(batches) % self.num_replicas:
            k = max(range(len(batches)), key=lambda i: len(batches[i]))   # first largest
            big = batches[k]
            batches[k:k + 1] = [big[:(len(big) + 1) // 2], big[(len(big) + 1) // 2:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()[self.rank::self.num_replicas]
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if epoch == self.epoch:
                batches = batches[skip:]
        return iter(batches)

    def __len__(self) -> int:
        return len(self.epoch_batches()) // self.num_replicas


class BucketedDataLoader(DataLoader):
    """A loader over a BucketBatchSampler with Lightning's `state_dict` / `load_state_dict`: a
    resumed run skips the batches the interrupted one trained on (as ResumableDataLoader)."""

    progress: Optional[Callable[[], Optional[int]]] = None  # -> batches trained on in the current epoch

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else None
        return {"epoch": int(self.batch_sampler.epoch), "batches_done": int(done or 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
        if done >= len(self):   # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        self.batch_sampler.resume_at(epoch, done)


class WebBucketBatches(IterableDataset):
    """Bucketed batches from WebDataset shards (WebImageText's arguments, without `size`)."""

    def __init__(self, shards: Any, batch_size: int, size: int = 512, step: int = 64, max_aspect: float = 2.0,
                 random_crop: bool = False, drop_last: bool = False, **source_kwargs: Any):
        self.source = WebImageText(shards, size=None, **source_kwargs)
        self.buckets = make_buckets(size, step, max_aspect)
        self.batch_size, self.random_crop, self.drop_last = int(batch_size), random_crop, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        key = self.source.image_out_key
        rng = process_rng() if self.random_crop else None
        buffers: dict[int, list[dict]] = {}
        for item in self.source:
            b = nearest_bucket(item[key].shape[:2], self.buckets)
            buffers.setdefault(b, []).append({**item, key: fit_to_bucket(item[key], self.buckets[b], rng)})
            if len(buffers[b]) == self.batch_size:
                yield default_collate(buffers.pop(b))
        if not self.drop_last:
            for b in sorted(buffers):
                yield default_collate(buffers[b])


class BucketedDataModule(DataModuleFromConfig):
    """DataModuleFromConfig whose loaders batch by bucket: map-style datasets with `bucket_ids`
    through BucketBatchSampler (rank / world from the trainer), WebBucketBatches as they come."""

    def _bucket_loader(self, split: str, shuffle: bool, rank: int = 0, world: int = 1) -> DataLoader:
        ds = self.datasets[split]
        if isinstance(ds, IterableDataset):
            loader = _EpochLoader(ds, batch_size=None, num_workers=self.num_workers,
                                  worker_init_fn=self._init_fn(split))
            loader.trainer = self.trainer
            return loader
        if not hasattr(ds, "bucket_ids"):
            raise TypeError(f"data.params.{split}: {type(ds).__name__} has no bucket_ids; use "
                            "ldm.data.bucketing.BucketedImageFolder or WebBucketBatches with BucketedDataModule")
        sampler = BucketBatchSampler(ds.bucket_ids, self.batch_size, num_replicas=world, rank=rank,
                                     shuffle=shuffle, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        loader = BucketedDataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers,
                                    worker_init_fn=self._init_fn(split))
        if split == "train":
            loader.progress = self._batches_done
        return loader

    def _train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return self._bucket_loader("train", True, rank, world)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]   # validation / test sets of one image size batch as usual
        if isinstance(ds, IterableDataset) or hasattr(ds, "bucket_ids"):
            return self._bucket_loader(split, shuffle)
        return super()._loader(split, shuffle)
