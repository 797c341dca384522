"""Every dataset class the released configs name, on tiny on-disk replicas of each layout,
loaded through main.DataModuleFromConfig (2 workers) from configs like the released ones.

Images are near-constant colors (R, G, B) = (200, 50, 120) so the batches' channel means pin
the channel order and the [-1, 1] scaling, besides keys, shapes and dtypes.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

torch.set_num_threads(1)

RGB = np.array([200, 50, 120])
EXPECTED_MEAN = RGB / 127.5 - 1.0
SYNSETS = ["n01440764", "n01443537"]


def save_image(path: str, hw: tuple[int, int] = (40, 56), rgb=RGB, seed: int = 0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.clip(rgb + rng.integers(-3, 4, (*hw, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95) if path.endswith((".jpg", ".JPEG")) else Image.fromarray(arr).save(path)


def write_lines(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def build_layouts(root: str) -> None:
    j = os.path.join
    # faces (CelebA-HQ as released .npy arrays (1, 3, H, W); FFHQ as png)
    for split, names in (("train", ["a", "b", "c"]), ("validation", ["d", "e"])):
        write_lines(j(root, f"celebahq{split}.txt"), [f"{n}.npy" for n in names])
        write_lines(j(root, f"ffhq{split}.txt"), [f"{n}.png" for n in names])
        for n in names:
            os.makedirs(j(root, "celebahq"), exist_ok=True)
            arr = np.broadcast_to(RGB.astype(np.uint8)[None, :, None, None], (1, 3, 48, 40)).copy()
            np.save(j(root, "celebahq", f"{n}.npy"), arr)
            save_image(j(root, "ffhq", f"{n}.png"))
    # lsun
    for txt, folder in (("church_outdoor", "churches"), ("bedrooms", "bedrooms"), ("cat", "cats")):
        for split in ("train", "val"):
            names = [f"{split}_{i}.jpg" for i in range(3)]
            write_lines(j(root, "lsun", f"{txt}_{split}.txt"), names)
            for i, n in enumerate(names):
                save_image(j(root, "lsun", folder, n), seed=i)
    # imagenet: train in synset folders, validation flat + validation_synset.txt
    for split in ("train", "validation"):
        base = j(root, f"ILSVRC2012_{split}")
        write_lines(j(base, "synset_human.txt"), [f"{SYNSETS[0]} tench, Tinca tinca", f"{SYNSETS[1]} goldfish"])
        table = []
        for s in SYNSETS:
            for i in range(2):
                name = f"{s}_{i}.JPEG"
                save_image(j(base, "data", s, name) if split == "train" else j(base, "data", name), (48, 64), seed=i)
                table.append(f"{name} {s}")
        if split == "validation":
            write_lines(j(base, "validation_synset.txt"), table)
    # openimages: images + boxable classes + box annotations
    ids = [f"{i:016x}" for i in range(1, 5)]
    os.makedirs(j(root, "openimages"), exist_ok=True)
    with open(j(root, "openimages", "class-descriptions-boxable.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["/m/cat", "Cat"], ["/m/dog", "Dog"], ["/m/01s55n", "Suit"]])
    header = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
              "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
    for split, csv_name in (("train", "oidv6-train-annotations-bbox.csv"), ("validation", "validation-annotations-bbox.csv")):
        with open(j(root, "openimages", csv_name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for k, image_id in enumerate(ids):
                for n, label in enumerate(["/m/cat", "/m/dog", "/m/01s55n"][: 2 + k % 2]):
                    w.writerow([image_id, "xclick", label, 1, 0.1 * n, 0.1 * n + 0.4, 0.2, 0.9, 0, 0, n % 2, 0, 0])
        for k, image_id in enumerate(ids):
            save_image(j(root, "openimages", split, f"{image_id}.jpg"), (48, 64), seed=k)
    # landscapes: images + label maps (class = 7 left half, 100 right half)
    for split in ("train", "validation"):
        names = [f"{split}{i}.jpg" for i in range(3)]
        write_lines(j(root, "landscapes", f"{split}.txt"), names)
        for i, n in enumerate(names):
            save_image(j(root, "landscapes", "images", n), (56, 64), seed=i)
            seg = np.full((56, 64), 7, np.uint8)
            seg[:, 32:] = 100
            os.makedirs(j(root, "landscapes", "segmentations"), exist_ok=True)
            Image.fromarray(seg).save(j(root, "landscapes", "segmentations", n.replace(".jpg", ".png")))
    # previews: train = image folder with sidecar captions, validation = tar shards
    for i in range(4):
        save_image(j(root, "previews", "train", f"img{i}.jpg"), seed=i)
        write_lines(j(root, "previews", "train", f"img{i}.txt"), [f"a caption {i}"])
    os.makedirs(j(root, "previews", "validation"), exist_ok=True)
    for s in range(2):
        with tarfile.open(j(root, "previews", "validation", f"{s:05d}.tar"), "w") as tar:
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(np.broadcast_to(RGB.astype(np.uint8), (40, 40, 3)).copy()).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"shard {s} sample {i}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    # inpainting
    for split in ("train", "validation"):
        for i in range(3):
            save_image(j(root, "inpainting", split, f"{i}.jpg"), seed=i)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ldm_data"))
    build_layouts(root)
    old = os.environ.get("LDM_DATA_ROOT")
    os.environ["LDM_DATA_ROOT"] = root
    yield root
    if old is None:
        os.environ.pop("LDM_DATA_ROOT", None)
    else:
        os.environ["LDM_DATA_ROOT"] = old


def batches(target: str, params: dict, batch_size: int = 2) -> list[dict]:
    """All batches of one pass, via main.DataModuleFromConfig when it exists (2 workers)."""
    cfg = {"target": target, "params": params}
    torch.manual_seed(0)  # worker seeds (crops, flips, masks, degradations) follow torch's seed
    if os.path.exists(os.path.join(os.path.dirname(__file__), "..", "main.py")):
        from main import DataModuleFromConfig
    else:  # main.py not written yet
        DataModuleFromConfig = None
    from ldm.util import instantiate_from_config
    ds = instantiate_from_config(cfg)
    if DataModuleFromConfig is None or isinstance(ds, IterableDataset):
        loader = DataLoader(ds, batch_size=batch_size, num_workers=2)
    else:
        dm = DataModuleFromConfig(batch_size=batch_size, train=cfg, num_workers=2)
        dm.setup("fit")
        loader = dm.train_dataloader()
    return list(loader)


def check_image(x: torch.Tensor, side: int, color: bool = True) -> None:
    assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1:] == (side, side, 3), x.shape
    assert x.min() >= -1.0 and x.max() <= 1.0
    if color:
        np.testing.assert_allclose(x.mean(dim=(0, 1, 2)).numpy(), EXPECTED_MEAN, atol=0.05)


def total(bs: list[dict], key: str = "image") -> int:
    return sum(len(b[key]) for b in bs)


# (target, params, number of items, image side, extra checks)
CASES = [
    ("ldm.data.faceshq.CelebAHQTrain", {"size": 32}, 3, 32),
    ("taming.data.faceshq.CelebAHQValidation", {"size": 32}, 2, 32),
    ("taming.data.faceshq.FFHQTrain", {"size": 32}, 3, 32),
    ("ldm.data.faceshq.FFHQValidation", {"size": 32}, 2, 32),
    ("ldm.data.lsun.LSUNChurchesTrain", {"size": 32}, 3, 32),
    ("ldm.data.lsun.LSUNChurchesValidation", {"size": 32}, 3, 32),
    ("ldm.data.lsun.LSUNBedroomsTrain", {"size": 32, "interpolation": "bilinear", "flip_p": 1.0}, 3, 32),
    ("ldm.data.lsun.LSUNBedroomsValidation", {"size": 32}, 3, 32),
    ("ldm.data.lsun.LSUNCatsTrain", {"size": 32}, 3, 32),
    ("ldm.data.lsun.LSUNCatsValidation", {"size": 32}, 3, 32),
    ("ldm.data.imagenet.ImageNetTrain", {"config": {"size": 32}}, 4, 32),
    ("ldm.data.imagenet.ImageNetValidation", {"config": {"size": 32}}, 4, 32),
    ("ldm.data.openimages.FullOpenImagesTrain", {"size": 40, "crop_size": 32}, 4, 32),
    ("ldm.data.openimages.FullOpenImagesValidation", {"size": 40, "crop_size": 32}, 4, 32),
    ("ldm.data.landscapes.RFWTrain", {"size": 48, "crop_size": 32, "segmentation_to_float32": True}, 3, 32),
    ("ldm.data.landscapes.RFWValidation", {"size": 48, "crop_size": 32, "segmentation_to_float32": True}, 3, 32),
    ("ldm.data.previews.pytorch_dataset.PreviewsTrain", {"size": 32}, 4, 32),
    ("ldm.data.previews.pytorch_dataset.PreviewsValidation", {"size": 32}, 6, 32),
]


@pytest.mark.parametrize("target,params,n,side", CASES, ids=[c[0].split(".", 2)[-1] for c in CASES])
def test_named_dataset_batches(data_root, target, params, n, side):
    bs = batches(target, params)
    assert total(bs) == n
    for b in bs:
        check_image(b["image"], side)
    if "ImageNet" in target:
        labels = torch.cat([b["class_label"] for b in bs])
        assert labels.dtype == torch.int64 and sorted(labels.tolist()) == [0, 0, 1, 1]
        humans = [h for b in bs for h in b["human_label"]]
        assert sorted(set(humans)) == ["goldfish", "tench, Tinca tinca"]
        assert all(h == ("goldfish" if c == 1 else "tench, Tinca tinca")
                   for h, c in zip(humans, labels.tolist()))
    if "RFW" in target:
        seg = torch.cat([b["segmentation"] for b in bs])
        assert seg.shape[1:] == (side, side, 182) and seg.dtype == torch.float32
        assert torch.all(seg.sum(-1) == 1)
        assert set(seg.argmax(-1).unique().tolist()) == {7, 100}
    if "Previews" in target:
        caps = [c for b in bs for c in b["caption"]]
        assert all(isinstance(c, str) and c for c in caps) and len(set(caps)) == n


@pytest.mark.parametrize("degradation", ["pil_nearest", "cv_bicubic", "bsrgan_light", "bsrgan"])
def test_superres_pairs(data_root, degradation):
    for target in ("ldm.data.imagenet.ImageNetSRTrain", "ldm.data.openimages.SuperresOpenImagesAdvancedValidation"):
        params = {"size": 32, "degradation": degradation, "downscale_f": 4, "min_crop_f": 0.5, "max_crop_f": 1.0,
                  "random_crop": True}
        bs = batches(target, params)
        assert total(bs) == 4
        for b in bs:
            check_image(b["image"], 32)
            check_image(b["LR_image"], 8, color=degradation != "bsrgan")  # full BSRGAN noise may shift colors


def test_layout_tokens(data_root):
    from ldm.data.bbox_tokens import BBoxTokenizer
    for target in ("ldm.data.openimages.OpenImagesBBoxTrain", "ldm.data.openimages.OpenImagesBBoxValidation"):
        bs = batches(target, {"size": 32})
        assert total(bs) == 4
        tok = torch.cat([b["coordinates_bbox"] for b in bs])
        assert tok.dtype == torch.int64 and tok.shape == (4, 92)  # BERTEmbedder max_seq_len of layout2img
        assert tok.min() >= 0 and tok.max() < 8192
        n_objects = sorted(int((t[:90:3] != 8191).sum()) for t in tok)
        if target.endswith("Validation"):  # the center crop meets every box
            assert n_objects == [2, 2, 3, 3]
        else:  # a random crop may miss a box: it is dropped
            assert all(1 <= n <= 3 for n in n_objects)
        for b in bs:
            check_image(b["image"], 32)
    # validation: the center crop of a 48x64 image is encoded; boxes (relative to the full image,
    # with encode_crop) decode back within the 90-section grid. Classes sorted, '/m/01s55n' last:
    # cat 0, dog 1 (group-of: +3 classes), suit 2; box n starts at x0 = 0.1 n.
    tk = BBoxTokenizer(3, 30, 8192, True, True)
    val = batches("ldm.data.openimages.OpenImagesBBoxValidation", {"size": 32}, batch_size=4)[0]
    x0_of = {0: 0.0, 4: 0.1, 2: 0.2}
    for tokens in val["coordinates_bbox"]:
        objs, crop = tk.inverse_build(tokens.numpy())
        assert crop == pytest.approx((8 / 64, 0.0, 48 / 64, 1.0), abs=1 / 89)
        assert {o for o, _ in objs} in ({0, 4}, {0, 4, 2})
        for obj, box in objs:
            assert box == pytest.approx((x0_of[obj], 0.2, 0.4, 0.7), abs=1 / 89)


def test_inpainting_convention(data_root):
    for target, params in (("ldm.data.inpainting.InpaintingTrain", {"size": 32}),
                           ("ldm.data.inpainting.InpaintingValidation", {"size": 32, "protocol": "thin"})):
        bs = batches(target, params)
        assert total(bs) == 3
        for b in bs:
            check_image(b["image"], 32)
            m, x, mx = b["mask"], b["image"], b["masked_image"]
            assert m.shape == (len(x), 32, 32, 1) and set(m.unique().tolist()) <= {-1.0, 1.0}
            hole = (m > 0).expand_as(x)
            assert hole.any()
            # scripts/inpaint.py: masked_image = (1 - mask) * image in [0, 1], then * 2 - 1
            assert torch.all(mx[hole] == -1.0) and torch.allclose(mx[~hole], x[~hole])
    # validation masks are a function of (seed, index): the same across passes
    from ldm.data.inpainting import InpaintingValidation
    ds = InpaintingValidation(size=32)
    assert np.array_equal(ds[1]["mask"], ds[1]["mask"]) and not np.array_equal(ds[0]["mask"], ds[1]["mask"])


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    from ldm.data.lsun import LSUNBase
    for i in range(4):
        save_image(str(tmp_path / f"{i}.jpg"), seed=i)
    good = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (tmp_path / "3.jpg").write_bytes(b"not an image at all")
    write_lines(str(tmp_path / "list.txt"), [f"{i}.jpg" for i in range(4)])
    ds = LSUNBase(str(tmp_path / "list.txt"), str(tmp_path), size=16, flip_p=0.0)
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 2
    assert "1.jpg" in caplog.text and "3.jpg" in caplog.text
    assert [it["file_path_"].rsplit("/", 1)[-1] for it in items] == ["0.jpg", "2.jpg", "2.jpg", "0.jpg"]
    # through a 2-worker loader: no crash, every batch full and valid
    got = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert total(got) == 4 and all(torch.isfinite(b["image"]).all() for b in got)


def test_clear_errors(data_root, tmp_path):
    from ldm.data.imagenet import ImageNetTrain
    from ldm.data.lsun import LSUNChurchesTrain
    from ldm.data.openimages import FullOpenImagesTrain
    with pytest.raises(FileNotFoundError, match=r"church_outdoor_train\.txt"):
        LSUNChurchesTrain(size=32, data_root=str(tmp_path))
    (tmp_path / "openimages" / "train").mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"empty dataset.*openimages/train"):
        FullOpenImagesTrain(size=32, data_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_train/data.*<synset>/<image>\.JPEG"):
        ImageNetTrain(data_root=str(tmp_path))


def test_faces_hq_crop_and_coord(data_root):
    from ldm.data.faceshq import FacesHQTrain
    ds = FacesHQTrain(size=32, crop_size=16, coord=True)
    assert len(ds) == 6
    ex = ds[4]
    assert ex["image"].shape == (16, 16, 3) and ex["coord"].shape == (16, 16, 1) and ex["class"] == 1
    c = ex["coord"][..., 0]
    assert np.allclose(np.diff(c, axis=1), 1 / 1024) and np.allclose(np.diff(c, axis=0), 32 / 1024)


def test_every_config_data_target_resolves(reference):
    """Each dataset / data-module target of every released config resolves and accepts its params."""
    import glob

    from omegaconf import OmegaConf

    from ldm.util import check_params, get_obj_from_str
    seen = set()
    for path in glob.glob(str(reference / "configs" / "**" / "*.yaml"), recursive=True):
        data = OmegaConf.load(path).get("data")
        if data is None:
            continue
        nodes = [data] if not str(data.target).startswith("main.") else []
        nodes += [data.params[s] for s in ("train", "validation", "test") if s in data.params and "target" in data.params[s]]
        nodes += [data.params[s].postprocess for s in ("train", "validation") if s in data.params
                  and "postprocess" in data.params[s]]
        for node in nodes:
            params = OmegaConf.to_container(node.get("params", {}) or {})
            check_params(str(node.target), get_obj_from_str(str(node.target)), params)
            seen.add(str(node.target))
    assert len(seen) >= 20 and "ldm.data.laion.AddMask" in seen and "taming.data.faceshq.FFHQTrain" in seen


def test_datasets_pickle_for_spawned_workers(data_root):
    """spawn / forkserver DataLoader workers receive the dataset pickled: no closures inside."""
    import pickle

    from ldm.data.imagenet import ImageNetSRTrain
    from ldm.data.laion import AddMask
    from ldm.data.previews.pytorch_dataset import PreviewsValidation
    for name in ("bsrgan", "bsrgan_light", "pil_bicubic", "cv_area"):
        ds = pickle.loads(pickle.dumps(ImageNetSRTrain(size=32, degradation=name)))
        assert ds[0]["LR_image"].shape == (8, 8, 3)
    web = pickle.loads(pickle.dumps(PreviewsValidation(size=32)))
    assert next(iter(web))["image"].shape == (32, 32, 3)
    pickle.dumps(AddMask("512train-large", 0.25))
