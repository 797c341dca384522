"""CelebA-HQ and FFHQ, as taming-transformers' `taming.data.faceshq` (configs name both paths).

Layout (relative to the working directory; `$LDM_DATA_ROOT` or `data_root=` replaces `data/`):

    data/celebahqtrain.txt, data/celebahqvalidation.txt   relative paths, one per line
    data/celebahq/<relpath>        `.npy` arrays (1, 3, 1024, 1024) uint8 as released, or image files
    data/ffhqtrain.txt, data/ffhqvalidation.txt
    data/ffhq/<relpath>            image files (png)

Items: {"image": (size, size, 3) float32 in [-1, 1], "file_path_": str}, restricted to `keys`
when given. `FacesHQTrain/Validation` concatenate both, add "class" (0 CelebA-HQ, 1 FFHQ) and
an optional crop (`crop_size`) with a matching "coord" map.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ldm.data._image import crop, crop_box, data_path, process_rng, read_split_file, require_nonempty
from ldm.data.sources import ConcatDatasetWithIndex, ImagePaths


class FacesBase(Dataset):
    """Holds `self.data` (an `ImagePaths`) and returns only `self.keys` of each example."""

    data: Dataset
    keys: Optional[Sequence[str]] = None

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        example = self.data[i]
        if self.keys is not None:
            return {k: example[k] for k in self.keys}
        return example


def _faces(split_file: str, root: str, size: Optional[int], data_root: Optional[str]) -> ImagePaths:
    split_file, root = data_path(split_file, data_root), data_path(root, data_root)
    relpaths = read_split_file(split_file)
    require_nonempty(relpaths, split_file, "<relative image path per line>")
    return ImagePaths([os.path.join(root, p) for p in relpaths], size=size, random_crop=False)


class CelebAHQTrain(FacesBase):
    def __init__(
        self,
        size: Optional[int],  # output side (smallest side resize + center crop)
        keys: Optional[Sequence[str]] = None,  # return only these keys of each example
        data_root: Optional[str] = None,  # replaces the leading "data/" of the original paths
    ) -> None:
        self.data = _faces("data/celebahqtrain.txt", "data/celebahq", size, data_root)
        self.keys = keys


class CelebAHQValidation(FacesBase):
    def __init__(self, size: Optional[int], keys: Optional[Sequence[str]] = None, data_root: Optional[str] = None) -> None:
        self.data = _faces("data/celebahqvalidation.txt", "data/celebahq", size, data_root)
        self.keys = keys


class FFHQTrain(FacesBase):
    def __init__(self, size: Optional[int], keys: Optional[Sequence[str]] = None, data_root: Optional[str] = None) -> None:
        self.data = _faces("data/ffhqtrain.txt", "data/ffhq", size, data_root)
        self.keys = keys


class FFHQValidation(FacesBase):
    def __init__(self, size: Optional[int], keys: Optional[Sequence[str]] = None, data_root: Optional[str] = None) -> None:
        self.data = _faces("data/ffhqvalidation.txt", "data/ffhq", size, data_root)
        self.keys = keys


class _FacesHQ(Dataset):
    """CelebA-HQ [class 0] + FFHQ [class 1], optionally cropped to `crop_size` (with a coord map)."""

    random: bool = True

    def __init__(self, parts: list[Dataset], crop_size: Optional[int], coord: bool) -> None:
        self.data = ConcatDatasetWithIndex(parts)
        self.crop_size = crop_size
        self.coord = coord

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        ex, y = self.data[i]
        if self.crop_size is not None and "image" in ex:
            h, w, _ = ex["image"].shape
            top, left = crop_box((h, w), (self.crop_size, self.crop_size), process_rng() if self.random else None)
            if self.coord:
                coord = (np.arange(h * w).reshape(h, w, 1) / (h * w)).astype(np.float32)
                ex["coord"] = crop(coord, top, left, self.crop_size, self.crop_size)
            ex["image"] = crop(ex["image"], top, left, self.crop_size, self.crop_size)
        ex["class"] = y
        return ex


class FacesHQTrain(_FacesHQ):
    random = True

    def __init__(
        self,
        size: Optional[int],  # resize (smallest side + center crop) of both parts
        keys: Optional[Sequence[str]] = None,  # keys kept from each part's example
        crop_size: Optional[int] = None,  # then a random crop of this side
        coord: bool = False,  # add "coord": the crop of an (H, W, 1) map of normalized pixel indices
        data_root: Optional[str] = None,  # replaces the leading "data/" of the original paths
    ) -> None:
        parts = [CelebAHQTrain(size=size, keys=keys, data_root=data_root), FFHQTrain(size=size, keys=keys, data_root=data_root)]
        super().__init__(parts, crop_size, coord)


class FacesHQValidation(_FacesHQ):
    random = False  # center crop

    def __init__(self, size: Optional[int], keys: Optional[Sequence[str]] = None, crop_size: Optional[int] = None,
                 coord: bool = False, data_root: Optional[str] = None) -> None:
        parts = [CelebAHQValidation(size=size, keys=keys, data_root=data_root),
                 FFHQValidation(size=size, keys=keys, data_root=data_root)]
        super().__init__(parts, crop_size, coord)
