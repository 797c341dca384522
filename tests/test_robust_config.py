"""Configs are checked all the way down before anything is built: every bad-config case of
issue 13 fails with one ConfigError naming the key path, the value / expected type and the
file, with a did-you-mean; a replaced `target` never inherits the previous target's params."""
from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.config_schema import check_config
from ldm.util import ConfigError, config_source, instantiate_from_config
from test_main_toy import ROOT, toy_config

AE = ROOT / "configs" / "quickstart" / "autoencoder_kl_digits.yaml"
CELEBA = ROOT / "configs" / "ldm" / "celebahq.yaml"

# (config file, override, words the message must hold)
BAD_CONFIGS = [
    (AE, "model.params.ddconfig.ch_multt=[1,2]", ["model.params.ddconfig.ch_multt", "did you mean 'ch_mult'",
                                                  "autoencoder_kl_digits.yaml"]),
    (AE, "model.params.lossconfig.params.disc_weigth=1.0", ["model.params.lossconfig.params.disc_weigth",
                                                            "did you mean 'disc_weight'"]),
    (AE, "model.params.embed_dim='4'", ["model.params.embed_dim", "'4'", "expects int"]),
    (AE, "data.params.batch_size=eight", ["data.params.batch_size", "'eight'", "expects int"]),
    (AE, "data.params.train.params.sise=32", ["data.params.train.params.sise", "did you mean 'size'"]),
    (AE, "model.parms.embed_dim=4", ["model.parms", "did you mean 'params'"]),
    (AE, "modle.params.embed_dim=4", ["top-level section 'modle'", "did you mean 'model'"]),
    (AE, "model.params.ddconfig.dropout=high", ["model.params.ddconfig.dropout", "'high'", "float"]),
    (AE, "lightning.trainer.max_steps=abc", ["lightning.trainer.max_steps", "'abc'", "expects int"]),
    (AE, "lightning.trainer.max_step=3", ["max_step", "did you mean 'max_steps'"]),
    (AE, "lightning.callbacks.image_logger.params.batch_frequency=often",
     ["lightning.callbacks.image_logger.params.batch_frequency", "'often'", "expects int"]),
    (AE, "lightning.callbacks.image_logger.params.max_image=4", ["max_image", "did you mean 'max_images'"]),
]


@pytest.mark.parametrize("path,override,words", BAD_CONFIGS, ids=[o for _, o, _ in BAD_CONFIGS])
def test_bad_config_fails_before_building_naming_key_value_and_file(tmp_path: Path, path: Path, override: str,
                                                                    words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        main.main(["-b", str(path), "-t", "-l", str(tmp_path / "logs"), override])
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    frames = [f.f_code.co_filename for f, _ in traceback.walk_tb(e.value.__traceback__)]
    assert not any("ldm/models" in f or "ldm/modules" in f for f in frames)  # rejected before any model was built
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())  # no log folder left


def test_nested_unet_key_in_a_shipped_ldm_config_names_path_and_file() -> None:
    cfg = OmegaConf.load(CELEBA)
    cfg.model.params.unet_config.params.num_head_channel = 32
    with config_source(str(CELEBA)), pytest.raises(ConfigError) as e:
        check_config(cfg.model, "model")
    msg = str(e.value)
    assert "model.params.unet_config.params.num_head_channel" in msg and "num_head_channels" in msg
    assert "celebahq.yaml" in msg


def test_instantiate_from_config_checks_the_whole_tree_first() -> None:
    cfg = OmegaConf.load(AE).model
    cfg.params.ddconfig.z_channel = 4
    with pytest.raises(ConfigError, match=r"params\.ddconfig\.z_channel'.*did you mean 'z_channels'"):
        instantiate_from_config(cfg)


def test_released_keys_the_original_ignores_pass() -> None:
    cfg = OmegaConf.load(AE).model
    cfg.params.ignore_keys = []  # in IGNORED_KEYS / accepted by the constructor
    check_config(cfg, "model")


def _images(root: Path, n: int = 6, size: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_replacing_a_dataset_target_by_dotlist_drops_the_old_params(tmp_path: Path) -> None:
    # the toy train dataset has params {n: 20}; ImageFolderDataset has no `n`
    cfg = toy_config(tmp_path)
    root = _images(tmp_path / "imgs")
    assert main.main(["-b", str(cfg), "-t", "-l", str(tmp_path / "logs"), "-n", "swap",
                      "data.params.train.target=ldm.data.base.ImageFolderDataset",
                      f"data.params.train.params.root={root}", "data.params.train.params.size=4",
                      "lightning.trainer.max_steps=1"]) == 0


def test_replacing_a_target_by_overlay_yaml_drops_the_old_params(tmp_path: Path) -> None:
    from ldm.training import load_configs
    cfg = toy_config(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  params:\n    train:\n      target: ldm.data.base.ImageFolderDataset\n"
                       "      params:\n        root: /x\n")
    config, _, _ = load_configs([str(cfg), str(overlay)], ["data.params.train.params.size=8"])
    assert OmegaConf.to_container(config.data.params.train) == {
        "target": "ldm.data.base.ImageFolderDataset", "params": {"root": "/x", "size": 8}}
    # the same target again keeps merging params as before
    same = tmp_path / "same.yaml"
    same.write_text("data:\n  params:\n    train:\n      target: test_main_toy.ToyImages\n      params:\n"
                    "        seed: 3\n")
    config, _, _ = load_configs([str(cfg), str(same)], [])
    assert OmegaConf.to_container(config.data.params.train.params) == {"n": 20, "seed": 3}


def test_every_released_and_shipped_training_config_passes_the_strict_checks() -> None:
    """All of main.py's checks (sections, every key at every depth, value types, trainer and
    callback sections) accept every original config and every config we ship."""
    from conftest import reference_or_skip
    from ldm import training
    import json
    ref = reference_or_skip()
    listed = {json.loads(k.read_text())["config"] for k in (ref / "keys").glob("*.json") if k.name != "skipped.json"}
    paths = sorted(ref / "configs" / c for c in listed) + sorted((ROOT / "configs").rglob("*.yaml"))
    checked = 0
    for p in paths:
        raw = OmegaConf.load(p)
        if "model" not in raw or "data" not in raw:
            if "model" in raw:
                with config_source(str(p)):
                    check_config(raw.model, "model")
                checked += 1
            continue
        config, lightning_config, sources = training.load_configs([str(p)], [])
        training.check_run_config(config, lightning_config, sources)
        checked += 1
    assert checked >= 55  # 60 today: every listed original and every shipped model config
