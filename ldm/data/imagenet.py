"""ImageNet (ILSVRC2012) for class-conditional LDMs and super-resolution, as the original
`ldm.data.imagenet`, reading an already-prepared folder (nothing is downloaded).

Location: `<root>/ILSVRC2012_train` and `<root>/ILSVRC2012_validation`, where <root> is the
`data_root=` argument, else `$LDM_DATA_ROOT`, else `$XDG_CACHE_HOME/autoencoders/data`
(default `~/.cache/autoencoders/data`, the original's cache). Each split folder holds

    data/<synset>/<image>.JPEG   images in synset folders (wnid, e.g. n01440764)
                                 (validation may instead be flat, with validation_synset.txt:
                                 "<file> <synset>" per line)
    filelist.txt                 relative paths "<synset>/<file>.JPEG" (written if missing)
    synset_human.txt             "<synset> <human label>" per line (optional: else the wnid)
    index_synset.yaml            {index: synset} (only for keep_orig_class_label / sub_indices)

Items: {"image": (size, size, 3) float32 [-1, 1], "class_label": int, "human_label": str,
"synsets", "relpath", "file_path_"}; class labels index the sorted synsets present (or the
original 1000-class index with `keep_orig_class_label`). `ImageNetSR*` add "LR_image".
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any, Optional

from torch.utils.data import Dataset, Subset

from ldm.data._image import (SkipBadImages, crop_box, data_path, list_images, load_image, process_rng,
                             read_split_file, require_nonempty, to_float)
from ldm.data.degradation import NAMES as DEGRADATIONS
from ldm.data.degradation import make_degradation, utils_image
from ldm.data.sources import ImagePaths

log = logging.getLogger("ldm.data")

IGNORED_FILES = {"n06596364_9591.JPEG"}  # a CMYK PNG named .JPEG in the original train set


def retrieve(config: Mapping, key: str, default: Any = None) -> Any:
    """`config["a"]["b"]` for key "a/b", or `default` when any part is missing."""
    node: Any = config
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def str_to_indices(string: str) -> list[int]:
    """'0-9,20,30-31' -> [0, ..., 9, 20, 30, 31]."""
    out: list[int] = []
    for part in string.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return sorted(out)


def _read_index_synset(path: str) -> dict[int, str]:
    import yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: needed for keep_orig_class_label / sub_indices "
                                f"(a YAML mapping 'index: synset' for the 1000 ILSVRC2012 classes)")
    with open(path) as f:
        return {int(k): str(v) for k, v in yaml.safe_load(f).items()}


def synset2idx(path_to_yaml: str = "data/index_synset.yaml") -> dict[str, int]:
    return {v: k for k, v in _read_index_synset(path_to_yaml).items()}


def give_synsets_from_indices(indices: list[int], path_to_yaml: str = "data/imagenet_idx_to_synset.yaml") -> list[str]:
    table = _read_index_synset(path_to_yaml)
    return [table[i] for i in indices]


class ImageNetBase(Dataset):
    NAME = ""
    DEFAULT_RANDOM_CROP = False

    def __init__(self, config: Optional[Mapping] = None, process_images: bool = True,
                 data_root: Optional[str] = None) -> None:
        if config is not None and not isinstance(config, dict):
            from omegaconf import OmegaConf
            config = OmegaConf.to_container(config)
        self.config: dict = dict(config or {})
        self.keep_orig_class_label = self.config.get("keep_orig_class_label", False)
        self.process_images = process_images
        self.data_root = data_root
        self._prepare()
        self._load()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        return self.data[i]

    # -- locating the data ---------------------------------------------------------------
    def _prepare(self) -> None:
        root = self.data_root or os.environ.get("LDM_DATA_ROOT")
        if not root:
            cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
            root = os.path.join(cache, "autoencoders/data")
        self.root = os.path.join(root, self.NAME)
        self.datadir = os.path.join(self.root, "data")
        self.txt_filelist = os.path.join(self.root, "filelist.txt")
        self.human_dict = os.path.join(self.root, "synset_human.txt")
        self.idx2syn = os.path.join(self.root, "index_synset.yaml")
        self.random_crop = retrieve(self.config, f"{type(self).__name__}/random_crop", self.DEFAULT_RANDOM_CROP)
        if not os.path.isdir(self.datadir):
            raise FileNotFoundError(
                f"{type(self).__name__}: ImageNet not found at {self.datadir}. Nothing is downloaded: extract "
                f"ILSVRC2012 so that {self.datadir}/<synset>/<image>.JPEG exist (e.g. n01440764/n01440764_10026.JPEG), "
                f"optionally with {self.human_dict} ('<synset> <label>' lines); or pass data_root= / set "
                f"$LDM_DATA_ROOT to the folder containing {self.NAME}/")

    def _synset_table(self) -> dict[str, str]:
        """file name -> synset for a flat validation folder (validation_synset.txt), else {}."""
        path = os.path.join(self.root, "validation_synset.txt")
        if not os.path.isfile(path):
            return {}
        return dict(line.split()[:2] for line in read_split_file(path, "'<file> <synset>' lines"))

    def _relpaths(self) -> list[str]:
        if os.path.isfile(self.txt_filelist):
            return read_split_file(self.txt_filelist)
        relpaths = [p for p in list_images(self.datadir) if p.lower().endswith((".jpeg", ".jpg", ".png"))]
        try:
            with open(self.txt_filelist, "w") as f:
                f.write("\n".join(relpaths) + "\n")
        except OSError:
            log.info("could not cache the file list at %s (read-only); scanning each time", self.txt_filelist)
        return relpaths

    def _filter_relpaths(self, relpaths: list[str]) -> list[str]:
        relpaths = [p for p in relpaths if p.split("/")[-1] not in IGNORED_FILES]
        if "sub_indices" in self.config:
            synsets = set(give_synsets_from_indices(str_to_indices(str(self.config["sub_indices"])), self.idx2syn))
            relpaths = [p for p in relpaths if self._synset(p) in synsets]
        return relpaths

    def _synset(self, relpath: str) -> str:
        if "/" in relpath:
            return relpath.split("/")[0]
        if relpath not in self._flat:
            raise FileNotFoundError(f"{relpath} is not in a synset folder and not listed in "
                                    f"{os.path.join(self.root, 'validation_synset.txt')}")
        return self._flat[relpath]

    def _human_labels(self) -> dict[str, str]:
        if not os.path.isfile(self.human_dict):
            log.warning("%s not found: human_label falls back to the synset id", self.human_dict)
            return {}
        with open(self.human_dict) as f:
            return dict(line.split(maxsplit=1) for line in f.read().splitlines() if line.strip())

    def _load(self) -> None:
        self._flat = self._synset_table()
        relpaths = self._relpaths()
        n = len(relpaths)
        self.relpaths = self._filter_relpaths(relpaths)
        require_nonempty(self.relpaths, self.datadir, "<synset>/*.JPEG")
        if n != len(self.relpaths):
            log.info("removed %d files from the file list during filtering", n - len(self.relpaths))
        self.synsets = [self._synset(p) for p in self.relpaths]
        self.abspaths = [os.path.join(self.datadir, p) for p in self.relpaths]
        if self.keep_orig_class_label:
            table = synset2idx(self.idx2syn)
            self.class_labels = [table[s] for s in self.synsets]
        else:
            index = {s: i for i, s in enumerate(sorted(set(self.synsets)))}
            self.class_labels = [index[s] for s in self.synsets]
        human = self._human_labels()
        self.human_labels = [human.get(s, s) for s in self.synsets]
        labels = {"relpath": self.relpaths, "synsets": self.synsets,
                  "class_label": self.class_labels, "human_label": self.human_labels}
        if self.process_images:
            self.size = retrieve(self.config, "size", default=256)
            self.data: Any = ImagePaths(self.abspaths, labels=labels, size=self.size, random_crop=self.random_crop)
        else:  # labels and file paths only (ImageNetSR loads the pixels itself)
            self.data = _Labels({**labels, "file_path_": self.abspaths})


class _Labels(Dataset):
    def __init__(self, labels: dict[str, list]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels["file_path_"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.labels.items()}


class ImageNetTrain(ImageNetBase):
    NAME = "ILSVRC2012_train"
    DEFAULT_RANDOM_CROP = True

    def __init__(
        self,
        process_images: bool = True,  # False: items carry labels and file paths only
        data_root: Optional[str] = None,  # folder containing ILSVRC2012_train/ (else $LDM_DATA_ROOT, XDG cache)
        config: Optional[Mapping] = None,  # size (256), keep_orig_class_label, sub_indices, ImageNetTrain/random_crop
    ) -> None:
        super().__init__(config=config, process_images=process_images, data_root=data_root)


class ImageNetValidation(ImageNetBase):
    NAME = "ILSVRC2012_validation"
    DEFAULT_RANDOM_CROP = False

    def __init__(self, process_images: bool = True, data_root: Optional[str] = None,
                 config: Optional[Mapping] = None) -> None:
        super().__init__(config=config, process_images=process_images, data_root=data_root)


class ImageNetSR(SkipBadImages, Dataset):
    """Super-resolution pairs: (1) a square crop of side c * min(H, W), c ~ U(min_crop_f,
    max_crop_f), random or central; (2) area-resize to `size`; (3) `degradation` -> "LR_image"
    of side size / downscale_f. Both images float32 HWC in [-1, 1]."""

    def __init__(
        self,
        size: Optional[int] = None,  # HR side (required)
        degradation: Optional[str] = None,  # bsrgan | bsrgan_light | pil_* | cv_* (see ldm.data.degradation)
        downscale_f: int = 4,  # LR side = size / downscale_f
        min_crop_f: float = 0.5,  # crop side range, as a fraction of the smaller image side
        max_crop_f: float = 1.0,
        random_crop: bool = True,  # random crop position (else central)
        data_root: Optional[str] = None,  # where the base dataset lives (see the base class)
    ) -> None:
        if not size:
            raise ValueError("ImageNetSR needs size")
        if not (size / downscale_f).is_integer():
            raise ValueError(f"size {size} not divisible by downscale_f {downscale_f}")
        if not 0 < min_crop_f <= max_crop_f <= 1.0:
            raise ValueError(f"need 0 < min_crop_f <= max_crop_f <= 1, got {min_crop_f}, {max_crop_f}")
        if degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {degradation!r}; expected one of {', '.join(DEGRADATIONS)}")
        self.data_root = data_root
        self.base = self.get_base()
        self.size = size
        self.LR_size = int(size / downscale_f)
        self.min_crop_f, self.max_crop_f = min_crop_f, max_crop_f
        self.center_crop = not random_crop
        self.degradation_process = make_degradation(degradation, downscale_f, self.LR_size)

    def get_base(self) -> Dataset:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.base)

    def _get_example(self, i: int) -> dict:
        example = dict(self.base[i])
        image = load_image(example["file_path_"])
        rng = process_rng()
        side = int(min(image.shape[:2]) * rng.uniform(self.min_crop_f, self.max_crop_f))
        top, left = crop_box(image.shape[:2], (side, side), None if self.center_crop else rng)
        image = image[top:top + side, left:left + side]
        image = utils_image.cv_resize(image, (self.size, self.size), utils_image.INTER_AREA)
        lr = self.degradation_process(image, rng)
        example["image"] = to_float(image)
        example["LR_image"] = to_float(lr)
        return example


def _hr_subset(dset: Dataset, indices_file: str) -> Dataset:
    """The original's subset of images large enough for SR, when its index pickle is present."""
    if not os.path.isfile(indices_file):
        log.info("%s not found: using all %d images", indices_file, len(dset))
        return dset
    with open(indices_file, "rb") as f:
        return Subset(dset, pickle.load(f))


class ImageNetSRTrain(ImageNetSR):
    def get_base(self) -> Dataset:
        return _hr_subset(ImageNetTrain(process_images=False, data_root=self.data_root),
                          data_path("data/imagenet_train_hr_indices.p"))


class ImageNetSRValidation(ImageNetSR):
    def get_base(self) -> Dataset:
        return _hr_subset(ImageNetValidation(process_images=False, data_root=self.data_root),
                          data_path("data/imagenet_val_hr_indices.p"))


__all__ = ["ImageNetBase", "ImageNetTrain", "ImageNetValidation", "ImageNetSR", "ImageNetSRTrain",
           "ImageNetSRValidation", "retrieve", "str_to_indices", "synset2idx", "give_synsets_from_indices"]
