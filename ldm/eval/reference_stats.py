"""Reference statistics of a dataset split: Inception mean/covariance plus a feature subset.

Reference images are produced by the dataset class named in the config's `data` section
(`data.params.<split>`; or a `{target, params}` given directly), i.e. with exactly the
preprocessing the model was trained with, then converted from [-1, 1] HWC floats to uint8 by
`image_metrics.to_uint8`. Statistics are streamed (mean and covariance accumulate in float64),
and up to `max_features` features (a fixed random subset) are kept for precision/recall and KID.

Results are cached as .npz under `cache_dir`, named and keyed by dataset, split, resolution,
preprocessing and feature network; the full key is stored in the file and checked on load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ldm.eval.features import POOL, InceptionFeatures
from ldm.eval.image_metrics import to_uint8

logger = logging.getLogger(__name__)
PREPROCESSING = "dataset class __getitem__ -> [-1,1] HWC float -> uint8 round((x+1)*127.5)"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDM_EVAL_CACHE", "~/.cache/ldm/eval")).expanduser()


def dataset_config(data_config: Mapping, split: str) -> dict:
    """`{target, params}` of the split's dataset from a config's `data` section (or the dataset itself)."""
    cfg = _plain(data_config)
    if "target" in cfg and split not in (cfg.get("params") or {}):
        if cfg["target"].endswith("DataModuleFromConfig"):
            raise KeyError(f"the data section has no '{split}' split (has {sorted(cfg.get('params') or {})})")
        return cfg  # already a dataset config
    params = cfg.get("params", cfg)
    if split not in params:
        raise KeyError(f"the data section has no '{split}' split (has {sorted(params)})")
    return _plain(params[split])


def build_dataset(ds_config: Mapping) -> Any:
    from ldm.util import instantiate_from_config

    return instantiate_from_config(ds_config)


class _ImageCollate:
    """Stacks `item[key]` ([-1,1] HWC floats) of a batch into uint8 (B,H,W,C)."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, items: list) -> np.ndarray:
        return np.stack([to_uint8(np.asarray(it[self.key])) for it in items])


def dataset_batches(dataset: Any, image_key: str = "image", batch_size: int = 50, num_workers: int = 0,
                    indices: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """uint8 (B,H,W,C) batches of the dataset's images, in index order."""
    import torch.utils.data as tud

    ds = dataset if indices is None else tud.Subset(dataset, [int(i) for i in indices])
    loader = tud.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=_ImageCollate(image_key))
    yield from loader


def list_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())


def folder_batches(paths: list[Path], batch_size: int = 50) -> Iterator[np.ndarray]:
    """uint8 (B,H,W,3) batches read from image files (RGB)."""
    from PIL import Image

    for lo in range(0, len(paths), batch_size):
        ims = []
        for p in paths[lo:lo + batch_size]:
            with Image.open(p) as im:
                ims.append(np.asarray(im.convert("RGB")))
        yield np.stack(ims)


@dataclass
class ReferenceStats:
    mu: np.ndarray            # (D,) mean of pool features
    sigma: np.ndarray         # (D, D) covariance
    features: np.ndarray      # (M, D) float32 subset (M <= max_features) for PR / KID
    n: int                    # number of images the statistics are over
    key: dict                 # what they were computed from
    path: Optional[Path] = None


class RunningStats:
    """Streaming mean/covariance (float64, shifted by the first batch's mean for accuracy)."""

    def __init__(self) -> None:
        self.n, self.shift, self.s, self.ss = 0, None, None, None

    def update(self, f: np.ndarray) -> None:
        f = np.asarray(f, np.float64)
        if self.shift is None:
            self.shift = f.mean(0)
            self.s = np.zeros_like(self.shift)
            self.ss = np.zeros((f.shape[1], f.shape[1]))
        g = f - self.shift
        self.n += len(f)
        self.s += g.sum(0)
        self.ss += g.T @ g

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("need at least 2 images for a covariance")
        m = self.s / self.n
        cov = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self.shift, cov


def cache_key(source: dict, split: str, image_shape: tuple, extractor: InceptionFeatures, n: int,
              max_features: int, limit: Optional[int]) -> dict:
    return {"source": source, "split": split, "resolution": list(image_shape), "preprocessing": PREPROCESSING,
            "features": extractor.cache_id, "feature_layer": getattr(extractor, "feature_key", POOL),
            "n_images": n, "limit": limit,
            "max_features": max_features, "subset_seed": 0}


