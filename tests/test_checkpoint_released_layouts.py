"""Released checkpoints in the key layouts the files really have (tests/fixtures/released_key_layouts.json,
not our model's state_dict()): SD v1 (transformers-4 `text_model.*`, position_ids, LitEma counters),
SD v2 (OpenCLIP text tower), the LDM zoo. Full-size key sets on the meta device, strictly; a tiny SD v1
in the released layout through load_model_from_config, `ckpt_path`, the scripts' loader and
Lightning's resume path (main.py -r), values identical."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, reference_or_skip
from test_config_keys import build_on_meta
from test_scripts_common import tiny  # noqa: F401

from ldm import checkpoint as C

LAYOUTS = json.loads((ROOT / "tests" / "fixtures" / "released_key_layouts.json").read_text())
TEXT_V1 = "cond_stage_model.transformer.text_model."


def expand(patterns: list[str], ranges: dict[str, int]) -> list[str]:
    out = []
    for p in patterns:
        names = re.findall(r"\{(\w+)\}", p)
        if not names:
            out.append(p)
            continue
        (name,) = set(names)
        out += [p.replace("{" + name + "}", str(i)) for i in range(ranges[name])]
    return out


def as_built(keys: list[str], prefixes: list[str]) -> list[str]:
    return [k for k in keys if "." not in k and "<schedule buffers>" in prefixes
            or any(k.startswith(p) for p in prefixes if not p.startswith("<"))]


def released_keys(name: str, ref: Path, ranges: dict[str, int] | None = None) -> list[str]:
    spec = LAYOUTS[name]
    listing = [k for k, _, _ in json.loads((ref / "keys" / spec["listing"]).read_text())["state_dict"]]
    return as_built(listing, spec["as_built_prefixes"]) + expand(spec["keys"], ranges or spec["ranges"]) + spec["extra"]


def model_side(key: str, own: dict) -> str | None:
    """The model key a released key holds (for shapes and the value check): an independent,
    test-side statement of the fixture's facts, not ldm.checkpoint's table."""
    for cand in (key, key.replace(TEXT_V1, "cond_stage_model.transformer.")):
        if cand in own:
            return cand
    return None


def meta_state_dict(keys: list[str], own: dict) -> dict[str, torch.Tensor]:
    sd = {}
    for k in keys:
        m = model_side(k, own)
        shape = own[m].shape if m else ((1, 77) if k.endswith("position_ids") else ())
        sd[k] = torch.empty(shape, device="meta")
    return sd


@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.startswith("_")])
def test_full_size_released_key_sets_load_strictly(name, caplog):
    ref = reference_or_skip()
    spec = LAYOUTS[name]
    model = build_on_meta(ref / "configs" / spec["config"])
    own = model.state_dict()
    keys = released_keys(name, ref)
    assert len(keys) == len(set(keys))
    variants = [keys]
    if name == "sd-v1":   # the -full-ema files: also every UNet parameter's LitEma shadow
        variants.append(keys + [f"model_ema.{k[len('model.'):].replace('.', '')}" for k, p in
                                model.named_parameters() if k.startswith("model.diffusion_model.")])
    if spec["optional"] and not spec["optional"][0].startswith("model_ema.<"):
        variants.append(keys + spec["optional"])
    for ks in variants:
        with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
            caplog.clear()
            report = C.load_into(model, meta_state_dict(ks, own), source=name)
        assert report.ok
        renamed = [r.message for r in caplog.records if "released key layout" in r.message]
        if name == "sd-v1":   # one line, with the count: 12 layers x 16 + 4 embedding/norm keys
            assert len(renamed) == 1 and "196 key(s)" in renamed[0], renamed
        else:
            assert not renamed
    if name == "sd-v1":   # without the table the strict loader refuses the released layout
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(C, "RELEASED_LAYOUTS", ())
            with pytest.raises(C.CheckpointError, match="text_model"):
                C.load_into(model, meta_state_dict(keys, own), source=name)


# ----------------------------------------------------------------------------------------
# A tiny SD v1 in the released layout, values identical through every loader
# ----------------------------------------------------------------------------------------
def released_tiny_sd1(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """The released layout's keys for the tiny model (its own UNet / first stage, which releases
    store as built; the text encoder, position_ids and LitEma counters from the fixture), with
    fresh random values so that a load that skips anything shows."""
    spec, own = LAYOUTS["sd-v1"], model.state_dict()
    n_layers = model.cond_stage_model.transformer.config.num_hidden_layers
    keys = as_built(list(own), spec["as_built_prefixes"]) + expand(spec["keys"], {"layer": n_layers}) + spec["extra"]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in keys:
        m = model_side(k, own)
        if m is None:
            sd[k] = torch.arange(77)[None] if k.endswith("position_ids") else torch.tensor(0.9999 if "decay" in k else 7)
        elif own[m].is_floating_point() and "." in k:   # the schedule buffers stay a valid schedule
            sd[k] = torch.randn(own[m].shape, generator=g).to(own[m].dtype)
        else:
            sd[k] = own[m].clone()
    assert not any(k.startswith("cond_stage_model.transformer.") and not k.startswith(TEXT_V1) for k in sd)
    return sd


def assert_holds(model: torch.nn.Module, released: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    held = {model_side(k, own): v for k, v in released.items() if model_side(k, own)}
    assert set(held) == set(own), set(own) ^ set(held)
    for k, v in held.items():
        assert torch.equal(own[k].cpu(), v.to(own[k].dtype)), k


@pytest.fixture(scope="module")
def released_sd1(tiny, tmp_path_factory):
    from ldm import scripting as S
    cfg, ckpt = tiny("configs/stable-diffusion/v1-inference.yaml")
    model = S.load_model(cfg, ckpt, "cpu")
    sd = released_tiny_sd1(model)
    path = tmp_path_factory.mktemp("released") / "sd-v1-released-layout.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 5}, path)
    return cfg, path, sd


def test_released_layout_through_load_model_from_config(released_sd1, caplog):
    cfg, path, sd = released_sd1
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        model = C.load_model_from_config(str(cfg), path)   # strict
    assert_holds(model, sd)
    lines = [r.message for r in caplog.records if "released key layout" in r.message]
    assert len(lines) == 1 and "36 key(s)" in lines[0]     # 2 layers x 16 + 4


def test_released_layout_through_ckpt_path_and_the_scripts(released_sd1):
    from ldm import scripting as S
    from ldm.util import instantiate_from_config
    cfg, path, sd = released_sd1
    conf = OmegaConf.load(cfg)
    conf.model.params.ckpt_path = str(path)           # main.py builds the model from the config like this
    assert_holds(instantiate_from_config(conf.model), sd)
    assert_holds(S.load_model(cfg, path, "cpu"), sd)  # what scripts/txt2img.py & co. call


def test_released_layout_through_lightning_resume(released_sd1):
    """main.py -r: Lightning calls on_load_checkpoint, then load_state_dict(strict=True)."""
    from ldm.util import instantiate_from_config
    cfg, path, sd = released_sd1
    model = instantiate_from_config(OmegaConf.load(cfg).model)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert_holds(model, sd)
    # a real mismatch still fails Lightning's strict load
    bad = torch.load(path, map_location="cpu", weights_only=True)
    bad["state_dict"]["model.diffusion_model.not_a_layer.weight"] = torch.zeros(1)
    model.on_load_checkpoint(bad)
    with pytest.raises(RuntimeError, match="not_a_layer"):
        model.load_state_dict(bad["state_dict"], strict=True)


def test_split_input_params_can_be_deleted_then_sampling_works(released_sd1):
    """The original super-resolution notebook deletes the attribute between images."""
    from ldm import scripting as S
    cfg, path, _ = released_sd1
    model = S.load_model(cfg, path, "cpu")
    for _ in range(2):
        if hasattr(model, "split_input_params"):
            delattr(model, "split_input_params")
    assert model.split_input_params is None
    with torch.no_grad():
        c = model.get_learned_conditioning(["a"])
        z = S.sample(model, "ddim", 2, (4, 8, 8), 1, c, progress=False, generator=torch.Generator().manual_seed(0))
        x = model.decode_first_stage(z)
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(x).all()


class Captions(torch.utils.data.Dataset):
    """Random 64x64 images with captions, in SD v1's batch keys (jpg, txt)."""

    def __init__(self, n: int = 4, size: int = 64):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"jpg": torch.rand(self.size, self.size, 3, generator=g) * 2 - 1, "txt": f"a photo number {i}"}


