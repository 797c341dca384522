"""`DataModuleFromConfig`, the data module the configs name as `main.DataModuleFromConfig`:
datasets built from config in `setup()`; the train loader shuffles by (seed, epoch), shards by
rank and resumes mid-epoch (ldm.data.base.ResumableSampler / ResumableDataLoader)."""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.base import ResumableDataLoader, ResumableSampler, Txt2ImgIterableBaseDataset
from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a pytorch dataset."""

    def __init__(self, dataset: Any):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(_: int) -> None:
    """Shards a Txt2ImgIterableBaseDataset over workers; reseeds numpy per worker."""
    worker_info = torch.utils.data.get_worker_info()
    dataset, worker_id = worker_info.dataset, worker_info.id
    if isinstance(dataset, Txt2ImgIterableBaseDataset):
        split_size = dataset.num_records // worker_info.num_workers
        dataset.sample_ids = dataset.valid_ids[worker_id * split_size:(worker_id + 1) * split_size]
        current_id = np.random.choice(len(np.random.get_state()[1]), 1)
        return np.random.seed(np.random.get_state()[1][current_id] + worker_id)
    return np.random.seed(np.random.get_state()[1][0] + worker_id)


class _EpochLoader(DataLoader):
    """A loader over an IterableDataset that tells a `set_epoch`-aware stream the current
    epoch before each pass (workers copy the dataset at iteration start)."""

    trainer: Optional[pl.Trainer] = None

    def __iter__(self) -> Any:
        if self.trainer is not None and callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(self.trainer.current_epoch)
        return super().__iter__()


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets named by config; the train loader shuffles by (seed, epoch) and resumes mid-epoch."""

    def __init__(self, batch_size: int, train: Optional[dict] = None, validation: Optional[dict] = None,
                 test: Optional[dict] = None, predict: Optional[dict] = None, wrap: bool = False,
                 num_workers: Optional[int] = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False):
        super().__init__()
        self.batch_size = batch_size  # per-device batch size
        self.dataset_configs: dict[str, Any] = {}
        self.num_workers = num_workers if num_workers is not None else batch_size * 2  # loader worker processes
        self.use_worker_init_fn = use_worker_init_fn  # reseed numpy per worker (always on for iterable datasets)
        self.shuffle_test_loader = shuffle_test_loader
        self.shuffle_val_dataloader = shuffle_val_dataloader
        self.wrap = wrap  # wrap each dataset in WrappedDataset
        self.datasets: dict[str, Any] = {}
        for split, cfg, loader in (("train", train, self._train_dataloader),
                                   ("validation", validation, self._val_dataloader),
                                   ("test", test, self._test_dataloader),
                                   ("predict", predict, self._predict_dataloader)):
            if cfg is not None:
                self.dataset_configs[split] = cfg
                setattr(self, {"validation": "val"}.get(split, split) + "_dataloader", loader)

    def prepare_data(self) -> None:
        pass  # datasets that download do it in their constructor, called once per process in setup()

    def setup(self, stage: Optional[str] = None) -> None:
        for k, cfg in self.dataset_configs.items():
            if k not in self.datasets:
                ds = instantiate_from_config(cfg)
                self.datasets[k] = WrappedDataset(ds) if self.wrap else ds

    def _init_fn(self, split: str) -> Any:
        iterable = isinstance(self.datasets[split], IterableDataset)
        return worker_init_fn if iterable or self.use_worker_init_fn else None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        shuffle = shuffle and not isinstance(ds, IterableDataset)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                          worker_init_fn=self._init_fn(split), shuffle=shuffle)

    def _train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        if isinstance(ds, IterableDataset):
            # Streams (tar shards) split themselves over ranks/workers; they only need the epoch.
            loader = _EpochLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                                  worker_init_fn=self._init_fn("train"))
            loader.trainer = self.trainer
            return loader
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loader = ResumableDataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                                     worker_init_fn=self._init_fn("train"), sampler=sampler)
        loader.progress = self._batches_done
        return loader

    def _batches_done(self) -> Optional[int]:
        """Batches trained on in the current epoch (what a resumed loader must skip)."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=self.shuffle_val_dataloader)

    def _test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader)

    def _predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
