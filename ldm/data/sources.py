"""Generic map-style image sources the named datasets are built from.

* `ImagePaths`: a list of files plus per-file labels, preprocessed as taming's `ImagePaths`
  (smallest side to `size`, center or random `size` crop, [-1, 1] float32 HWC under "image").
* `ConcatDatasetWithIndex`: `ConcatDataset` that also returns which dataset an item came from.
* the generic image folder (class subfolders, sidecar captions) is `ldm.data.base.ImageFolderDataset`.

Unreadable images are logged and skipped (see `ldm.data._image.SkipBadImages`).
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from ldm.data._image import SkipBadImages, load_image, process_rng, smallest_side_to, square_crop, to_float


class ImagePaths(SkipBadImages, Dataset):
    """Files + labels -> {"image": (size, size, 3) float32 in [-1, 1], "file_path_": str, **labels}."""

    def __init__(
        self,
        paths: Sequence[str],  # image files (or CelebA-HQ `.npy` arrays)
        size: Optional[int] = None,  # smallest side resized to this, then a square crop; None: as is
        random_crop: bool = False,  # random instead of center crop
        labels: Optional[Mapping[str, Sequence[Any]]] = None,  # extra per-file fields, same length as paths
        resample: int = Image.BILINEAR,  # PIL filter for the resize (albumentations default: linear)
    ) -> None:
        self.size = size if size is not None and size > 0 else None
        self.random_crop = random_crop
        self.resample = resample
        self.labels: dict[str, Sequence[Any]] = dict(labels or {})
        self.labels["file_path_"] = list(paths)
        for k, v in self.labels.items():
            if len(v) != len(paths):
                raise ValueError(f"label '{k}' has {len(v)} entries for {len(paths)} paths")
        self._length = len(paths)

    def __len__(self) -> int:
        return self._length

    def preprocess_image(self, image_path: str) -> np.ndarray:
        image = load_image(image_path)
        if self.size is not None:
            image = smallest_side_to(image, self.size, self.resample)
            image = square_crop(image, self.size, process_rng() if self.random_crop else None)
        return to_float(image)

    def _get_example(self, i: int) -> dict:
        example = {k: v[i] for k, v in self.labels.items()}
        example["image"] = self.preprocess_image(self.labels["file_path_"][i])
        return example


class ConcatDatasetWithIndex(ConcatDataset):
    """`ConcatDataset` returning `(item, index_of_dataset)`."""

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        if idx < 0:
            if -idx > len(self):
                raise ValueError("absolute value of index should not exceed dataset length")
            idx = len(self) + idx
        dataset_idx = bisect.bisect_right(self.cumulative_sizes, idx)
        sample_idx = idx if dataset_idx == 0 else idx - self.cumulative_sizes[dataset_idx - 1]
        return self.datasets[dataset_idx][sample_idx], dataset_idx
