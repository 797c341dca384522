"""scikit-learn's bundled handwritten digits (1797 8x8 grayscale images, classes 0-9) as a
small real dataset that needs no download: upsampled to `size` x `size` RGB in [-1, 1].

The train/validation split is a fixed permutation (`split_seed`), the same on every machine.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

N_CLASSES = 10


@lru_cache(maxsize=4)
def digits_arrays(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (N, size, size, 3) float32 in [-1, 1] and their (N,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8), 0..16 -> [-1, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(-1.0, 1.0).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous()  # (N, size, size, 3)
    return x.numpy(), digits.target.astype(np.int64)


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation of range(n) cut into (train, validation) index arrays."""
    perm = np.random.RandomState(split_seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def to_8x8_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) images in [-1, 1] -> (N, 64) grey 8x8 averages on the 0..16 scale of the
    original data: the features a classifier trained on real digits expects."""
    x = torch.as_tensor(images, dtype=torch.float32).permute(0, 3, 1, 2).mean(1, keepdim=True)  # (N, 1, H, W)
    x = F.adaptive_avg_pool2d(x, 8)
    return ((x.clamp(-1, 1) + 1.0) * 8.0).flatten(1).numpy()


class DigitsBase(Dataset):
    """One split of the digits; items are {"image", "class_label", "human_label"}."""

    split = "train"

    def __init__(self, size: int = 32, val_fraction: float = 0.1, split_seed: int = 0):
        super().__init__()
        self.size = size  # output side length (bilinear upsampling of the 8x8 originals)
        self.val_fraction = val_fraction  # share of the 1797 digits held out for validation
        self.split_seed = split_seed  # seed of the fixed train/validation permutation
        images, labels = digits_arrays(size)
        train_idx, val_idx = split_indices(len(labels), val_fraction, split_seed)
        idx = train_idx if self.split == "train" else val_idx
        self.images, self.labels = images[idx], labels[idx]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = int(self.labels[i])
        return {"image": self.images[i], "class_label": label, "human_label": str(label)}


class DigitsTrain(DigitsBase):
    split = "train"


class DigitsValidation(DigitsBase):
    split = "validation"
