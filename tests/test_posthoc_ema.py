"""EDM2 post-hoc EMA: the sigma_rel <-> gamma map, the power-function update's weights, the
least-squares reconstruction of a profile recorded directly (from snapshots of two others), the
Lightning callback and scripts/posthoc_ema.py."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from ldm.modules.posthoc_ema import (PostHocEMA, PowerFunctionEMA, gamma_from_sigma_rel, list_snapshots,
                                     reconstruct, save_snapshot, sigma_rel_from_gamma)

torch.set_num_threads(1)


def test_sigma_rel_gamma_map():
    # EDM2 Sec. 3.1: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=5e-3)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.01, 0.075, 0.2, 0.28):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(s)) == pytest.approx(s, rel=1e-10)
    with pytest.raises(ValueError, match="sigma_rel"):
        gamma_from_sigma_rel(0.3)


def test_update_weights_are_the_profile_integrals():
    """theta_hat_t = sum_tau w_tau theta_tau with w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)."""
    t_end, g = 30, gamma_from_sigma_rel(0.1)
    ema = PowerFunctionEMA({"w": torch.zeros(t_end, dtype=torch.float64)}, g, torch.float64)
    for t in range(1, t_end + 1):
        ema.update({"w": torch.eye(t_end, dtype=torch.float64)[t - 1]}, t)   # theta_t = e_t
    tau = np.arange(1, t_end + 1, dtype=np.float64)
    expected = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t_end ** (g + 1)
    np.testing.assert_allclose(ema.shadow["w"].numpy(), expected, rtol=1e-12, atol=1e-15)


def trajectory(t: int) -> torch.Tensor:
    """Smooth, drifting tiny 'parameters' at step t."""
    return torch.tensor([math.sin(t / 97 + k) + (t / 400) ** 2 * k for k in range(5)], dtype=torch.float64)


def test_reconstruction_matches_a_directly_recorded_profile(tmp_path):
    """sigma_rel 0.075 recorded step by step == its reconstruction from snapshots of 0.05 / 0.10 only."""
    emas = {s: PowerFunctionEMA({"w": trajectory(1)}, gamma_from_sigma_rel(s), torch.float64)
            for s in (0.05, 0.075, 0.10)}
    for t in range(1, 401):
        for s, ema in emas.items():
            ema.update({"w": trajectory(t)}, t)
            if t % 10 == 0 and s != 0.075:
                save_snapshot(tmp_path / f"ema-{s:.3f}-{t:08d}.safetensors", ema.shadow, t, ema.gamma, s)
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 80 and snapshots[-1][1] == 400
    weights, x = reconstruct(snapshots, 0.075, dtype=torch.float64)
    err = (weights["w"] - emas[0.075].shadow["w"]).abs().max().item()
    print(f"post-hoc EMA: sigma_rel 0.075 at step 400 from 80 snapshots, max abs error {err:.2e}")
    assert err < 1e-5 and x.sum() == pytest.approx(1.0, abs=1e-4)
    # a profile that is itself a snapshot comes back exactly
    exact, _ = reconstruct(snapshots, 0.10, t=200, dtype=torch.float64)
    ref = next(f for f, t, g in snapshots if t == 200 and g == pytest.approx(gamma_from_sigma_rel(0.1)))
    from safetensors.torch import load_file
    torch.testing.assert_close(exact["w"], load_file(str(ref))["w"], rtol=0, atol=1e-9)



def test_callback_in_a_lightning_fit_and_the_script(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(3, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)
            self.seen = []

        def training_step(self, batch, _):
            return self.frozen(self.model(batch[0])).pow(2).mean()

        def on_train_batch_end(self, *args):   # the parameters after optimizer step t
            self.seen.append(self.model.weight.detach().double().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    cb = PostHocEMA(sigma_rels=[0.05, 0.10], every_n_steps=3, dirpath=str(tmp_path), dtype="float64")
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(18, 3)), batch_size=2))
    snaps = list_snapshots(tmp_path)
    assert [t for _, t, _ in snaps] == [3, 3, 6, 6, 9, 9]
    from safetensors.torch import load_file
    assert set(load_file(str(snaps[-1][0]))) == {"model.weight", "model.bias"}   # trainable only
    direct = PowerFunctionEMA({"w": module.seen[0]}, gamma_from_sigma_rel(0.10), torch.float64)
    for t, w in enumerate(module.seen, 1):
        direct.update({"w": w}, t)
    last_010 = next(f for f, t, g in snaps if t == 9 and g < 10)
    torch.testing.assert_close(load_file(str(last_010))["model.weight"], direct.shadow["w"], rtol=0, atol=1e-12)

    # scripts/posthoc_ema.py writes a checkpoint with model.* and the LitEma copies replaced
    sd = {k: v.float() for k, v in module.state_dict().items()}
    sd["model_ema.weight"], sd["model_ema.num_updates"] = sd["model.weight"].clone(), torch.tensor(9)
    torch.save({"state_dict": sd, "global_step": 9}, tmp_path / "last.ckpt")
    spec = importlib.util.spec_from_file_location("posthoc_ema_script", ROOT / "scripts" / "posthoc_ema.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--snapshots", str(tmp_path), "--ckpt", str(tmp_path / "last.ckpt"),
                       "--sigma-rel", "0.10", "--out", str(tmp_path / "ema.ckpt")])
    new = torch.load(out, weights_only=False)["state_dict"]
    torch.testing.assert_close(new["model.weight"], direct.shadow["w"].float(), rtol=0, atol=1e-6)
    assert torch.equal(new["model_ema.weight"], new["model.weight"])
    assert torch.equal(new["frozen.weight"], sd["frozen.weight"])
    sd.pop("model.bias")
    torch.save({"state_dict": sd}, tmp_path / "other.ckpt")
    with pytest.raises(KeyError, match="different models"):
        script.main(["--snapshots", str(tmp_path), "--ckpt", str(tmp_path / "other.ckpt"),
                     "--sigma-rel", "0.1", "--out", str(tmp_path / "x.ckpt")])


def test_latent_diffusion_run_to_a_checkpoint_the_scripts_load(tmp_path):
    """PostHocEMA on a tiny LatentDiffusion (with LitEma) -> scripts/posthoc_ema.py -> scripting.load_model."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from conftest import reference_or_skip
    from ldm import scripting
    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(reference_or_skip() / "golden" / "_models" / "ldm_crossattn" / "config.yaml")
    cfg.model.params.use_ema = True
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-3
    data = [{"image": torch.rand(8, 8, 3) * 2 - 1, "class_label": i % 10} for i in range(8)]
    cb = PostHocEMA(sigma_rels=[0.05, 0.10], every_n_steps=2, dirpath=str(tmp_path))
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["PostHocEMA"]
    resumed = PostHocEMA(sigma_rels=[0.05, 0.10], every_n_steps=2, dirpath=str(tmp_path))
    resumed.load_state_dict(state)   # a resumed fit: the running averages continue from the checkpoint
    resumed.on_fit_start(trainer, model)
    for a, b in zip(cb.emas, resumed.emas):
        assert a.gamma == b.gamma and all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    with pytest.raises(ValueError, match="sigma_rels"):
        PostHocEMA(sigma_rels=[0.2]).load_state_dict(state)
    spec = importlib.util.spec_from_file_location("posthoc_ema_script", ROOT / "scripts" / "posthoc_ema.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--snapshots", str(tmp_path), "--ckpt", str(tmp_path / "last.ckpt"),
                       "--sigma-rel", "0.07", "--out", str(tmp_path / "ema.ckpt")])
    weights, _ = reconstruct(list_snapshots(tmp_path), 0.07)
    loaded = scripting.load_model(OmegaConf.to_container(cfg), out)
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(loaded.state_dict()[key], weights[key])
    with loaded.ema_scope():   # sampling under the EMA scope sees the reconstruction too
        torch.testing.assert_close(loaded.state_dict()[key], weights[key])