def _cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    src = key["source"]
    name = src.get("target", "folder").rsplit(".", 1)[-1] if isinstance(src, dict) else "folder"
    res = "x".join(str(s) for s in key["resolution"][:2])
    return cache_dir / f"{name}-{key['split']}-{res}-{digest}.npz"


def load_cached(path: Path, key: dict) -> Optional[ReferenceStats]:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        stored = json.loads(str(z["key"]))
        if stored != json.loads(json.dumps(key, sort_keys=True, default=str)):
            logger.warning("reference cache %s has a different key; recomputing", path)
            return None
        return ReferenceStats(z["mu"], z["sigma"], z["features"], int(z["n"]), stored, path)


def save_cached(path: Path, stats: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, features=stats.features, n=stats.n,
             key=json.dumps(stats.key, sort_keys=True, default=str))
    os.replace(tmp, path)


def compute_stats(batches: Iterator[np.ndarray], extractor: InceptionFeatures, keep: Optional[np.ndarray],
                  total: int, key: dict, progress: bool = True) -> ReferenceStats:
    """Stream `batches` through the extractor; keep features at the positions in `keep` (sorted)."""
    from tqdm import tqdm

    run, kept, pos = RunningStats(), [], 0
    with tqdm(total=total, desc="reference features", unit="img", disable=not progress) as bar:
        for b in batches:
            f = extractor(b)[getattr(extractor, "feature_key", POOL)]
            run.update(f)
            if keep is None:
                kept.append(f.astype(np.float32))
            else:
                lo, hi = np.searchsorted(keep, [pos, pos + len(f)])
                kept.append(f[keep[lo:hi] - pos].astype(np.float32))
            pos += len(f)
            bar.update(len(f))
    mu, sigma = run.finalize()
    return ReferenceStats(mu, sigma, np.concatenate(kept), run.n, key)


def reference_statistics(extractor: InceptionFeatures, *, data_config: Optional[Mapping] = None,
                         split: str = "train", folder: Optional[str] = None, image_key: str = "image",
                         limit: Optional[int] = None, max_features: int = 50000, batch_size: int = 50,
                         num_workers: int = 0, cache_dir: Optional[str | Path] = None,
                         use_cache: bool = True, progress: bool = True) -> ReferenceStats:
    """Statistics of a dataset split (`data_config` + `split`) or of an image `folder`, cached.

    `limit` uses only the first `limit` images (for quick runs; recorded in the key).
    """
    if (data_config is None) == (folder is None):
        raise ValueError("give exactly one of data_config or folder")
    if folder is not None:
        paths = list_images(folder)
        if limit:
            paths = paths[:limit]
        if not paths:
            raise FileNotFoundError(f"no images in {folder}")
        listing = hashlib.sha1("\n".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                         for p in paths).encode()).hexdigest()
        source, n = {"folder": str(Path(folder).resolve()), "listing_sha1": listing}, len(paths)
        first = next(folder_batches(paths[:1], 1))[0]
        make_batches = lambda: folder_batches(paths, batch_size)  # noqa: E731
    else:
        source = dataset_config(data_config, split)
        dataset = build_dataset(source)
        n = len(dataset) if not limit else min(limit, len(dataset))
        first = to_uint8(np.asarray(dataset[0][image_key]))
        subset = np.arange(n) if n < len(dataset) else None
        make_batches = lambda: dataset_batches(dataset, image_key, batch_size, num_workers, subset)  # noqa: E731
    key = cache_key(source, split if folder is None else "folder", first.shape, extractor, n, max_features, limit)
    path = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), key)
    if use_cache:
        cached = load_cached(path, key)
        if cached is not None:
            logger.info("reference statistics from cache %s", path)
            return cached
    keep = None
    if n > max_features:
        keep = np.sort(np.random.RandomState(0).choice(n, max_features, replace=False))
    stats = compute_stats(make_batches(), extractor, keep, n, key, progress)
    if use_cache:
        save_cached(path, stats)
        stats.path = path
    return stats


def _plain(cfg: Any) -> Any:
    """OmegaConf / mapping -> plain, resolved python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: _plain(v) for k, v in cfg.items()}
    return cfg
