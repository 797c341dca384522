"""Fine-tuning Stable Diffusion from a shipped config (configs/stable-diffusion/v1-finetune.yaml,
v2-finetune-v.yaml) on a captioned folder: `main.py --finetune_from <ckpt>` loads the weights
strictly with a summary, the EMA restarts at them (or is loaded), the learning rate is used as
written; `-r` resumes the run exactly; txt2img.py and img2img.py sample the result.

The checkpoints are tiny random-weight models (scripts/make_tiny_checkpoint.py) written in the
key layout of the released files: SD v1's CLIP under transformers-4 names (`transformer.text_model.*`,
`embeddings.position_ids`) with the LitEma counters, SD 2's *-ema-pruned files without `model_ema.*`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from test_owndata_folder import make_folder, roots
from test_scripts_common import script

pytestmark = pytest.mark.slow
SD = ROOT / "configs" / "stable-diffusion"
RUN = ["lightning.trainer.limit_val_batches=0", "lightning.trainer.num_sanity_val_steps=0",
       "lightning.trainer.enable_progress_bar=false", "lightning.trainer.log_every_n_steps=1",
       "lightning.callbacks.image_logger.params.batch_frequency=2", "lightning.callbacks.image_logger.params.max_images=1",
       "lightning.callbacks.image_logger.params.log_images_kwargs.N=1",
       "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
       "data.params.batch_size=2", "data.params.num_workers=0",
       "data.params.train.params.size=64", "data.params.validation.params.size=64"]


CLIP = "cond_stage_model.transformer."


def tiny_sd(config: str, out: Path, drop_ema: bool = False, released_clip: bool = False) -> tuple[Path, Path]:
    """(tiny model config, checkpoint) of a fine-tune config; drop_ema: the file holds no
    model_ema.* (as the released *-ema-pruned files); released_clip: the CLIP text encoder under
    the transformers-4 names of the SD v1 files (+ position_ids)."""
    ckpt = out / "model.ckpt"
    cfg = script("make_tiny_checkpoint").main([str(SD / config), "--tiny", "--out", str(ckpt)])
    data = torch.load(ckpt, weights_only=True)
    sd = data["state_dict"]
    if drop_ema:
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if released_clip:
        sd = {(CLIP + "text_model." + k[len(CLIP):] if k.startswith(CLIP) and not k.startswith(CLIP + "text_model.")
               else k): v for k, v in sd.items()}
        sd[CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        assert not any(k.startswith(CLIP) and not k.startswith(CLIP + "text_model.") for k in sd)
    data["state_dict"] = sd
    torch.save(data, ckpt)
    return cfg, ckpt


def last(run: Path) -> dict:
    from ldm.checkpoint import read_checkpoint
    return read_checkpoint(run / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ft") / "my_images")


def test_finetune_sd1_resume_exactly_then_txt2img_and_img2img(folder, tmp_path, monkeypatch, caplog):
    import main
    monkeypatch.chdir(ROOT)
    cfg, ckpt = tiny_sd("v1-finetune.yaml", tmp_path / "sd1", released_clip=True)
    base = ["--base", str(SD / "v1-finetune.yaml"), str(cfg), "-t", "-l", str(tmp_path / "logs"),
            *RUN, *roots(folder)]
    assert main.main([*base, "-n", "straight", "--finetune_from", str(ckpt), "lightning.trainer.max_steps=4"]) == 0
    assert "Fine-tuning from" in caplog.text and "EMA     reset to the loaded weights" in caplog.text
    assert "Setting learning rate to 1.00e-05 (--scale_lr false" in caplog.text     # as written, not x batch
    straight = next((tmp_path / "logs").glob("*_straight"))
    released = torch.load(ckpt, weights_only=True)["state_dict"]
    sd = last(straight)["state_dict"]
    clip_norm = next(k for k in sd if k.startswith(CLIP) and k.endswith("final_layer_norm.weight"))
    released_norm = CLIP + "text_model." + clip_norm[len(CLIP):].removeprefix("text_model.")
    assert torch.equal(sd[clip_norm], released[released_norm])             # frozen parts: the file's weights
    k = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(sd[k], released[k])
    unet = "model.diffusion_model.out.2.weight"
    assert not torch.equal(sd[unet], released[unet])                            # trained
    assert last(straight)["global_step"] == 4

    # interrupted after 2 steps, resumed with -r: the same weights, EMA and optimizer state as straight through
    assert main.main([*base, "-n", "split", "--finetune_from", str(ckpt), "lightning.trainer.max_steps=2"]) == 0
    split = next((tmp_path / "logs").glob("*_split"))
    caplog.clear()
    assert main.main(["-r", str(split), "-t", "-l", str(tmp_path / "logs"), *RUN[:2], "lightning.trainer.max_steps=4"]) == 0
    assert "Fine-tuning from" not in caplog.text             # -r restores the run, the file is not read again
    assert "Setting learning rate to 1.00e-05 (--scale_lr false" in caplog.text     # kept (split/finetune.yaml)
    resumed = last(split)
    assert resumed["global_step"] == 4
    for k, v in sd.items():
        assert torch.equal(resumed["state_dict"][k], v), k
    assert len(list((straight / "images" / "train").glob("samples_cfg_scale_*gs-000002_*.png"))) == 1

    project = sorted((split / "configs").glob("*-project.yaml"))[-1]
    common = ["--config", str(project), "--ckpt", str(split / "checkpoints" / "last.ckpt"), "--steps", "2",
              "--n_samples", "1", "--device", "cpu", "--prompt", "a blue square"]
    txt = script("txt2img").main([*common, "--outdir", str(tmp_path / "txt")])
    assert np.asarray(Image.open(txt[0])).shape == (64, 64, 3)
    init = tmp_path / "init.png"
    Image.open(next(folder.rglob("*.png"))).convert("RGB").resize((64, 64)).save(init)
    img = script("img2img").main([*common, "--init-img", str(init), "--strength", "0.5",
                                  "--outdir", str(tmp_path / "img")])
    assert len(img) == 1 and np.asarray(Image.open(img[0])).shape == (64, 64, 3)


def test_finetune_sd2_v_from_an_ema_less_checkpoint_and_resume(folder, tmp_path, monkeypatch, caplog):
    import main
    monkeypatch.chdir(ROOT)
    cfg, ckpt = tiny_sd("v2-finetune-v.yaml", tmp_path / "sd2", drop_ema=True)
    # the tiny stand-in for OpenCLIP is a CLIP text model, which has no "penultimate" layer option
    base = ["--base", str(SD / "v2-finetune-v.yaml"), str(cfg), "-t", "-l", str(tmp_path / "logs"), *RUN,
            "model.params.cond_stage_config.params.layer=last", *roots(folder)]
    assert main.main([*base, "-n", "v", "--finetune_from", str(ckpt), "--finetune_ema", "load",
                      "lightning.trainer.max_steps=2"]) == 0
    assert "EMA     reset to the loaded weights (the checkpoint has no EMA weights)" in caplog.text
    run = next((tmp_path / "logs").glob("*_v"))
    assert main.main(["-r", str(run), "-t", "-l", str(tmp_path / "logs"), *RUN[:2], "lightning.trainer.max_steps=3"]) == 0
    assert last(run)["global_step"] == 3
    project = sorted((run / "configs").glob("*-project.yaml"))[-1]
    out = script("txt2img").main(["--config", str(project), "--ckpt", str(run / "checkpoints" / "last.ckpt"),
                                  "--steps", "2", "--n_samples", "1", "--device", "cpu", "--prompt", "a red square",
                                  "--outdir", str(tmp_path / "txt")])
    assert len(out) == 1


def test_ema_modes_and_the_summary(tmp_path):
    """reset: the EMA shadows start at the loaded weights; load: they are the file's model_ema.*;
    entries the model has no place for are listed as ignored."""
    from omegaconf import OmegaConf

    from ldm.training.finetune import init_from_checkpoint
    from ldm.util import instantiate_from_config
    cfg, ckpt = tiny_sd("v1-finetune.yaml", tmp_path / "sd1")
    data = torch.load(ckpt, weights_only=True)
    sd = data["state_dict"]
    ema_keys = [k for k in sd if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    for k in ema_keys:
        sd[k] = sd[k] + 1.0                      # the file's EMA differs from its weights
    sd["some_head.weight"] = torch.zeros(2)      # a part this model does not have
    torch.save(data, ckpt)
    model = instantiate_from_config(OmegaConf.load(cfg).model)
    name, p = next((n, p) for n, p in model.model.named_parameters() if p.requires_grad)
    shadow = model.model_ema.m_name2s_name[name]

    summary = init_from_checkpoint(model, str(ckpt), "reset")
    assert torch.equal(dict(model.model_ema.named_buffers())[shadow], sd["model." + name])
    assert "some_head.weight" in summary["ignored"] and f"model_ema.{shadow}" in summary["ignored"]
    summary = init_from_checkpoint(model, str(ckpt), "load")
    assert torch.equal(dict(model.model_ema.named_buffers())[shadow], sd["model." + name] + 1.0)
    assert summary["ignored"] == ["some_head.weight"] and summary["ema"].startswith("loaded from the checkpoint")
    del sd["model." + name]
    torch.save(data, ckpt)
    with pytest.raises(Exception, match=name.split(".", 1)[1]):   # strict: a missing weight is an error
        init_from_checkpoint(model, str(ckpt), "reset")
