"""DDPM / LatentDiffusion wiring: conditioning, scale_by_std, ucg dropout, EMA, checkpoints,
optimizers, tiling inside the model, sampling entry points and image logs (tiny fake networks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.diffusion.conditioning import apply_ucg, make_cond_ids, slice_cond, wrap_cond
from ldm.util import instantiate_from_config

HERE = __name__


# ----------------------------------------------------------------------------------------
# Fakes (importable by instantiate_from_config as <this module>.<Name>)
# ----------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Returns x and records the keyword arguments it got."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.kwargs = None

    def forward(self, x, t, **kwargs):
        self.kwargs = kwargs
        return x * self.w


class PointNet(nn.Module):
    """A pointwise 'UNet' (exact under tiling): the first `out` channels times 2 plus the sum of the
    others (the concat conditioning), plus the mean of the context if any."""

    def __init__(self, out: int = 3):
        super().__init__()
        self.out = out
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t, context=None, y=None):
        h = x[:, :self.out] * self.w + x[:, self.out:].sum(1, keepdim=True)
        if context is not None:
            h = h + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return h


class FakeFirstStage(nn.Module):
    """'Autoencoder' with factor 2: encode = 3 * avgpool2 (a tensor, like VQModelInterface), decode = up2 / 3."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(()))

    def encode(self, x):
        return 3 * F.avg_pool2d(x, 2) * self.p

    def decode(self, z):
        return F.interpolate(z / 3, scale_factor=2, mode="nearest")


