"""ldm.data.base.ImageFolderDataset and ldm.data.digits: values, labels, captions and the
errors a user meets (missing folder, empty folder, unreadable files)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.base import ImageFolderDataset


def _write_png(path: Path, value: int, size: tuple[int, int] = (12, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write_png(tmp_path / "cats" / "a.png", 0)
    _write_png(tmp_path / "cats" / "b.jpg", 255)
    _write_png(tmp_path / "dogs" / "c.png", 128)
    (tmp_path / "dogs" / "c.txt").write_text("a dog\n")
    (tmp_path / "dogs" / "notes.md").write_text("not an image")
    return tmp_path


def test_images_are_hwc_float_in_model_range(folder: Path) -> None:
    ds = ImageFolderDataset(str(folder))
    assert len(ds) == 3
    ex = ds[0]  # cats/a.png: black with a red corner
    img = ex["image"]
    assert img.dtype == np.float32 and img.shape == (8, 12, 3)
    assert img[1, 1].tolist() == [-1.0, -1.0, -1.0] and img[0, 0].tolist() == [1.0, -1.0, -1.0]
    assert ex["file_path_"].endswith("a.png")
    assert np.allclose(ds[2]["image"][1, 1], 128 / 127.5 - 1, atol=1e-6)


def test_resize_and_center_crop_to_size(folder: Path) -> None:
    ds = ImageFolderDataset(str(folder), size=4)
    assert ds[0]["image"].shape == (4, 4, 3)
    flipped = ImageFolderDataset(str(folder), size=None, flip_p=1.0)[0]["image"]
    assert flipped[0, -1].tolist() == [1.0, -1.0, -1.0]  # the red corner moved to the right


def test_class_labels_from_subfolders_and_captions(folder: Path) -> None:
    ds = ImageFolderDataset(str(folder), class_subfolders=True, caption_ext=".txt")
    assert ds.class_names == ["cats", "dogs"]
    assert [ds[i]["class_label"] for i in range(3)] == [0, 0, 1]
    assert ds[2]["human_label"] == "dogs"
    assert ds[2]["caption"] == "a dog" and ds[0]["caption"] == ""


def test_missing_folder_names_path_and_pattern(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataset(str(missing))
    assert str(missing) in str(e.value) and ".png" in str(e.value)


def test_empty_folder_names_path_and_pattern(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataset(str(tmp_path), extensions=(".png",))
    assert str(tmp_path) in str(e.value) and "*{.png}" in str(e.value)


def test_corrupt_image_is_logged_skipped_and_counted(folder: Path, caplog) -> None:
    (folder / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = folder / "dogs" / "truncated.jpg"
    _write_png(folder / "tmp.jpg", 60, size=(64, 64))
    truncated.write_bytes((folder / "tmp.jpg").read_bytes()[:200])
    (folder / "tmp.jpg").unlink()
    ds = ImageFolderDataset(str(folder))
    names = [p.name for p in ds.paths]
    assert names == ["a.png", "b.jpg", "broken.png", "c.png", "truncated.jpg"]
    with caplog.at_level(logging.WARNING, logger="ldm.data.base"):
        got = [Path(ds[i]["file_path_"]).name for i in range(len(ds))]  # a whole epoch, no exception
    assert got == ["a.png", "b.jpg", "c.png", "c.png", "a.png"]  # each bad file replaced by the next good one
    assert ds.num_skipped == 2  # each bad file counted once, then remembered
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text


def test_all_corrupt_raises_clearly(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(str(tmp_path))
    with pytest.raises(RuntimeError, match="could be read"):
        ds[0]


def test_digits_split_is_fixed_disjoint_and_in_range() -> None:
    from ldm.data.digits import DigitsTrain, DigitsValidation, to_8x8_features
    from sklearn.datasets import load_digits

    train, val = DigitsTrain(size=32), DigitsValidation(size=32)
    assert len(train) + len(val) == 1797 and len(val) == 180
    ex = train[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["human_label"] == str(ex["class_label"]) and 0 <= ex["class_label"] <= 9
    # deterministic: the same split on every construction; disjoint sets of digits
    assert np.array_equal(DigitsValidation(size=32).labels, val.labels)
    raw = load_digits()
    val8 = DigitsValidation(size=8)
    idx = [int(np.where((raw.images.reshape(len(raw.images), -1) / 8.0 - 1.0 ==
                         val8.images[i, :, :, 0].reshape(-1)).all(1))[0][0]) for i in range(3)]
    assert [raw.target[j] for j in idx] == val8.labels[:3].tolist()
    # downsampled features of upsampled digits are the original 0..16 pixels again (approximately)
    feats = to_8x8_features(DigitsTrain(size=32).images[:5])
    assert feats.shape == (5, 64) and 0 <= feats.min() and feats.max() <= 16


class _Stream(torch.utils.data.IterableDataset):
    """A length-less stream (like tar shards) that records the epoch it was told."""

    def __init__(self, n: int = 6):
        self.n, self.epoch = n, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for i in range(self.n):
            yield {"image": torch.full((2, 2, 3), float(i)), "epoch": -1 if self.epoch is None else self.epoch}


def test_datamodule_streams_iterable_dataset_and_sets_epoch():
    from types import SimpleNamespace

    from main import DataModuleFromConfig

    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train={"target": "test_data_base._Stream"})
    dm.setup("fit")
    dm.trainer = SimpleNamespace(current_epoch=3, global_rank=0, world_size=1)
    batches = list(dm.train_dataloader())
    assert [b["image"][:, 0, 0, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert all(int(e) == 3 for b in batches for e in b["epoch"])
