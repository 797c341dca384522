"""Landscape images with semantic maps, for LDM's semantic synthesis (`semantic_synthesis512`:
`RFWTrain/RFWValidation(size=768, crop_size=512, segmentation_to_float32=True)`).

Layout follows taming-transformers' S-FLCKR data (relative to the working directory;
`$LDM_DATA_ROOT` or `data_root=` replaces `data/`):

    data/landscapes/train.txt, validation.txt   image paths relative to images/, one per line
    data/landscapes/images/<relpath>            RGB images (.jpg)
    data/landscapes/segmentations/<relpath>     label maps, same relpath with .png: one uint8
                                                COCO-Stuff class index (0..181) per pixel

Preprocessing (taming's `SegmentationBase`): image smallest side to `size` (bicubic), label
map to the same size (nearest), then the same `crop_size` crop of both (random for train,
central for validation). Items: "image" (crop, crop, 3) float32 in [-1, 1] and
"segmentation" (crop, crop, 182) one-hot (float32 with `segmentation_to_float32`, else
float64 as the original's `np.eye`); labels >= 182 (e.g. 255 "unlabeled") are all-zero rows.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data._image import (BadImage, PIL_INTERPOLATION, SkipBadImages, crop, crop_box, data_path, load_image,
                             process_rng, read_split_file, require_nonempty, smallest_side_to, to_float)

N_LABELS = 182


def load_label_map(path: str) -> np.ndarray:
    """(H, W) uint8 class indices from a single-channel PNG."""
    try:
        with Image.open(path) as seg:
            seg.load()
            arr = np.asarray(seg)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(path, f"{type(e).__name__}: {e}") from None
    if arr.ndim == 3:  # saved as RGB with equal channels
        arr = arr[..., 0]
    return arr.astype(np.uint8)


def one_hot(labels: np.ndarray, n: int = N_LABELS, dtype: type = np.float32) -> np.ndarray:
    eye = np.concatenate([np.eye(n, dtype=dtype), np.zeros((256 - n, n), dtype=dtype)], axis=0)
    return eye[labels]


class SegmentationBase(SkipBadImages, Dataset):
    RANDOM_CROP = True

    def __init__(
        self,
        data_csv: str,  # split file: image paths relative to data_root
        data_root: str,  # image folder
        segmentation_root: str,  # label-map folder (same relative paths, .png)
        size: Optional[int] = None,  # smallest side resized to this (None: keep)
        crop_size: Optional[int] = None,  # square crop side (None: size)
        random_crop: Optional[bool] = None,  # default: random for train, center for validation
        interpolation: str = "bicubic",  # image resize filter (label maps always nearest)
        segmentation_to_float32: bool = False,  # one-hot as float32 instead of float64
        n_labels: int = N_LABELS,  # classes of the label maps (COCO-Stuff: 182)
    ) -> None:
        self.image_paths = read_split_file(data_csv)
        require_nonempty(self.image_paths, data_csv, "<relative image path per line>")
        self.labels = {
            "relative_file_path_": list(self.image_paths),
            "file_path_": [os.path.join(data_root, p) for p in self.image_paths],
            "segmentation_path_": [os.path.join(segmentation_root, os.path.splitext(p)[0] + ".png")
                                   for p in self.image_paths],
        }
        self.size = size if size and size > 0 else None
        self.crop_size = crop_size or self.size
        self.random_crop = self.RANDOM_CROP if random_crop is None else random_crop
        self.interpolation = PIL_INTERPOLATION[interpolation]
        self.dtype = np.float32 if segmentation_to_float32 else np.float64
        self.n_labels = n_labels

    def __len__(self) -> int:
        return len(self.image_paths)

    def _get_example(self, i: int) -> dict:
        example = {k: v[i] for k, v in self.labels.items()}
        image = load_image(example["file_path_"])
        seg = load_label_map(example["segmentation_path_"])
        if seg.shape != image.shape[:2]:
            seg = np.asarray(Image.fromarray(seg).resize(image.shape[1::-1], Image.NEAREST))
        if self.size is not None:
            image = smallest_side_to(image, self.size, self.interpolation)
            seg = smallest_side_to(seg, self.size, Image.NEAREST)
        if self.crop_size is not None:
            top, left = crop_box(image.shape[:2], (self.crop_size, self.crop_size),
                                 process_rng() if self.random_crop else None)
            image = crop(image, top, left, self.crop_size, self.crop_size)
            seg = crop(seg, top, left, self.crop_size, self.crop_size)
        example["image"] = to_float(image)
        example["segmentation"] = one_hot(seg, self.n_labels, self.dtype)
        return example


def _paths(split: str, data_root: Optional[str]) -> dict:
    root = data_path("data/landscapes", data_root)
    return {"data_csv": os.path.join(root, f"{split}.txt"), "data_root": os.path.join(root, "images"),
            "segmentation_root": os.path.join(root, "segmentations")}


class RFWTrain(SegmentationBase):
    RANDOM_CROP = True

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None,
                 segmentation_to_float32: bool = False, random_crop: Optional[bool] = None,
                 interpolation: str = "bicubic", data_root: Optional[str] = None) -> None:
        super().__init__(**_paths("train", data_root), size=size, crop_size=crop_size, random_crop=random_crop,
                         interpolation=interpolation, segmentation_to_float32=segmentation_to_float32)


class RFWValidation(SegmentationBase):
    RANDOM_CROP = False

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None,
                 segmentation_to_float32: bool = False, random_crop: Optional[bool] = None,
                 interpolation: str = "bicubic", data_root: Optional[str] = None) -> None:
        super().__init__(**_paths("validation", data_root), size=size, crop_size=crop_size, random_crop=random_crop,
                         interpolation=interpolation, segmentation_to_float32=segmentation_to_float32)
