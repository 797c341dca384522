"""A 5-step `main.py` smoke run of every shipped configs/ldm/*.yaml: the model shrunk by
scripts/make_tiny_checkpoint.py's --tiny preset (the same structure: levels, attention,
conditioning), the data a tiny replica of each dataset's folder layout (tests/test_data_paper_datasets.py),
the image logging as the config sets it (its log_images_kwargs), once, at the last step
(validation, which would log the same grids again, is off to keep CI short). Prints the wall time of training vs image logging for each config, and holds the
logging cost of each call to the DDIM steps the config asks for."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from test_data_paper_datasets import build_layouts

pytestmark = pytest.mark.slow
CONFIGS = sorted(p.name for p in (ROOT / "configs" / "ldm").glob("*.yaml"))
STEPS = 5
RUN = [f"lightning.trainer.max_steps={STEPS}", "lightning.trainer.limit_val_batches=0",   # (validation logs the same)
       "lightning.trainer.num_sanity_val_steps=0", "lightning.trainer.enable_progress_bar=false",
       f"lightning.callbacks.image_logger.params.batch_frequency={STEPS}",
       "lightning.trainer.enable_model_summary=false", "lightning.trainer.benchmark=false",
       "data.params.batch_size=2", "data.params.num_workers=0"]
WALL = re.compile(r"Wall time: ([\d.]+) s fit, of which ([\d.]+) s training and ([\d.]+) s image logging "
                  r"\((\d+) log_images calls, (\d+) UNet evaluations\)")
TIMES: dict[str, tuple[float, float]] = {}


def tiny_overlay(name: str, out: Path) -> tuple[Path, int]:
    """The model section shrunk by --tiny (written as an overlay) and the image side it needs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_checkpoint import LATENT_SIDE, tiny_model
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "ldm" / name), resolve=True)
    model = tiny_model(cfg["model"], out)
    model["params"]["first_stage_config"]["params"]["ckpt_path"] = None   # a random first stage
    levels = len(model["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"])
    unet = model["params"]["unet_config"]["params"]
    latent = max(LATENT_SIDE, 2 ** (len(unet["channel_mult"]) - 1))   # every UNet level at least 1x1
    model["params"]["image_size"] = unet["image_size"] = latent
    path = out / f"tiny-{name}"
    OmegaConf.save({"model": model}, path)
    return path, latent * 2 ** (levels - 1)


def data_overrides(name: str, side: int) -> list[str]:
    """Every size of the config's datasets set to the tiny image side."""
    data = OmegaConf.load(ROOT / "configs" / "ldm" / name).data.params
    out = []
    for split in ("train", "validation"):
        params = data[split].get("params", {})
        for key in ("size", "crop_size"):
            if key in params:
                out.append(f"data.params.{split}.params.{key}={side}")
        if "config" in params and "size" in params.config:
            out.append(f"data.params.{split}.params.config.size={side}")
    return out


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_data")
    build_layouts(str(root))
    return root


@pytest.mark.parametrize("name", CONFIGS)
def test_five_step_smoke_run_logs_cheaply(name, replica, tmp_path, monkeypatch, caplog, capsys):
    import main
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LDM_DATA_ROOT", str(replica))
    overlay, side = tiny_overlay(name, tmp_path)
    extra = []
    if name == "txt2img-1p4B.yaml":   # BERT's tokenizer: a vocabulary trained on the replica's captions
        from train_tokenizer import main as train_tokenizer
        tok = train_tokenizer(["--captions", str(replica / "previews" / "train"), "--out", str(tmp_path / "tok")])
        extra.append(f"model.params.cond_stage_config.params.tokenizer_path={tok}")
    caplog.set_level("INFO")
    assert main.main(["--base", str(ROOT / "configs" / "ldm" / name), str(overlay), "-t", "-l", str(tmp_path / "logs"),
                      "-n", "smoke", *RUN, *data_overrides(name, side), *extra]) == 0
    m = WALL.search(caplog.text)
    assert m, caplog.text[-2000:]
    fit, train, logging, calls, evals = float(m[1]), float(m[2]), float(m[3]), int(m[4]), int(m[5])
    TIMES[name] = (train, logging)
    with capsys.disabled():
        print(f"\n[smoke] {name}: {STEPS} steps, wall time training {train:.1f} s vs image logging {logging:.1f} s "
              f"({calls} calls, {evals} UNet evaluations)")
    assert calls == 1
    kwargs = OmegaConf.load(ROOT / "configs" / "ldm" / name).lightning.callbacks.image_logger.params.log_images_kwargs
    guided = float(kwargs.get("unconditional_guidance_scale", 1.0)) != 1.0
    # per call: one DDIM chain (+ a guided one) of the configured steps; no 1000-step progressive row
    assert evals <= calls * kwargs.ddim_steps * (2 + 2 * guided)
    run = next((tmp_path / "logs").glob("*_smoke"))
    assert list((run / "images" / "train").glob(f"samples_gs-{STEPS:06}_*.png"))
