"""The caption-image data `models/ldm/text2img256/config.yaml` names (`PreviewsTrain/Validation(size=256)`).

The original's data (LAION "previews") was never released; these factories read the same
kind of data from one of the two generic sources, whichever the split folder holds:

    data/previews/train/*.tar, data/previews/validation/*.tar
        WebDataset shards of <key>.jpg + <key>.txt (`ldm.data.webdataset_source.WebImageText`:
        split over ranks and workers, shuffled, resumable; an IterableDataset)
    data/previews/train/**/<name>.jpg + <name>.txt, likewise validation/
        an image folder with sidecar captions (`ldm.data.base.ImageFolderDataset`)

(`$LDM_DATA_ROOT` or `data_root=` replaces `data/`; `shards=` names tar URLs / brace patterns
directly.) Items: {"image": (size, size, 3) float32 in [-1, 1], "caption": str, ...}, the
keys `first_stage_key: image` / `cond_stage_key: caption` read.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Optional

from torch.utils.data import Dataset

from ldm.data._image import data_path


def _previews(split: str, size: int, data_root: Optional[str], shards: Optional[str | Sequence[str]],
              random_crop: bool, shuffle: int, min_size: Optional[int]) -> Dataset:
    root = data_path(f"data/previews/{split}", data_root)
    tars = shards if shards is not None else sorted(glob.glob(os.path.join(root, "*.tar")))
    if tars:
        from ldm.data.webdataset_source import WebImageText
        return WebImageText(tars, size=size, random_crop=random_crop, shuffle=shuffle,
                            shardshuffle=split == "train", min_size=min_size)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Previews{split.capitalize()}: {root} not found; expected WebDataset shards "
                                f"{root}/*.tar (<key>.jpg + <key>.txt) or images with sidecar .txt captions")
    from ldm.data.base import ImageFolderDataset
    return ImageFolderDataset(root, size=size, random_crop=random_crop, caption_ext=".txt")


def PreviewsTrain(
    size: int = 256,  # output side (smallest side resize + crop)
    data_root: Optional[str] = None,  # replaces the leading "data/" of data/previews/train
    shards: Optional[str | Sequence[str]] = None,  # tar URLs / brace patterns instead of the folder
    random_crop: bool = True,  # random instead of center crop
    shuffle: int = 1000,  # sample shuffle buffer (tar shards only)
    min_size: Optional[int] = None,  # drop smaller images (tar shards only)
) -> Dataset:
    """Training split: tar shards (iterable) or a captioned image folder (map-style)."""
    return _previews("train", size, data_root, shards, random_crop, shuffle, min_size)


def PreviewsValidation(
    size: int = 256,
    data_root: Optional[str] = None,
    shards: Optional[str | Sequence[str]] = None,
    random_crop: bool = False,
    shuffle: int = 0,
    min_size: Optional[int] = None,
) -> Dataset:
    """Validation split: as `PreviewsTrain`, center crops and no shuffling by default."""
    return _previews("validation", size, data_root, shards, random_crop, shuffle, min_size)
