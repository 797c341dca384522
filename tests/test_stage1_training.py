"""First-stage training mechanics: Lightning 2 manual optimisation with two optimizers, the
global_step count, gradient accumulation, LR schedulers, and strict checkpoint loading."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface

# Lightning's advice (no logger configured, modules in eval mode, ...) is noise here
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DD = dict(double_z=True, z_channels=2, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def kl_loss_cfg(**kw):
    params = dict(disc_start=0, kl_weight=1e-6, disc_weight=0.5, disc_num_layers=1,
                  perceptual_weights="random", **kw)
    return {"target": "ldm.modules.losses.LPIPSWithDiscriminator", "params": params}


def vq_loss_cfg():
    return {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": dict(disc_start=0, disc_num_layers=1, disc_ndf=16, perceptual_weights="random",
                           n_classes=16)}


class Images(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 32, 32, 3, generator=g) * 2 - 1      # channels-last, as the datasets yield

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i]}


def fit(model: pl.LightningModule, n_batches: int, **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, **trainer_kw)
    trainer.fit(model, DataLoader(Images(2 * n_batches), batch_size=2))
    return trainer


def adam_steps(opt: torch.optim.Optimizer) -> set[int]:
    return {int(s["step"]) for s in opt.state.values()}


def test_kl_two_batches_step_both_optimizers_once_each() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(DD, kl_loss_cfg(), embed_dim=2)
    model.learning_rate = 1e-3
    enc0 = model.encoder.conv_in.weight.detach().clone()
    disc0 = model.loss.discriminator.main[0].weight.detach().clone()
    logvar0 = model.loss.logvar.detach().clone()
    trainer = fit(model, n_batches=2)
    assert trainer.global_step == 2                      # once per batch, not once per optimizer
    opt_ae, opt_disc = trainer.optimizers
    assert adam_steps(opt_ae) == {2} and adam_steps(opt_disc) == {2}
    assert opt_ae.param_groups[0]["lr"] == 1e-3 and opt_ae.param_groups[0]["betas"] == (0.5, 0.9)
    assert not torch.equal(enc0, model.encoder.conv_in.weight)
    assert not torch.equal(disc0, model.loss.discriminator.main[0].weight)
    assert torch.equal(logvar0, model.loss.logvar)       # not optimised unless learn_logvar (as the original)
    logged = trainer.callback_metrics
    for key in ("train/aeloss", "train/discloss", "train/rec_loss", "train/kl_loss", "train/d_weight",
                "train/disc_loss", "train/logits_real"):
        assert key in logged, key


def test_kl_gradient_accumulation_steps_every_n_batches() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(DD, kl_loss_cfg(), embed_dim=2, accumulate_grad_batches=2,
                          scheduler_config={"target": f"{__name__}.HalfLR"})
    model.learning_rate = 1e-3
    trainer = fit(model, n_batches=4)
    opt_ae, opt_disc = trainer.optimizers
    assert trainer.global_step == 2
    assert adam_steps(opt_ae) == {2} and adam_steps(opt_disc) == {2}
    # LambdaLR stepped once per update: lr = 1e-3 * 0.5 ** 2
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(2.5e-4)


class HalfLR:
    """A scheduler config target: LR multiplier 0.5 ** step."""

    def schedule(self, n: int) -> float:
        return 0.5 ** n


def test_vq_training_step_and_lr_factor() -> None:
    torch.manual_seed(0)
    dd = dict(DD, double_z=False)
    model = VQModel(dd, vq_loss_cfg(), n_embed=16, embed_dim=2, lr_g_factor=0.5)
    model.learning_rate = 1e-3
    cb0 = model.quantize.embedding.weight.detach().clone()
    trainer = fit(model, n_batches=1)
    opt_ae, opt_disc = trainer.optimizers
    assert trainer.global_step == 1
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(5e-4) and opt_disc.param_groups[0]["lr"] == 1e-3
    assert not torch.equal(cb0, model.quantize.embedding.weight)   # codebook is in the autoencoder optimizer
    assert "train/perplexity" in trainer.callback_metrics


def test_validation_logs_rec_loss() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(DD, kl_loss_cfg(), embed_dim=2, monitor="val/rec_loss")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (res,) = trainer.validate(model, DataLoader(Images(2), batch_size=2), verbose=False)
    assert {"val/rec_loss", "val/aeloss", "val/disc_loss"} <= set(res)
    assert res["val/d_weight"] == 0.0                    # no autograd in validation: the adaptive weight is 0


def test_log_images_keys_and_shapes() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=2)
    log = model.log_images({"image": Images(2).x})
    assert set(log) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (2, 3, 32, 32) for v in log.values())


def test_init_from_ckpt_strict_with_benign_loss_keys(tmp_path) -> None:
    torch.manual_seed(0)
    trained = AutoencoderKL(DD, kl_loss_cfg(), embed_dim=2)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": trained.state_dict(), "global_step": 3}, path)
    # inference build (no loss): the checkpoint's loss.* keys are benign surplus
    model = AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=2, ckpt_path=str(path))
    assert torch.equal(model.decoder.conv_out.weight, trained.decoder.conv_out.weight)
    # a checkpoint that misses real weights is an error naming them ...
    sd = trained.state_dict()
    del sd["decoder.conv_out.bias"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(RuntimeError, match=r"decoder\.conv_out\.\* \(1 key\): bias"):
        AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=2, ckpt_path=str(path))
    # ... unless dropped on purpose
    AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=2, ckpt_path=str(path),
                  ignore_keys=["decoder.conv_out"])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        AutoencoderKL(DD, {"target": "torch.nn.Identity"}, embed_dim=2, ckpt_path=str(tmp_path / "nope.ckpt"))


def test_vq_interface_and_decode_code() -> None:
    torch.manual_seed(0)
    dd = dict(DD, double_z=False)
    vq = VQModelInterface(embed_dim=2, ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, n_embed=16)
    x = torch.randn(1, 3, 32, 32)
    h = vq.encode(x)                                      # pre-quantisation latent
    quant, _, (_, _, ind) = vq.quantize(h)
    assert torch.allclose(vq.decode(h), vq.decoder(vq.post_quant_conv(quant)))
    assert torch.allclose(vq.decode_code(ind.reshape(1, 16, 16)), vq.decode(h), atol=1e-5)
    ident = IdentityFirstStage(vq_interface=True)
    assert ident.encode(x) is x and ident.quantize(x)[0] is x
