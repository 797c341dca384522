"""The quickstart configs through main.py, shortened to a few steps: stage 1 from the command
line (checkpoints, image grids, TensorBoard events, saved configs), stage 2 in-process on a
stage-1 checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_main_toy import ROOT

pytestmark = pytest.mark.slow
AE = ROOT / "configs" / "quickstart" / "autoencoder_kl_digits.yaml"
LDM = ROOT / "configs" / "quickstart" / "ldm_digits.yaml"

SHORT = ["data.params.batch_size=4", "lightning.trainer.max_steps=3", "lightning.trainer.val_check_interval=2",
         "lightning.trainer.limit_val_batches=1", "lightning.trainer.log_every_n_steps=1",
         "lightning.callbacks.image_logger.params.batch_frequency=2"]


def test_quickstart_autoencoder_from_the_command_line(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LDM_RUN_NOW", None)
    proc = subprocess.run([sys.executable, "main.py", "--base", str(AE), "-t", "-l", str(tmp_path), "-n", "ae",
                           *SHORT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next(tmp_path.glob("*_ae"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert "encoder.conv_in.weight" in ckpt["state_dict"] and len(ckpt["optimizer_states"]) == 2
    assert not list((run / "checkpoints").glob(".*tmp"))  # atomic writes leave no temporaries
    # monitored checkpoint (model.monitor = val/rec_loss) besides last.ckpt
    assert len(list((run / "checkpoints").glob("epoch=*.ckpt"))) == 1
    grids = {p.name for p in (run / "images" / "train").glob("*.png")}
    assert {"inputs_gs-000002_e-000000_b-000001.png", "reconstructions_gs-000002_e-000000_b-000001.png",
            "samples_gs-000002_e-000000_b-000001.png"} <= grids
    assert list((run / "images" / "val").glob("reconstructions_gs-000002_*.png"))
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert "train/rec_loss" in acc.Tags()["scalars"] and "val/rec_loss" in acc.Tags()["scalars"]
    assert "train/reconstructions" in acc.Tags()["images"]
    names = sorted(p.name for p in (run / "configs").iterdir())
    assert len(names) == 2 and names[0].endswith("-lightning.yaml") and names[1].endswith("-project.yaml")
    # lr printed with how it was computed: 1 x 1 x 4 x 2.5e-4
    assert "Setting learning rate to 1.00e-03 = 1 (accumulate_grad_batches) * 1 (num_devices) * 4 (batchsize)" \
        in proc.stderr + proc.stdout


def test_quickstart_ldm_trains_on_a_stage1_checkpoint(tmp_path: Path) -> None:
    from omegaconf import OmegaConf
    import main
    from ldm.util import instantiate_from_config

    ae = instantiate_from_config(OmegaConf.load(AE).model)
    ae_ckpt = tmp_path / "ae.ckpt"
    torch.save({"state_dict": ae.state_dict()}, ae_ckpt)
    assert main.main(["--base", str(LDM), "-t", "-l", str(tmp_path / "logs"), "-n", "ldm",
                      f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}", *SHORT,
                      "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
                      "lightning.callbacks.image_logger.params.log_images_kwargs.N=2"]) == 0
    run = next((tmp_path / "logs").glob("*_ldm"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 3
    assert float(sd["scale_factor"]) != 1.0  # scale_by_std: 1/std of the first batch's latents
    for k, v in ae.state_dict().items():  # the first stage stays frozen at the stage-1 weights
        if not k.startswith("loss."):
            assert torch.equal(sd["first_stage_model." + k], v), k
    assert any(k.startswith("model_ema.") for k in sd)
    assert list((run / "images" / "train").glob("samples_gs-000002_*.png"))


def test_accumulation_with_a_manual_optimization_model_is_done_by_the_model(tmp_path: Path, caplog) -> None:
    import main
    assert main.main(["--base", str(AE), "-t", "-l", str(tmp_path), "-n", "acc", *SHORT,
                      "lightning.trainer.accumulate_grad_batches=2", "lightning.trainer.max_steps=2",
                      "lightning.trainer.limit_val_batches=0"]) == 0
    run = next(tmp_path.glob("*_acc"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4  # 2 batches per step
    assert "2.00e-03 = 2 (accumulate_grad_batches) * 1 (num_devices) * 4 (batchsize)" in caplog.text
