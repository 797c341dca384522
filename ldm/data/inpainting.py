"""Inpainting data: images with LaMa-protocol masks (see `ldm.data.masks`).

Batch convention = the original `scripts/inpaint.py` (what the released `inpainting_big`
model consumes): with the image `x` in [0, 1] and the mask `m` in {0, 1} (1 = hole),

    masked_image = (1 - m) * x,   then every key is mapped by v * 2 - 1,

so "image" and "masked_image" are (H, W, 3) float32 in [-1, 1] (holes are -1 in
"masked_image") and "mask" is (H, W, 1) float32 in {-1, +1} (+1 = hole).
(SD 2's `ldm.data.laion.AddMask` uses SD 2's own convention; see there.)

Datasets:
* `InpaintingTrain` / `InpaintingValidation`: every image under `data/inpainting/train` /
  `data/inpainting/validation` (e.g. Places365), smallest side to `size`, random / center
  crop, a fresh mask per draw in training ("large" protocol) and a fixed mask per index in
  validation (`seed` + index; "thick" protocol by default, LaMa's thin/medium/thick for eval);
* `InpaintingExamples`: the original's `data/inpainting_examples` layout, pairs
  `<name>.png` + `<name>_mask.png` (white = hole).
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ldm.data._image import (SkipBadImages, data_path, list_images, load_image, process_rng, read_split_file,
                             require_nonempty, resize_to, smallest_side_to, square_crop)
from ldm.data.masks import make_mask, mask_protocol


def inpainting_example(image_u8: np.ndarray, mask01: np.ndarray) -> dict:
    """uint8 (H, W, 3) image + {0, 1} (H, W) mask -> the batch keys of scripts/inpaint.py."""
    x = image_u8.astype(np.float32) / 255.0
    m = (mask01 >= 0.5).astype(np.float32)[..., None]
    masked = (1.0 - m) * x
    return {"image": x * 2.0 - 1.0, "mask": m * 2.0 - 1.0, "masked_image": masked * 2.0 - 1.0}


class _InpaintingFolder(SkipBadImages, Dataset):
    fixed_masks: bool = False

    def __init__(self, split: str, size: int, protocol: str, random_crop: bool, seed: int,
                 data_root: Optional[str], file_list: Optional[str]) -> None:
        root = data_path(f"data/inpainting/{split}", data_root)
        relpaths = read_split_file(file_list) if file_list is not None else list_images(root)
        require_nonempty(relpaths, file_list or root, "<image files>")
        self.paths = [os.path.join(root, p) for p in relpaths]
        self.size = size
        self.protocol = mask_protocol(protocol)
        self.random_crop = random_crop
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def _get_example(self, i: int) -> dict:
        path = self.paths[i]
        img = smallest_side_to(load_image(path), self.size)
        img = square_crop(img, self.size, process_rng() if self.random_crop else None)
        rng = np.random.default_rng([self.seed, i]) if self.fixed_masks else process_rng()
        example = inpainting_example(img, make_mask(self.size, self.size, self.protocol, rng))
        example["file_path_"] = path
        return example


class InpaintingTrain(_InpaintingFolder):
    fixed_masks = False

    def __init__(
        self,
        size: int = 256,  # output side (smallest side resize + crop)
        protocol: str = "large",  # mask protocol, see ldm.data.masks.PROTOCOLS
        random_crop: bool = True,  # random instead of center crop
        data_root: Optional[str] = None,  # replaces the leading "data/" of data/inpainting/train
        file_list: Optional[str] = None,  # text file of image paths relative to the folder (else scanned)
    ) -> None:
        super().__init__("train", size, protocol, random_crop, 0, data_root, file_list)


class InpaintingValidation(_InpaintingFolder):
    fixed_masks = True

    def __init__(
        self,
        size: int = 256,  # output side (smallest side resize + center crop)
        protocol: str = "thick",  # LaMa eval protocol: thin | medium | thick
        seed: int = 0,  # masks are a function of (seed, index): identical across runs
        data_root: Optional[str] = None,  # replaces the leading "data/" of data/inpainting/validation
        file_list: Optional[str] = None,
    ) -> None:
        super().__init__("validation", size, protocol, False, seed, data_root, file_list)


class InpaintingExamples(SkipBadImages, Dataset):
    """Image + `_mask` pairs as the original `data/inpainting_examples` (masks: white = hole)."""

    def __init__(
        self,
        root: str = "data/inpainting_examples",  # folder with <name>.png and <name>_mask.png
        size: Optional[int] = None,  # resize both to size x size (None: as stored)
    ) -> None:
        self.masks = sorted(glob.glob(os.path.join(root, "*_mask.png")))
        require_nonempty(self.masks, root, "*_mask.png (+ matching <name>.png)")
        self.images = [m.replace("_mask.png", ".png") for m in self.masks]
        self.size = size

    def __len__(self) -> int:
        return len(self.masks)

    def _get_example(self, i: int) -> dict:
        img = load_image(self.images[i])
        mask = load_image(self.masks[i])[..., 0]
        if self.size is not None:
            img = resize_to(img, (self.size, self.size))
            mask = resize_to(mask, (self.size, self.size))
        if mask.shape != img.shape[:2]:
            mask = resize_to(mask, img.shape[:2])
        example = inpainting_example(img, mask.astype(np.float32) / 255.0)
        example["file_path_"] = self.images[i]
        return example
