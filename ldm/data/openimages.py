"""Open Images datasets the released configs name: full-image autoencoder data, the
super-resolution pairs of `bsr_sr`, and the box layouts of `layout2img-openimages256`.

Layout (relative to the working directory; `$LDM_DATA_ROOT` or `data_root=` replaces `data/`),
taming-transformers' Open Images structure:

    data/openimages/train/<image_id>.jpg, validation/<image_id>.jpg
    data/openimages/train.txt, validation.txt          optional file lists (else the folders are scanned)
    data/openimages/class-descriptions-boxable.csv     "<label id>,<name>" rows        (layouts only)
    data/openimages/oidv6-train-annotations-bbox.csv   ImageID,Source,LabelName,Confidence,XMin,XMax,
    data/openimages/validation-annotations-bbox.csv    YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,
                                                       IsDepiction,IsInside             (layouts only)

Items: "image" (HWC float32 in [-1, 1]); SR adds "LR_image"; layouts add "coordinates_bbox"
(92 int64 tokens, see `ldm.data.bbox_tokens`) and "crop_bbox" (x0, y0, w, h of the crop).
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ldm.data._image import (SkipBadImages, crop_box, data_path, list_images, load_image, process_rng,
                             read_split_file, require_nonempty, resize_to, smallest_side_to, to_float)
from ldm.data.bbox_tokens import Annotation, BBoxTokenizer
from ldm.data.imagenet import ImageNetSR, _Labels
from ldm.data.sources import ImagePaths

ANNOTATIONS = {"train": "oidv6-train-annotations-bbox.csv", "validation": "validation-annotations-bbox.csv"}


def _split_files(split: str, data_root: Optional[str]) -> list[str]:
    root = data_path("data/openimages", data_root)
    listing = os.path.join(root, f"{split}.txt")
    folder = os.path.join(root, split)
    relpaths = read_split_file(listing) if os.path.isfile(listing) else list_images(folder)
    require_nonempty(relpaths, folder, "*.jpg")
    return [os.path.join(folder, p) for p in relpaths]


class FullOpenImagesBase(ImagePaths):
    """Every image of a split: smallest side to `size`, then a `crop_size` crop."""

    RANDOM = True

    def __init__(
        self,
        size: Optional[int] = None,  # smallest side resized to this first (None: keep)
        crop_size: Optional[int] = None,  # square crop side (None: size)
        random_crop: Optional[bool] = None,  # default: random for train, center for validation
        data_root: Optional[str] = None,  # replaces the leading "data/" of data/openimages
        split: str = "train",
    ) -> None:
        self.resize_size = size
        self.crop_size = crop_size or size
        rc = self.RANDOM if random_crop is None else random_crop
        super().__init__(_split_files(split, data_root), size=None, random_crop=rc)

    def preprocess_image(self, image_path: str) -> np.ndarray:
        img = load_image(image_path)
        if self.resize_size:
            img = smallest_side_to(img, self.resize_size)
        if self.crop_size:
            side = min(self.crop_size, *img.shape[:2])
            top, left = crop_box(img.shape[:2], (side, side), process_rng() if self.random_crop else None)
            img = resize_to(img[top:top + side, left:left + side], (self.crop_size, self.crop_size))
        return to_float(img)


class FullOpenImagesTrain(FullOpenImagesBase):
    RANDOM = True

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None,
                 random_crop: Optional[bool] = None, data_root: Optional[str] = None) -> None:
        super().__init__(size, crop_size, random_crop, data_root, split="train")


class FullOpenImagesValidation(FullOpenImagesBase):
    RANDOM = False

    def __init__(self, size: Optional[int] = None, crop_size: Optional[int] = None,
                 random_crop: Optional[bool] = None, data_root: Optional[str] = None) -> None:
        super().__init__(size, crop_size, random_crop, data_root, split="validation")


class SuperresOpenImagesAdvancedTrain(ImageNetSR):
    """`ImageNetSR` pairs (crop, area resize, degradation) over the Open Images train split."""

    def get_base(self) -> Dataset:
        return _Labels({"file_path_": _split_files("train", self.data_root)})


class SuperresOpenImagesAdvancedValidation(ImageNetSR):
    def get_base(self) -> Dataset:
        return _Labels({"file_path_": _split_files("validation", self.data_root)})


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------
def load_categories(path: str) -> list[str]:
    """Sorted label ids of class-descriptions-boxable.csv ('/m/01s55n' last, as taming)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (Open Images 'class-descriptions-boxable.csv': '<label id>,<name>')")
    with open(path, newline="") as f:
        ids = sorted({row[0] for row in csv.reader(f) if row})
    if "/m/01s55n" in ids:
        ids.remove("/m/01s55n")
        ids.append("/m/01s55n")
    return ids