@pytest.mark.slow
def test_released_layout_through_main_py_resume(tiny, tmp_path):
    """main.py -r on a run whose last.ckpt holds the transformers-4 text encoder layout (as a run
    made with transformers < 5 has): it resumes, and the frozen encoder keeps the file's values."""
    import main
    cfg_path, _ = tiny("configs/stable-diffusion/v1-inference.yaml")
    cfg = OmegaConf.load(cfg_path)
    cfg.model.base_learning_rate = 1.0e-5
    cfg.data = {"target": "main.DataModuleFromConfig",
                "params": {"batch_size": 2, "num_workers": 0,
                           "train": {"target": "test_checkpoint_released_layouts.Captions"}}}
    cfg.lightning = {"trainer": {"max_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                                 "num_sanity_val_steps": 0, "limit_val_batches": 0, "log_every_n_steps": 1},
                     "callbacks": {"image_logger": {"target": "main.ImageLogger", "params": {"disabled": True,
                                                                                             "batch_frequency": 1000}}}}
    path = tmp_path / "sd1-tiny-train.yaml"
    OmegaConf.save(cfg, path)
    logs = tmp_path / "logs"
    assert main.main(["-b", str(path), "-t", "-l", str(logs), "-n", "sd1"]) == 0
    run = next(logs.glob("*_sd1"))
    ckpt_file = run / "checkpoints" / "last.ckpt"
    ckpt = C.read_checkpoint(ckpt_file)
    g = torch.Generator().manual_seed(5)
    released, injected = {}, {}
    for k, v in ckpt["state_dict"].items():
        if k.startswith("cond_stage_model.transformer."):
            new = torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
            released[k.replace("cond_stage_model.transformer.", TEXT_V1)] = injected[k] = new
        else:
            released[k] = v
    released[TEXT_V1 + "embeddings.position_ids"] = torch.arange(77)[None]
    released["model_ema.decay"], released["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(7)
    ckpt["state_dict"] = released
    torch.save(ckpt, ckpt_file)
    assert main.main(["-r", str(run), "-t", "lightning.trainer.max_steps=2"]) == 0
    resumed = C.read_checkpoint(ckpt_file)
    assert resumed["global_step"] == 2
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in injected.items())