class TextEncoder(nn.Module):
    """Captions -> (B, 2, 4) context from their lengths."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, texts):
        self.seen = texts
        lengths = torch.tensor([float(len(s)) for s in texts])
        return (lengths.view(-1, 1, 1) * self.scale).expand(-1, 2, 4).contiguous()


def _cfg(target, **params):
    return {"target": target, "params": params}


def _ldm(cond_stage_config="__is_unconditional__", conditioning_key=None, unet_out=3, **kw):
    params = dict(first_stage_config=_cfg(f"{HERE}.FakeFirstStage"), cond_stage_config=cond_stage_config,
                  unet_config=_cfg(f"{HERE}.PointNet", out=unet_out), conditioning_key=conditioning_key,
                  timesteps=20, image_size=4, channels=3, use_ema=False, first_stage_key="image", log_every_t=5)
    params.update(kw)
    return instantiate_from_config(_cfg("ldm.models.diffusion.ddpm.LatentDiffusion", **params))


def _ddpm(**kw):
    params = dict(unet_config=_cfg(f"{HERE}.PointNet"), timesteps=10, image_size=4, channels=3, use_ema=False,
                  log_every_t=5)
    params.update(kw)
    return instantiate_from_config(_cfg("ldm.models.diffusion.ddpm.DDPM", **params))


def _images(b=2, h=8, seed=0):
    return torch.rand(b, h, h, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------------------
# DiffusionWrapper and conditioning helpers
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,expect_channels,expect_kwargs", [
    (None, 2, set()), ("concat", 5, set()), ("crossattn", 2, {"context"}), ("hybrid", 5, {"context"}),
    ("adm", 2, {"y"}), ("hybrid-adm", 5, {"context", "y"}), ("crossattn-adm", 2, {"context", "y"}),
])
def test_diffusion_wrapper_routes_conditioning(key, expect_channels, expect_kwargs):
    from ldm.models.diffusion.ddpm import DiffusionWrapper
    w = DiffusionWrapper(_cfg(f"{HERE}.Recorder"), key)
    x, t = torch.zeros(2, 2, 4, 4), torch.tensor([1, 2])
    c_concat = [torch.ones(2, 1, 4, 4), torch.ones(2, 2, 4, 4)]
    ctx = [torch.ones(2, 3, 8), 2 * torch.ones(2, 5, 8)]
    y = torch.tensor([3, 4])
    out = w(x, t, c_concat=c_concat, c_crossattn=ctx if key != "adm" else [y], c_adm=y)
    assert out.shape[1] == expect_channels
    got = w.diffusion_model.kwargs
    assert set(got) == expect_kwargs
    if "context" in got:
        assert got["context"].shape == (2, 8, 8)   # concatenated along the token axis
    if "y" in got:
        assert torch.equal(got["y"], y)
    with pytest.raises(ValueError):
        DiffusionWrapper(_cfg(f"{HERE}.Recorder"), "film")


def test_wrap_and_slice_cond():
    c = torch.arange(6.0).view(3, 2)
    assert wrap_cond(c, "concat")["c_concat"][0] is c
    assert wrap_cond([c], "crossattn")["c_crossattn"][0] is c
    assert wrap_cond({"c_concat": [c]}, "hybrid") == {"c_concat": [c]}
    assert slice_cond({"c_concat": [c], "c_adm": c}, 2)["c_concat"][0].shape == (2, 2)
    assert slice_cond([c, c], 1)[1].shape == (1, 2)


def test_cond_ids_shortened_schedule():
    ids = make_cond_ids(20, 5)
    assert ids.tolist() == [0, 5, 10, 14, 19] + [19] * 15   # round(linspace(0, 19, 5)), then T-1
    model = _ldm(cond_stage_config=_cfg(f"{HERE}.TextEncoder"), conditioning_key="crossattn", num_timesteps_cond=5,
                 cond_stage_key="caption")
    assert model.shorten_cond_schedule and torch.equal(model.cond_ids, ids)
    assert "cond_ids" not in model.state_dict()


def test_ucg_dropout_probability_and_seed():
    batch = {"txt": ["a photo"] * 10000}
    apply_ucg(batch, {"txt": {"p": 0.3, "val": None}}, np.random.RandomState(0))
    dropped = np.array([s == "" for s in batch["txt"]])
    assert abs(dropped.mean() - 0.3) < 0.015   # 3 sigma
    rng = np.random.RandomState(0)   # same draws: one choice per item, in order
    assert dropped.tolist() == [bool(rng.choice(2, p=[0.7, 0.3])) for _ in range(10000)]
    labels = {"cls": torch.arange(10)}
    apply_ucg(labels, {"cls": {"p": 1.0, "val": 1000}}, np.random.RandomState(1))
    assert labels["cls"].tolist() == [1000] * 10


def test_training_step_applies_ucg(monkeypatch):
    model = _ddpm(ucg_training={"txt": {"p": 0.5, "val": ""}})
    model.ucg_prng = np.random.RandomState(0)
    seen = {}
    monkeypatch.setattr(model, "shared_step", lambda b: (seen.setdefault("txt", list(b["txt"])) and torch.zeros(()), {}))
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)
    model.training_step({"image": torch.zeros(8, 4, 4, 3), "txt": ["x"] * 8}, 0)
    rng = np.random.RandomState(0)
    assert seen["txt"] == ["" if rng.choice(2, p=[0.5, 0.5]) else "x" for _ in range(8)]


# ----------------------------------------------------------------------------------------
# LatentDiffusion: stages, inputs, scale_by_std
# ----------------------------------------------------------------------------------------
def test_first_stage_frozen_and_sentinels():
    model = _ldm(cond_stage_config="__is_first_stage__", conditioning_key="concat", cond_stage_key="image",
                 unet_out=3)
    fs = model.first_stage_model
    assert model.cond_stage_model is fs
    assert not any(p.requires_grad for p in fs.parameters())
    model.train()
    assert not fs.training   # train() disabled on the frozen stage
    keys = model.state_dict().keys()
    assert "first_stage_model.p" in keys and "cond_stage_model.p" in keys
    uncond = _ldm()
    assert uncond.model.conditioning_key is None and uncond.cond_stage_model is None


def test_scale_factor_attribute_or_buffer():
    assert "scale_factor" not in _ldm(scale_factor=0.5).state_dict()
    sd = _ldm(scale_by_std=True).state_dict()
    assert sd["scale_factor"].shape == () and sd["scale_factor"].dtype == torch.float32


def test_scale_by_std_sets_inverse_std_of_first_batch():
    model = _ldm(scale_by_std=True)
    batch = {"image": _images(4, 8)}
    x = batch["image"].permute(0, 3, 1, 2)
    expected = 1.0 / (3 * F.avg_pool2d(x, 2)).flatten().std()
    model.on_train_batch_start(batch, 0)
    assert torch.allclose(model.scale_factor, expected)
    z, _ = model.get_input(batch, "image")
    assert float(z.flatten().std()) == pytest.approx(1.0, rel=1e-5)
    # later batches do not change it, nor does a model restored from a checkpoint
    model.on_train_batch_start({"image": 5 * _images(4, 8, seed=1)}, 1)
    assert torch.allclose(model.scale_factor, expected)
    restored = _ldm(scale_by_std=True)
    restored.restarted_from_ckpt = True
    restored.on_train_batch_start(batch, 0)
    assert float(restored.scale_factor) == 1.0


def test_get_input_caption_and_trainable_cond():
    model = _ldm(cond_stage_config=_cfg(f"{HERE}.TextEncoder"), conditioning_key="crossattn",
                 cond_stage_key="caption", scale_factor=0.5)
    batch = {"image": _images(), "caption": ["ab", "abcd"]}
    z, c, x, xrec, xc = model.get_input(batch, "image", return_first_stage_outputs=True, return_original_cond=True)
    assert torch.allclose(z, 0.5 * 3 * F.avg_pool2d(batch["image"].permute(0, 3, 1, 2), 2))
    assert xc == ["ab", "abcd"] and c.shape == (2, 2, 4) and float(c[1, 0, 0]) == 4.0
    assert torch.allclose(xrec, model.decode_first_stage(z))
    assert not model.cond_stage_model.training   # frozen cond stage
    trainable = _ldm(cond_stage_config=_cfg(f"{HERE}.TextEncoder"), conditioning_key="crossattn",
                     cond_stage_key="caption", cond_stage_trainable=True)
    _, c_raw = trainable.get_input(batch, "image")
    assert c_raw == ["ab", "abcd"]   # encoded later, in forward
    _, c_enc = trainable.get_input(batch, "image", force_c_encode=True, bs=1)
    assert c_enc.shape == (1, 2, 4)
    loss, d = trainable(z, c_raw)
    assert trainable.cond_stage_model.seen == ["ab", "abcd"] and "train/loss" in d
    assert any(p is trainable.cond_stage_model.scale for p in trainable.trainable_parameters())


def test_get_input_spatial_cond_key_and_concat():
    model = _ldm(cond_stage_config="__is_first_stage__", conditioning_key="concat", cond_stage_key="LR_image")
    batch = {"image": _images(), "LR_image": _images(seed=3)}
    z, c = model.get_input(batch, "image")
    assert c.shape == z.shape   # the LR image encoded by the first stage
    t = torch.tensor([3, 7])
    out = model.apply_model(z, t, c)
    assert torch.allclose(out, 2 * z + c.sum(1, keepdim=True))


def test_apply_model_tiled_equals_untiled():
    model = _ldm(cond_stage_config="__is_first_stage__", conditioning_key="concat", cond_stage_key="LR_image")
    g = torch.Generator().manual_seed(4)
    z, c = torch.randn(2, 3, 12, 12, generator=g), torch.randn(2, 3, 12, 12, generator=g)
    t = torch.tensor([1, 2])
    full = model.apply_model(z, t, c)
    model.split_input_params = dict(ks=(8, 8), stride=(4, 4), vqf=2, patch_distributed_vq=True,
                                    clip_min_weight=0.01, clip_max_weight=0.5, tie_braker=False,
                                    clip_min_tie_weight=0.01, clip_max_tie_weight=0.5)
    assert torch.allclose(model.apply_model(z, t, c), full, atol=1e-5)
    x = torch.randn(2, 3, 24, 24, generator=g)
    enc = model.encode_first_stage(x)
    assert torch.allclose(enc, 3 * F.avg_pool2d(x, 2), atol=1e-5)
    assert tuple(model.split_input_params["original_image_size"]) == (24, 24)
    assert torch.allclose(model.decode_first_stage(enc), F.interpolate(F.avg_pool2d(x, 2), scale_factor=2), atol=1e-5)


# ----------------------------------------------------------------------------------------
# EMA, validation, optimizers, checkpoints
# ----------------------------------------------------------------------------------------
def test_ema_scope_and_validation_logs(monkeypatch):
    model = _ddpm(use_ema=True)
    assert "model_ema.diffusion_modelw" in model.state_dict()
    with torch.no_grad():
        model.model.diffusion_model.w.fill_(5.0)
    with model.ema_scope("test"):
        assert float(model.model.diffusion_model.w) == 2.0   # the EMA still holds the initial value
    assert float(model.model.diffusion_model.w) == 5.0
    model.on_train_batch_end(None, None, 0)
    assert 2.0 < float(model.model_ema.diffusion_modelw) < 5.0
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda d, **k: logged.update(d))
    model.eval()
    model.validation_step({"image": _images(2, 4)}, 0)
    assert {"val/loss_simple", "val/loss", "val/loss_simple_ema", "val/loss_ema"} <= set(logged)


def test_configure_optimizers_with_lambda_scheduler():
    sched = _cfg("ldm.lr_scheduler.LambdaLinearScheduler", warm_up_steps=[10], cycle_lengths=[10000000000000],
                 f_start=[1e-6], f_max=[1.0], f_min=[1.0])
    model = _ddpm(scheduler_config=sched, learn_logvar=True)
    model.learning_rate = 0.5
    [opt], [s] = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and s["interval"] == "step"
    assert any(p is model.logvar for g in opt.param_groups for p in g["params"])
    for _ in range(5):
        opt.step()
        s["scheduler"].step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * ((1 - 1e-6) / 10 * 5 + 1e-6))
    plain = _ddpm()
    plain.learning_rate = 1e-3
    assert isinstance(plain.configure_optimizers(), torch.optim.AdamW)


def test_init_from_ckpt_strict(tmp_path):
    src = _ddpm(use_ema=True)
    with torch.no_grad():
        src.model.diffusion_model.w.fill_(7.0)
        src.model_ema.diffusion_modelw.fill_(6.0)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": src.state_dict(), "global_step": 3}, path)
    loaded = _ddpm(use_ema=True, ckpt_path=str(path))
    assert float(loaded.model.diffusion_model.w) == 7.0 and float(loaded.model_ema.diffusion_modelw) == 6.0
    # a checkpoint without EMA weights: the EMA starts from the loaded weights, not the random init
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("model_ema")}, tmp_path / "noema.pt")
    assert float(_ddpm(use_ema=True, ckpt_path=str(tmp_path / "noema.pt")).model_ema.diffusion_modelw) == 7.0
    # unknown keys are an error naming them, unless ignored
    torch.save(dict(src.state_dict(), **{"extra.weight": torch.zeros(2)}), tmp_path / "extra.pt")
    with pytest.raises(Exception, match="extra"):
        _ddpm(use_ema=True, ckpt_path=str(tmp_path / "extra.pt"))
    _ddpm(use_ema=True, ckpt_path=str(tmp_path / "extra.pt"), ignore_keys=["extra."])
    # load_only_unet takes the DiffusionWrapper's part of a full checkpoint
    only = _ddpm(ckpt_path=str(path), load_only_unet=True)
    assert float(only.model.diffusion_model.w) == 7.0
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        _ddpm(ckpt_path=str(tmp_path / "missing.ckpt"))


# ----------------------------------------------------------------------------------------
# Sampling entry points and logs
# ----------------------------------------------------------------------------------------
def test_ddpm_sample_draws_and_intermediates(monkeypatch):
    model = _ddpm()
    calls = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a) or real(*a, **k))
    img, inter = model.sample(batch_size=2, return_intermediates=True)
    assert img.shape == (2, 3, 4, 4)
    assert len(calls) == 1 + 10   # x_T, then one noise draw per step (also at t = 0, where it is masked)
    assert len(inter) == 1 + 3    # x_T, then t = 9, 5, 0


def test_ldm_sampling_entry_points():
    model = _ldm(cond_stage_config=_cfg(f"{HERE}.TextEncoder"), conditioning_key="crossattn",
                 cond_stage_key="caption")
    c = model.get_learned_conditioning(["a", "bb", "ccc"])
    img, inter = model.sample(c, batch_size=2, return_intermediates=True)
    assert img.shape == (2, 3, 4, 4) and len(inter) == 1 + 5   # x_T, t = 19, 15, 10, 5, 0
    img, x0s = model.progressive_denoising(c, shape=(3, 4, 4), batch_size=2)
    assert len(x0s) == 5 and x0s[0].shape == (2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    x0 = torch.randn(2, 3, 4, 4)
    mask[..., :2] = 1.0
    out = model.sample(c, batch_size=2, mask=mask, x0=x0)
    assert out.shape == (2, 3, 4, 4)
    uc = model.get_unconditional_conditioning(2, [""])
    assert uc.shape == (2, 2, 4) and float(uc.abs().max()) == 0.0


def test_low_scale_model_buffers_and_noise():
    from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
    m = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 2e-2}, max_noise_level=350)
    assert list(m.state_dict()) == ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"]
    x = torch.ones(64, 3, 2, 2)
    torch.manual_seed(0)
    z, level = m(x)
    assert level.dtype == torch.long and 0 <= int(level.min()) and int(level.max()) < 350
    z2, _ = m(x, noise_level=torch.zeros(64, dtype=torch.long))
    assert z2.shape == x.shape


def test_log_images_keys():
    ddpm = _ddpm()
    log = ddpm.log_images({"image": _images(3, 4)}, N=2, n_row=2)
    assert set(log) == {"inputs", "diffusion_row", "samples", "denoise_row"}
    assert log["samples"].shape == (2, 3, 4, 4)
    ldm = _ldm(cond_stage_config=_cfg(f"{HERE}.TextEncoder"), conditioning_key="crossattn", cond_stage_key="caption")
    batch = {"image": _images(2, 8), "caption": ["a cat", "a dog"]}
    log = ldm.log_images(batch, N=2, ddim_steps=None, plot_denoise_rows=True, unconditional_guidance_scale=1.0)
    assert {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples", "denoise_row",
            "samples_inpainting", "mask", "samples_outpainting", "progressive_row"} <= set(log)
    assert log["conditioning"].shape == (2, 3, 8, 8) and log["samples"].shape == (2, 3, 8, 8)
    # DDIM (the sampling adapter) with classifier-free guidance
    log = ldm.log_images(batch, N=2, ddim_steps=4, ddim_eta=0.0, inpaint=False, plot_progressive_rows=False,
                         plot_denoise_rows=True, unconditional_guidance_scale=2.0, unconditional_guidance_label=[""],
                         return_keys=["samples", "samples_cfg_scale_2.00", "denoise_row"])
    assert set(log) == {"samples", "samples_cfg_scale_2.00", "denoise_row"}
    assert log["samples_cfg_scale_2.00"].shape == (2, 3, 8, 8)


def test_frozen_stage_survives_pickle_and_deepcopy():
    import copy
    import pickle
    model = _ldm(cond_stage_config="__is_first_stage__", conditioning_key="concat", cond_stage_key="image")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert clone.training and not clone.first_stage_model.training
        assert clone.cond_stage_model is clone.first_stage_model
        assert clone.first_stage_model.train() is clone.first_stage_model


def test_sd2_variants_inputs_losses_and_logs():
    low = _cfg("ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
               noise_schedule_config={"linear_start": 1e-4, "linear_end": 2e-2}, max_noise_level=350)
    up = instantiate_from_config(_cfg(
        "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", low_scale_config=low, low_scale_key="lr",
        first_stage_config=_cfg(f"{HERE}.FakeFirstStage"), cond_stage_config=_cfg(f"{HERE}.TextEncoder"),
        unet_config=_cfg(f"{HERE}.PointNet", out=3), conditioning_key="hybrid-adm", cond_stage_key="txt",
        timesteps=20, image_size=4, channels=3, use_ema=False, first_stage_key="jpg", parameterization="v",
        log_every_t=10))
    assert not up.low_scale_model.training and "low_scale_model.betas" in up.state_dict()
    batch = {"jpg": _images(2, 8), "lr": _images(2, 4, seed=5), "txt": ["a", "bb"]}
    z, c = up.get_input(batch, "jpg")
    assert set(c) == {"c_concat", "c_crossattn", "c_adm"} and c["c_adm"].dtype == torch.long
    assert c["c_concat"][0].shape == z.shape
    loss, d = up.shared_step(batch)
    assert torch.isfinite(loss) and "train/loss_simple" in d
    log = up.log_images(batch, N=2, ddim_steps=2, plot_progressive_rows=False, unconditional_guidance_scale=2.0,
                        unconditional_guidance_label=[""])
    assert {"inputs", "x_lr", "samples", "samples_cfg_scale_2.00", "diffusion_row"} <= set(log)

    inp = instantiate_from_config(_cfg(
        "ldm.models.diffusion.ddpm.LatentInpaintDiffusion", concat_keys=["masked_image", "mask"],
        masked_image_key="masked_image", finetune_keys=None,
        first_stage_config=_cfg(f"{HERE}.FakeFirstStage"), cond_stage_config=_cfg(f"{HERE}.TextEncoder"),
        unet_config=_cfg(f"{HERE}.PointNet", out=3), conditioning_key="hybrid", cond_stage_key="txt",
        timesteps=20, image_size=4, channels=3, use_ema=False, first_stage_key="jpg", log_every_t=10))
    mask = torch.zeros(2, 8, 8, 1)
    mask[:, 2:6, 2:6] = 1.0
    batch = {"jpg": _images(2, 8), "masked_image": _images(2, 8) * (1 - mask), "mask": mask, "txt": ["a", "b"]}
    z, c = inp.get_input(batch, "jpg")
    cat = c["c_concat"][0]
    assert cat.shape == (2, 4, 4, 4)   # encoded masked image (3) + mask at latent size (1)
    assert torch.allclose(cat[:, 3], F.interpolate(mask.permute(0, 3, 1, 2), size=(4, 4))[:, 0])
    assert torch.isfinite(inp.shared_step(batch)[0])
    log = inp.log_images(batch, N=2, ddim_steps=2)
    assert {"inputs", "samples", "masked_image"} <= set(log)


def test_finetune_keys_extend_input_channels():
    from ldm.models.diffusion.ddpm import LatentFinetuneDiffusion
    model = _ldm(cond_stage_config="__is_first_stage__", conditioning_key="concat", cond_stage_key="image")
    model.finetune_keys, model.keep_dims = ("model.diffusion_model.extra",), 4
    model.model.diffusion_model.register_buffer("extra", torch.ones(4, 6))   # the new, wider input weight
    w = torch.randn(4, 4)                                                     # the checkpoint's
    out = LatentFinetuneDiffusion._prepare_checkpoint(model, {"model.diffusion_model.extra": w})
    out = out["model.diffusion_model.extra"]
    # the checkpoint's channels are kept, the new ones start at zero
    assert out.shape == (4, 6) and torch.equal(out[:, :4], w) and float(out[:, 4:].abs().sum()) == 0.0
