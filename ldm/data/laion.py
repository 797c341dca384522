"""The LAION WebDataset data module and inpainting masks SD 2's `v2-inpainting-inference.yaml` names
(`ldm.data.laion.WebDataModuleFromConfig`, `ldm.data.laion.AddMask`); Stability never released
this module, so this is our implementation of what the config describes.

Per split (`train:` / `validation:`): `shards` (tar URLs or brace patterns, joined to `tar_base`
when set; `pipe:` commands work), `shuffle` (sample buffer; > 0 also shuffles shards),
`image_key` (tar member and output key of the image, e.g. "jpg"), `image_transforms` (configs
of torchvision transforms applied to the PIL image), `postprocess` (a config, e.g. `AddMask`).
Items: {image_key: (H, W, 3) float32 in [-1, 1], "txt": caption, ...}, the keys SD 2's
`first_stage_key: jpg` / `cond_stage_key: txt` read. Training streams resample shards forever
(the original `.repeat()`); validation is one pass.

Filters from the `.json` metadata (as SD 2's training code): `min_size` (original_width and
original_height), `max_pwatermark` (pwatermark), `p_unsafe_threshold` (punsafe), and
`filter_word_list` (a YAML/text list of words; captions containing one are dropped).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data._image import process_rng, to_float
from ldm.data.masks import make_mask, mask_protocol
from ldm.data.webdataset_source import WebImageText
from ldm.util import instantiate_from_config

log = logging.getLogger("ldm.data")


class AddMask:
    """SD 2 inpainting: add "mask" (H, W, 1) in {0, 1} (1 = hole) and "masked_image" = image * (mask < 0.5)
    (holes are 0 in the [-1, 1] image: SD 2's convention, unlike `ldm.data.inpainting`)."""

    def __init__(
        self,
        mode: str = "512train",  # mask protocol, see ldm.data.masks.PROTOCOLS (256narrow, 256train, 512train, ...)
        p_drop: float = 0.0,  # probability of masking the whole image
        image_key: str = "jpg",  # item key of the [-1, 1] HWC image
    ) -> None:
        self.protocol = mask_protocol(mode)
        self.p_drop = p_drop
        self.image_key = image_key

    def __call__(self, sample: dict, rng: Optional[np.random.Generator] = None) -> dict:
        rng = rng or process_rng()
        x = np.asarray(sample[self.image_key])
        mask = make_mask(x.shape[0], x.shape[1], self.protocol, rng)
        if rng.random() < self.p_drop:
            mask = np.ones_like(mask)
        mask = (mask > 0.5).astype(np.float32)[..., None]
        sample["mask"] = mask
        sample["masked_image"] = (x * (mask < 0.5)).astype(np.float32)
        return sample


def _read_word_list(path: Optional[str]) -> list[str]:
    if not path:
        return []
    if not os.path.isfile(path):
        log.warning("filter_word_list %s not found: no caption word filter", path)
        return []
    import yaml
    with open(path) as f:
        words = yaml.safe_load(f)
    if isinstance(words, dict):
        words = [w for v in words.values() for w in (v if isinstance(v, list) else [v])]
    return [str(w).lower() for w in (words or [])]


class TransformChain:
    """PIL transforms (e.g. torchvision Resize / RandomCrop), then [-1, 1] float32 HWC."""

    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, img: Image.Image) -> np.ndarray:
        for t in self.transforms:
            img = t(img)
        return to_float(np.asarray(img, dtype=np.uint8))


class SampleFilter:
    """SD 2's sample filters on a raw tar sample (caption bytes under "txt", parsed "json")."""

    def __init__(self, min_size: Optional[int], max_pwatermark: Optional[float], p_unsafe_threshold: Optional[float],
                 words: list[str]) -> None:
        self.min_size, self.max_pwatermark, self.p_unsafe_threshold = min_size, max_pwatermark, p_unsafe_threshold
        self.words = words

    def __call__(self, x: dict) -> bool:
        if "txt" not in x:
            return False
        meta = x.get("json") or {}
        try:
            if self.min_size is not None and self.min_size > 1:
                if min(meta["original_width"], meta["original_height"]) < self.min_size:
                    return False
            if self.max_pwatermark is not None and self.max_pwatermark < 1.0 and meta["pwatermark"] > self.max_pwatermark:
                return False
            if self.p_unsafe_threshold is not None and meta["punsafe"] > self.p_unsafe_threshold:
                return False
        except (KeyError, TypeError):
            return False
        if self.words:
            caption = x["txt"].decode("utf-8", errors="replace").lower()
            return not any(w in caption for w in self.words)
        return True


class WebDataModuleFromConfig(pl.LightningDataModule):
    def __init__(
        self,
        tar_base: Optional[str],  # prefix joined to every shard (None: shards are full URLs)
        batch_size: int,  # per-device batch size
        train: Optional[dict] = None,  # split configs (see the module docstring)
        validation: Optional[dict] = None,
        test: Optional[dict] = None,
        num_workers: int = 4,  # loader worker processes
        multinode: bool = True,  # split shards over ranks (False: every rank reads every shard)
        min_size: Optional[int] = None,  # drop images smaller than this (json original_width/height)
        max_pwatermark: float = 1.0,  # drop samples with json pwatermark above this
        p_unsafe_threshold: Optional[float] = None,  # drop samples with json punsafe above this
        filter_word_list: Optional[str] = None,  # file of words that drop a caption containing them
        **kwargs: Any,  # other keys of the original configs, ignored
    ) -> None:
        super().__init__()
        self.tar_base, self.batch_size, self.num_workers = tar_base, batch_size, num_workers
        self.train, self.validation, self.test = train, validation, test
        self.multinode = multinode
        self.min_size, self.max_pwatermark, self.p_unsafe_threshold = min_size, max_pwatermark, p_unsafe_threshold
        self.filter_word_list = filter_word_list
        if kwargs:
            log.info("WebDataModuleFromConfig ignores %s", sorted(kwargs))

    def make_dataset(self, config: dict, train: bool) -> WebImageText:
        image_transform = TransformChain([instantiate_from_config(t) for t in config.get("image_transforms", [])])
        shards = config["shards"]
        shards = [shards] if isinstance(shards, str) else list(shards)
        if self.tar_base:
            shards = [os.path.join(self.tar_base, s) for s in shards]
        postprocess = instantiate_from_config(config["postprocess"]) if config.get("postprocess") else None
        shuffle = int(config.get("shuffle", 0))
        return WebImageText(
            shards, image_transform=image_transform, shuffle=shuffle, shardshuffle=shuffle > 0, resampled=train,
            rank=None if self.multinode else 0, world_size=None if self.multinode else 1,
            image_keys=(config.get("image_key", "jpg"),), caption_key="txt",
            select=SampleFilter(self.min_size, self.max_pwatermark, self.p_unsafe_threshold,
                                _read_word_list(self.filter_word_list)),
            image_out_key=config.get("image_key", "jpg"), caption_out_key="txt", postprocess=postprocess)

    def make_loader(self, config: dict, train: bool) -> DataLoader:
        return DataLoader(self.make_dataset(config, train), batch_size=self.batch_size, num_workers=self.num_workers,
                          drop_last=train)

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.validation, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.make_loader(self.test, train=False)
