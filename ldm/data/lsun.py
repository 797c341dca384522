"""LSUN churches / bedrooms / cats, as the original `ldm.data.lsun`.

Layout (relative to the working directory; `$LDM_DATA_ROOT` or `data_root=` replaces `data/`):

    data/lsun/church_outdoor_train.txt, church_outdoor_val.txt   -> images in data/lsun/churches/
    data/lsun/bedrooms_train.txt, bedrooms_val.txt                -> data/lsun/bedrooms/
    data/lsun/cat_train.txt, cat_val.txt                          -> data/lsun/cats/

Each split file lists image paths relative to the image folder. Preprocessing is the
original's (score-sde style): central square crop of the full image, resize to `size` with
`interpolation`, horizontal flip with probability `flip_p` (0 for validation), then
{"image": (size, size, 3) float32 in [-1, 1], "relative_file_path_", "file_path_"}.
"""
from __future__ import annotations

import os
from typing import Optional

from torch.utils.data import Dataset

from ldm.data._image import (PIL_INTERPOLATION, SkipBadImages, data_path, load_image, process_rng, read_split_file,
                             require_nonempty, resize_to, square_crop, to_float)


class LSUNBase(SkipBadImages, Dataset):
    def __init__(
        self,
        txt_file: str,  # split file: image paths relative to data_root, one per line
        data_root: str,  # image folder
        size: Optional[int] = None,  # output side; None keeps the central square crop's size
        interpolation: str = "bicubic",  # resize filter: linear | bilinear | bicubic | lanczos (| nearest | box)
        flip_p: float = 0.5,  # probability of a horizontal flip
    ) -> None:
        self.data_paths = txt_file
        self.data_root = data_root
        self.image_paths = read_split_file(txt_file)
        require_nonempty(self.image_paths, txt_file, "<relative image path per line>")
        self._length = len(self.image_paths)
        self.labels = {
            "relative_file_path_": list(self.image_paths),
            "file_path_": [os.path.join(self.data_root, p) for p in self.image_paths],
        }
        self.size = size
        if interpolation not in PIL_INTERPOLATION:
            raise ValueError(f"interpolation '{interpolation}' not one of {sorted(PIL_INTERPOLATION)}")
        self.interpolation = PIL_INTERPOLATION[interpolation]
        self.flip_p = flip_p

    def __len__(self) -> int:
        return self._length

    def _get_example(self, i: int) -> dict:
        example = {k: v[i] for k, v in self.labels.items()}
        img = load_image(example["file_path_"])
        img = square_crop(img, min(img.shape[:2]))
        if self.size is not None:
            img = resize_to(img, (self.size, self.size), self.interpolation)
        if self.flip_p > 0 and process_rng().random() < self.flip_p:
            img = img[:, ::-1]
        example["image"] = to_float(img)
        return example


def _split(name: str, folder: str, data_root: Optional[str]) -> dict:
    return {"txt_file": data_path(f"data/lsun/{name}", data_root), "data_root": data_path(f"data/lsun/{folder}", data_root)}


class LSUNChurchesTrain(LSUNBase):
    def __init__(self, data_root: Optional[str] = None, **kwargs) -> None:  # kwargs: size, interpolation, flip_p
        super().__init__(**_split("church_outdoor_train.txt", "churches", data_root), **kwargs)


class LSUNChurchesValidation(LSUNBase):
    def __init__(self, flip_p: float = 0.0, data_root: Optional[str] = None, **kwargs) -> None:
        super().__init__(**_split("church_outdoor_val.txt", "churches", data_root), flip_p=flip_p, **kwargs)


class LSUNBedroomsTrain(LSUNBase):
    def __init__(self, data_root: Optional[str] = None, **kwargs) -> None:
        super().__init__(**_split("bedrooms_train.txt", "bedrooms", data_root), **kwargs)


class LSUNBedroomsValidation(LSUNBase):
    def __init__(self, flip_p: float = 0.0, data_root: Optional[str] = None, **kwargs) -> None:
        super().__init__(**_split("bedrooms_val.txt", "bedrooms", data_root), flip_p=flip_p, **kwargs)


class LSUNCatsTrain(LSUNBase):
    def __init__(self, data_root: Optional[str] = None, **kwargs) -> None:
        super().__init__(**_split("cat_train.txt", "cats", data_root), **kwargs)


class LSUNCatsValidation(LSUNBase):
    def __init__(self, flip_p: float = 0.0, data_root: Optional[str] = None, **kwargs) -> None:
        super().__init__(**_split("cat_val.txt", "cats", data_root), flip_p=flip_p, **kwargs)


__all__ = ["LSUNBase", "LSUNChurchesTrain", "LSUNChurchesValidation", "LSUNBedroomsTrain", "LSUNBedroomsValidation",
           "LSUNCatsTrain", "LSUNCatsValidation"]
