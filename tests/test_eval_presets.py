"""Protocol presets (configs/eval/presets.yaml) and their merge with command-line options."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ldm.eval.presets import get_preset, load_presets

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "scripts" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_rows_are_present_with_their_numbers():
    p = load_presets()
    assert p["celebahq-ldm-vq-4"]["paper"]["fid"] == 5.11 and p["celebahq-ldm-vq-4"]["steps"] == 500
    assert p["ffhq-ldm-vq-4"]["paper"]["fid"] == 4.98 and p["lsun-churches-ldm-kl-8"]["paper"]["fid"] == 4.02
    assert p["lsun-bedrooms-ldm-vq-4"]["paper"]["fid"] == 2.95
    cin = p["cin256-ldm-4-g-1.5"]
    assert (cin["paper"]["fid"], cin["scale"], cin["steps"], cin["uncond_label"]) == (3.60, 1.5, 250, 1000)
    assert p["vq-f4"]["paper"]["psnr"] == {"mean": 27.43, "std": 4.26} and p["vq-f4"]["task"] == "autoencoder"
    assert not any(k.startswith("_") for k in p)
    for name, pr in p.items():
        assert pr["paper"] and pr["row"] and pr["config"] and pr["ckpt"], name
        if pr.get("task", "generative") == "generative":
            assert pr["n"] == 50000 and pr["reference"]["split"] == "train", name   # App. E.3.1
    with pytest.raises(KeyError, match="did you mean 'celebahq-ldm-vq-4'"):
        get_preset("celebahq-ldm-vq4")


def test_preset_configs_exist_in_the_original_layout_and_targets_resolve():
    from conftest import reference_or_skip
    from ldm.util import get_obj_from_str

    base = reference_or_skip() / "configs" / "latent-diffusion"
    for name, pr in load_presets().items():
        assert (base / pr["config"]).is_file(), f"{name}: {pr['config']}"
        data = (pr.get("reference") or {}).get("data")
        if data:
            get_obj_from_str(data["target"])


def test_cli_values_override_preset_and_autoencoder_defaults():
    cli = _cli()
    s = cli.settings_from_args(["--preset", "celebahq-ldm-vq-4", "--steps", "100", "--ckpt", "x.ckpt",
                                "--random-inception"])
    assert (s.steps, s.eta, s.n, s.sampler, s.ckpt, s.split) == (100, 0.0, 50000, "ddim", "x.ckpt", "train")
    assert list(s.metrics) == ["fid", "pr"] and s.paper["fid"] == 5.11 and s.random_inception and s.use_cache
    a = cli.settings_from_args(["--preset", "kl-f8", "--metrics", "psnr,ssim"])
    assert a.task == "autoencoder" and a.n is None and list(a.metrics) == ["psnr", "ssim"]
    assert a.split == "validation" and a.reference_data["target"] == "ldm.data.imagenet.ImageNetValidation"
    d = cli.settings_from_args(["--outdir", "o", "--skip-sampling", "--no-cache"])
    assert d.task == "generative" and d.skip_sampling and not d.use_cache and d.steps == 200
