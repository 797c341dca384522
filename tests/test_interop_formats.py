"""Checkpoint formats: .ckpt / .safetensors / a diffusers folder through the one loading
boundary, fp16 saves, and `convert.py prune` (EMA drop / EMA only, optimizer states, sizes)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_formats_and_prune(tmp_path, capsys):
    import convert
    from make_tiny_checkpoint import make_tiny

    from ldm import scripting as S
    from ldm.checkpoint import load_state_dict_file
    ckpt = tmp_path / "m.ckpt"
    # scale_by_std: the measured scale_factor is a buffer, carried as the VAE's scaling_factor
    cfg = make_tiny(ROOT / "configs/ldm/celebahq.yaml", [ckpt], config_out=tmp_path / "m.yaml",
                    overrides=["model.params.scale_by_std=true"])
    obj = torch.load(ckpt, weights_only=True)
    sd = obj["state_dict"]
    sd["scale_factor"] = torch.tensor(0.8431)
    # give the EMA shadows their own values, and pretend a training run saved optimizer states
    ema = {k: v + 1 for k, v in sd.items() if k.startswith("model_ema.") and v.is_floating_point() and v.ndim}
    sd.update(ema)
    obj["optimizer_states"] = [{"state": {0: {"exp_avg": torch.zeros(1000)}}}]
    torch.save(obj, ckpt)

    only = tmp_path / "ema_only.safetensors"
    convert.main(["prune", "--ckpt", str(ckpt), "--out", str(only), "--ema", "only", "--dtype", "fp16"])
    printed = capsys.readouterr().out
    assert "MiB ->" in printed and "optimizer_states" in printed
    pruned = load_state_dict_file(only)
    assert not any(k.startswith("model_ema.") for k in pruned)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert pruned[key].dtype == torch.float16
    assert torch.equal(pruned[key], ema["model_ema.diffusion_modelinput_blocks00weight"].half())
    assert only.stat().st_size < ckpt.stat().st_size / 3

    dropped = tmp_path / "no_ema.ckpt"
    convert.main(["prune", "--ckpt", str(ckpt), "--out", str(dropped), "--ema", "drop"])
    small = torch.load(dropped, weights_only=True)
    assert "optimizer_states" not in small and small["global_step"] == 0
    assert torch.equal(small["state_dict"][key], sd[key])

    # the same model from a .ckpt, a .safetensors and a diffusers folder (config without EMA)
    from omegaconf import OmegaConf
    c = OmegaConf.load(cfg)
    c.model.params.use_ema = False
    OmegaConf.save(c, tmp_path / "noema.yaml")
    a = S.load_model(tmp_path / "noema.yaml", dropped)
    folder = convert.main(["to-diffusers", "--config", str(tmp_path / "noema.yaml"), "--ckpt", str(dropped),
                           "--out", str(tmp_path / "folder")])
    b = S.load_model(tmp_path / "noema.yaml", folder)
    assert float(b.scale_factor) == float(torch.tensor(0.8431)) and "scale_factor" in b.state_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    half = convert.main(["to-diffusers", "--config", str(tmp_path / "noema.yaml"), "--ckpt", str(dropped),
                         "--out", str(tmp_path / "folder16"), "--dtype", "fp16"])
    from safetensors.torch import load_file
    w = load_file(str(half / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in w.values())
