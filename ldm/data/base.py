"""Generic data pieces: an image-folder dataset, the original iterable base class, and a
resumable sampler / loader pair that lets a run stopped mid-epoch continue on exactly the
batches an uninterrupted run would have seen.

Images come out as the original datasets give them: HWC float32 in [-1, 1] under "image".
"""
from __future__ import annotations

import logging
import os
import random
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Txt2ImgIterableBaseDataset(IterableDataset):
    """Base of the original's streaming datasets: `main.worker_init_fn` shards `valid_ids` over workers."""

    def __init__(self, num_records: int = 0, valid_ids: Optional[Sequence] = None, size: int = 256):
        super().__init__()
        self.num_records = num_records  # number of samples, reported as len()
        self.valid_ids = valid_ids  # the ids to stream; each worker takes a contiguous share
        self.sample_ids = valid_ids
        self.size = size  # image side length
        log.info("%s dataset contains %d examples.", self.__class__.__name__, self.__len__())

    def __len__(self) -> int:
        return self.num_records

    @abstractmethod
    def __iter__(self) -> Iterator[dict]:
        pass


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image fully (so truncated files fail here, not later) as RGB."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def resize_and_crop(img: Image.Image, size: Optional[int], random_crop: bool = False) -> Image.Image:
    """Shorter side to `size` (bicubic), then a centre (or random) `size` x `size` crop."""
    if size is None:
        return img
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    if random_crop:
        left, top = random.randint(0, w - size), random.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_model_range(img: Image.Image) -> np.ndarray:
    """uint8 RGB -> HWC float32 in [-1, 1]."""
    return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


class ImageFolderDataset(Dataset):
    """Every image under `root` (recursively), optionally labelled by its class subfolder and
    captioned by a sidecar text file (`caption_ext`), under the keys the model reads
    (`image_key` / `caption_key`: "jpg" / "txt" for Stable Diffusion, as in its WebDataset shards).
    A file that cannot be decoded is logged, counted in `num_skipped` and replaced by the next
    readable one, so an epoch never stops on it."""

    def __init__(
        self,
        root: str,
        size: Optional[int] = None,
        random_crop: bool = False,
        flip_p: float = 0.0,
        class_subfolders: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        caption_ext: Optional[str] = None,
        image_key: str = "image",
        caption_key: str = "caption",
        caption_dropout: float = 0.0,
    ):
        super().__init__()
        self.root = Path(root)  # folder searched recursively for images
        self.size = size  # output side length (shorter side resized, then cropped); None keeps the file's size
        self.random_crop = random_crop  # random instead of centre crop
        self.flip_p = flip_p  # probability of a horizontal flip
        self.class_subfolders = class_subfolders  # label = index of the first-level subfolder (sorted names)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.caption_ext = caption_ext  # e.g. ".txt": caption read from <image stem><caption_ext>
        self.image_key = image_key  # item key of the image ("jpg" for SD's first_stage_key)
        self.caption_key = caption_key  # item key of the caption ("txt" for SD's cond_stage_key)
        self.caption_dropout = caption_dropout  # probability of an empty caption (trains classifier-free guidance)
        pattern = f"{self.root}/**/*{{{','.join(self.extensions)}}}"
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist (looking for {pattern})")
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in self.extensions)
        if not self.paths:
            raise FileNotFoundError(f"no images found in '{self.root}' (looking for {pattern})")
        if class_subfolders:
            self.paths = [p for p in self.paths if p.parent != self.root]
            if not self.paths:
                raise FileNotFoundError(f"class_subfolders=True but '{self.root}' has no images in subfolders")
            self.class_names = sorted({p.relative_to(self.root).parts[0] for p in self.paths})
            self._class_index = {name: i for i, name in enumerate(self.class_names)}
        self.num_skipped = 0  # decode failures met so far (in this process)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self._bad.add(j)
                self.num_skipped += 1
                log.warning("skipping unreadable image %s (%s); %d skipped so far", self.paths[j], e, self.num_skipped)
        raise RuntimeError(f"none of the {len(self.paths)} images under '{self.root}' could be read")

    def _load(self, j: int) -> dict[str, Any]:
        path = self.paths[j]
        img = resize_and_crop(load_image(path), self.size, self.random_crop)
        if self.flip_p > 0 and random.random() < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        example: dict[str, Any] = {self.image_key: to_model_range(img), "file_path_": str(path)}
        if self.class_subfolders:
            name = path.relative_to(self.root).parts[0]
            example["class_label"] = self._class_index[name]
            example["human_label"] = name
        if self.caption_ext is not None:
            cap = path.with_suffix(self.caption_ext)
            text = cap.read_text(encoding="utf-8").strip() if cap.exists() else ""
            example[self.caption_key] = "" if self.caption_dropout > 0 and random.random() < self.caption_dropout \
                else text
        return example


# ----------------------------------------------------------------------------------------
# Resumable shuffling: the order depends only on (seed, epoch); a restored loader skips the
# batches the interrupted run had already trained on.
# ----------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffle by `seed + epoch`, shard by rank) that can start an epoch
    part-way. Being a DistributedSampler, Lightning keeps it instead of swapping in its own."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume: Optional[tuple[int, int]] = None  # (epoch, samples of this rank to skip)

    def resume_at(self, epoch: int, skip_samples: int) -> None:
        """The next pass over `epoch` starts after its first `skip_samples` indices (of this rank)."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip_samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = indices[skip:]
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader with Lightning's `state_dict` / `load_state_dict` (its `_Stateful` protocol):
    the state is (epoch, batches done in it), read from `progress` at save time, so batches
    Lightning prefetched but did not train on are not counted."""

    progress: Optional[Callable[[], Optional[int]]] = None  # -> batches trained on in the current epoch

    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else None
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches_done": int(done or 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, ResumableSampler):
            return
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
        if done >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        self.sampler.resume_at(epoch, done * (self.batch_size or 1))