def load_annotations(path: str, category_no: dict[str, int], min_object_area: float) -> dict[str, list[Annotation]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (Open Images box annotations CSV: ImageID, LabelName, XMin, XMax, "
                                f"YMin, YMax, IsOccluded, IsTruncated, IsGroupOf, IsDepiction, IsInside, ...)")
    out: dict[str, list[Annotation]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            x0, y0 = float(row["XMin"]), float(row["YMin"])
            w, h = float(row["XMax"]) - x0, float(row["YMax"]) - y0
            if w * h >= min_object_area and row["LabelName"] in category_no:
                flag = lambda k: bool(int(row.get(k, 0) or 0))  # noqa: E731
                out[row["ImageID"]].append(Annotation(
                    (x0, y0, w, h), category_no[row["LabelName"]], flag("IsGroupOf"), flag("IsOccluded"),
                    flag("IsDepiction"), flag("IsInside")))
    return dict(out)


class OpenImagesBBoxBase(SkipBadImages, Dataset):
    """Image + box-layout tokens (taming's `AnnotatedObjectsOpenImages` with the objects_bbox builder)."""

    SPLIT = "train"

    def __init__(
        self,
        size: int = 256,  # output side
        min_object_area: float = 0.0001,  # drop boxes smaller than this (fraction of the image)
        min_objects_per_image: int = 2,  # keep images with this many boxes ...
        max_objects_per_image: int = 30,  # ... up to this many (also the number of token triples)
        no_tokens: int = 8192,  # token vocabulary (the embedder's vocab_size)
        encode_crop: bool = True,  # append the crop box tokens (92 = 30 * 3 + 2)
        use_group_parameter: bool = True,  # "group of" flag in the object token
        crop_method: Optional[str] = None,  # random-2d (train default) | center (validation default)
        random_flip: Optional[bool] = None,  # default: True for train, False for validation
        data_root: Optional[str] = None,  # replaces the leading "data/" of data/openimages
    ) -> None:
        root = data_path("data/openimages", data_root)
        self.categories = load_categories(os.path.join(root, "class-descriptions-boxable.csv"))
        category_no = {c: i for i, c in enumerate(self.categories)}
        annotations = load_annotations(os.path.join(root, ANNOTATIONS[self.SPLIT]), category_no, min_object_area)
        self.annotations = {k: [a for a in v if a.bbox[2] * a.bbox[3] > min_object_area] for k, v in annotations.items()}
        self.annotations = {k: v for k, v in self.annotations.items()
                            if min_objects_per_image <= len(v) <= max_objects_per_image}
        self.image_ids = list(self.annotations)
        self.image_dir = os.path.join(root, self.SPLIT)
        require_nonempty(self.image_ids, os.path.join(root, ANNOTATIONS[self.SPLIT]),
                         f"images with {min_objects_per_image}-{max_objects_per_image} boxes of area > {min_object_area}")
        self.size = size
        self.crop_method = crop_method or ("random-2d" if self.SPLIT == "train" else "center")
        self.random_flip = (self.SPLIT == "train") if random_flip is None else random_flip
        self.tokenizer = BBoxTokenizer(len(self.categories), max_objects_per_image, no_tokens, encode_crop,
                                       use_group_parameter)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _crop(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        h, w = img.shape[:2]
        if self.crop_method == "random-2d":  # random square of side U{size..min(h, w)}, then resize
            side = min(h, w) if min(h, w) <= self.size else int(rng.integers(self.size, min(h, w) + 1))
            top, left = crop_box((h, w), (side, side), rng)
        elif self.crop_method == "center":
            side = min(h, w)
            top, left = crop_box((h, w), (side, side), None)
        else:
            raise ValueError(f"unknown crop_method {self.crop_method!r} (random-2d | center)")
        out = resize_to(img[top:top + side, left:left + side], (self.size, self.size))
        return out, (left / w, top / h, side / w, side / h)

    def _get_example(self, i: int) -> dict:
        image_id = self.image_ids[i]
        path = os.path.join(self.image_dir, f"{image_id:0>16}.jpg")
        rng = process_rng()
        img, crop = self._crop(load_image(path), rng)
        flipped = bool(self.random_flip and rng.random() < 0.5)
        if flipped:
            img = img[:, ::-1]
        tokens = self.tokenizer.build(self.annotations[image_id], crop, flipped, rng)
        return {"image": to_float(img), "coordinates_bbox": tokens,
                "crop_bbox": np.asarray(crop, dtype=np.float32), "file_path_": path}

    def label_for_category_no(self, category_no: int) -> str:
        return self.categories[category_no]


class OpenImagesBBoxTrain(OpenImagesBBoxBase):
    SPLIT = "train"


class OpenImagesBBoxValidation(OpenImagesBBoxBase):
    SPLIT = "validation"
