"""Bad input to main.py fails early and says what and where: unknown targets, misspelled
parameters and trainer keys name the YAML file; a missing image folder names the path; an
unreadable image is skipped (and the run completes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import main
from ldm.util import ConfigError
from test_main_toy import ROOT, toy_config


def _main_error(tmp_path: Path, *args: str, exc: type = ConfigError, **overrides) -> str:
    cfg = toy_config(tmp_path, **overrides)
    with pytest.raises(exc) as e:
        main.main(["-b", str(cfg), "-t", "-l", str(tmp_path / "logs"), *args])
    return str(e.value)


def test_unknown_model_target_names_target_and_yaml(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, model={"target": "test_main_toy.ToyModle"})
    assert "test_main_toy.ToyModle" in msg and "did you mean 'test_main_toy.ToyModel'" in msg
    assert "toy.yaml" in msg


def test_unknown_module_names_target(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, data={"params": {"train": {"target": "ldm.data.nosuchmodule.Foo"}}})
    assert "ldm.data.nosuchmodule.Foo" in msg and "toy.yaml" in msg


def test_misspelled_param_names_target_key_and_yaml(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, model={"params": {"hiden": 4}})
    assert "ToyModel" in msg and "'hiden'" in msg and "'hidden'" in msg and "toy.yaml" in msg


def test_misspelled_param_from_command_line_names_it(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, "data.params.train.params.nn=3")
    assert "ToyImages" in msg and "'nn'" in msg and "command line" in msg


def test_unknown_trainer_key_names_key_and_yaml(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, lightning={"trainer": {"max_step": 3}})
    assert "lightning.trainer key 'max_step'" in msg and "did you mean 'max_steps'" in msg and "toy.yaml" in msg


def test_unknown_lightning_section_key(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, lightning={"trainr": {"max_steps": 3}})
    assert "trainr" in msg and "toy.yaml" in msg


def test_bad_override_syntax(tmp_path: Path) -> None:
    msg = _main_error(tmp_path, "--max_steps", "3")
    assert "--max_steps" in msg and "model.params.key=value" in msg


def test_missing_image_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_images"
    msg = _main_error(tmp_path, exc=FileNotFoundError, train={
        "target": "ldm.data.base.ImageFolderDataset", "params": {"root": str(missing), "size": 4}})
    assert str(missing) in msg


def test_corrupt_image_is_skipped_and_the_run_completes(tmp_path: Path, caplog) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(7):
        Image.fromarray(rng.randint(0, 255, (4, 4, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "3.png").write_bytes(b"not a png")
    cfg = toy_config(tmp_path, train={
        "target": "ldm.data.base.ImageFolderDataset", "params": {"root": str(images), "size": 4}})
    assert main.main(["-b", str(cfg), "-t", "-l", str(tmp_path / "logs"), "-n", "corrupt",
                      "lightning.trainer.max_steps=4"]) == 0
    assert "skipping unreadable image" in caplog.text and "3.png" in caplog.text
    run = next((tmp_path / "logs").glob("*_corrupt"))
    assert (run / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_cli_prints_config_error_and_exits_2(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, model={"params": {"hiden": 4}})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "main.py", "-b", str(cfg), "-t", "-l", str(tmp_path / "logs")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "'hiden'" in proc.stderr and "toy.yaml" in proc.stderr
