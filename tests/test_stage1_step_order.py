"""The first-stage training step, pinned against the original's step order.

The original (latent-diffusion on Lightning 1.x, automatic optimisation with two optimizers) ran,
per batch and per optimizer i in (autoencoder, discriminator): toggle the optimizer's
parameters on (all others off), call `training_step(batch, i)` -- a *fresh* forward, then
`loss(..., optimizer_idx=i, global_step)` --, backward, step; LR schedulers stepped once per
batch afterwards; and Lightning 1.x's `model.train()` had put LPIPS (built `.eval()`) into train
mode, so its dropout was active. `original_steps` below replays exactly that with plain torch on
a copy of the model; the test trains ours through a real Lightning Trainer from the same weights
and seed and compares the losses of both optimizers at every step and every parameter after.
(The golden fixtures pin the loss functions and the forward passes; this pins the step.)
"""
from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AutoencoderKL, VQModel

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SEED = 1234
LR = 2e-3
N_STEPS = 2
DD = dict(double_z=True, z_channels=2, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)


class Images(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 16, 16, 3, generator=g) * 2 - 1      # channels-last, as the datasets yield

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i]}


class QuarterLR:
    """Scheduler target: LR multiplier 1 / (1 + 3 n), so a missed or extra scheduler step shows."""

    def schedule(self, n: int) -> float:
        return 1.0 / (1.0 + 3.0 * n)


def kl_model(**kw) -> AutoencoderKL:
    loss = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": dict(disc_start=0, kl_weight=1e-2, disc_weight=0.5, disc_num_layers=2,
                           perceptual_weight=1.0, perceptual_weights="random",
                           **kw.pop("loss_kw", {}))}
    torch.manual_seed(0)
    return AutoencoderKL(DD, loss, embed_dim=2, **kw)


def vq_model(**kw) -> VQModel:
    loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": dict(disc_start=1, codebook_weight=1.0, disc_num_layers=2, disc_ndf=16,
                           perceptual_weight=1.0, perceptual_weights="random", n_classes=16,
                           **kw.pop("loss_kw", {}))}
    torch.manual_seed(0)
    return VQModel(dict(DD, double_z=False), loss, n_embed=16, embed_dim=2, lr_g_factor=0.5,
                   scheduler_config={"target": f"{__name__}.QuarterLR"}, **kw)


def record_losses(model) -> list:
    """[(optimizer_idx, global_step, loss)] of every call of model.loss (a forward hook)."""
    calls = []

    def hook(_module, args, output):
        calls.append((int(args[3]), int(args[4]), float(output[0].detach())))
    model.loss.register_forward_hook(hook)
    return calls


def batches(n: int) -> list[dict]:
    return list(DataLoader(Images(2 * n), batch_size=2))


# ---------------------------------------------------------------- the original's order, by hand
def original_steps(model, n_steps: int) -> list:
    """Lightning 1.x automatic optimisation of the original autoencoders, written out."""
    calls = record_losses(model)
    vq = isinstance(model, VQModel)
    ae_params = [*model.encoder.parameters(), *model.decoder.parameters(), *model.quant_conv.parameters(),
                 *model.post_quant_conv.parameters()]
    if vq:
        ae_params += list(model.quantize.parameters())
    d_params = list(model.loss.discriminator.parameters())
    lr_ae = 0.5 * LR if vq else LR                                   # VQModel: lr_g_factor * lr
    opts = [torch.optim.Adam(ae_params, lr=lr_ae, betas=(0.5, 0.9)),
            torch.optim.Adam(d_params, lr=LR, betas=(0.5, 0.9))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, QuarterLR().schedule) for o in opts] if vq else []
    model.train()                                                    # Lightning 1.x: LPIPS dropout on
    data = batches(n_steps)                      # (iterating a DataLoader draws from the global RNG)
    torch.manual_seed(SEED)
    for step, batch in enumerate(data):
        for idx, opt in enumerate(opts):
            mine = {id(p) for g in opt.param_groups for p in g["params"]}
            saved = {p: p.requires_grad for p in ae_params + d_params}
            for p in ae_params + d_params:                           # toggle_optimizer
                p.requires_grad = id(p) in mine and saved[p]
            # training_step(batch, idx): get_input (channels-first, contiguous), then a fresh forward
            x = batch["image"].permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()
            if vq:
                xrec, qloss, ind = model(x, return_pred_indices=True)
                loss, _ = model.loss(qloss, x, xrec, idx, step, last_layer=model.decoder.conv_out.weight,
                                     split="train", predicted_indices=ind)
            else:
                xrec, posterior = model(x)
                loss, _ = model.loss(x, xrec, posterior, idx, step, last_layer=model.decoder.conv_out.weight,
                                     split="train")
            opt.zero_grad()
            loss.backward()
            opt.step()
            for p, r in saved.items():                               # untoggle_optimizer
                p.requires_grad = r
        for s in scheds:                                             # interval "step": once per batch
            s.step()
    return calls


# ---------------------------------------------------------------- ours, through Lightning
class SeedAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        torch.manual_seed(SEED)


def our_steps(model, n_steps: int) -> list:
    calls = record_losses(model)
    model.learning_rate = LR
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=n_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[SeedAtStart()])
    loader = DataLoader(Images(2 * n_steps), batch_size=2, generator=torch.Generator().manual_seed(0))
    trainer.fit(model, loader)
    assert trainer.global_step == n_steps
    return calls


@functools.lru_cache(maxsize=None)
def reference(make) -> tuple[list, dict]:
    """(loss calls, state dict after N_STEPS) of the original's order, from make()'s initial weights."""
    ref = make()
    calls = original_steps(ref, N_STEPS)
    return calls, {k: v.detach().clone() for k, v in ref.state_dict().items()}


def compare(make, **kw):
    ours = make(**kw)
    assert all(torch.equal(a, b) for a, b in zip(make().state_dict().values(), ours.state_dict().values()))
    ref_calls, ref_sd = reference(make)
    our_calls = our_steps(ours, N_STEPS)
    max_diff = max(float((ref_sd[k] - v).abs().max()) for k, v in ours.state_dict().items() if v.is_floating_point())
    return ref_calls, our_calls, max_diff


def report(name: str, ref_calls, our_calls, max_diff) -> None:
    for (i, s, r), (_, _, o) in zip(ref_calls, our_calls):
        print(f"{name} step {s} {'autoencoder  ' if i == 0 else 'discriminator'} "
              f"original order {r:.7f}  ours {o:.7f}  |diff| {abs(r - o):.1e}")
    print(f"{name} max |parameter difference| after {N_STEPS} steps: {max_diff:.2e}")


@pytest.mark.parametrize("name,make", [("KL", kl_model), ("VQ", vq_model)])
def test_training_steps_match_the_originals_order(name, make) -> None:
    ref_calls, our_calls, max_diff = compare(make)
    report(name, ref_calls, our_calls, max_diff)
    # two loss calls per step, (autoencoder, discriminator), both at the step's global_step
    assert [(i, s) for i, s, _ in our_calls] == [(i, s) for s in range(N_STEPS) for i in (0, 1)]
    assert [(i, s) for i, s, _ in ref_calls] == [(i, s) for i, s, _ in our_calls]
    for (_, _, r), (_, _, o) in zip(ref_calls, our_calls):
        assert o == pytest.approx(r, rel=1e-5, abs=1e-6)
    assert max_diff < 1e-6
    assert all(v != 0.0 for _, _, v in ref_calls[-2:])          # the adversarial losses are on at the last step


@pytest.mark.parametrize("name,make", [("KL", kl_model), ("VQ", vq_model)])
def test_the_variants_are_not_the_original(name, make) -> None:
    """The test above would catch the one-forward order and LPIPS in eval: both change the numbers."""
    ref_calls, reuse_calls, reuse_diff = compare(make, reuse_forward_for_disc=True)
    report(f"{name} (reuse_forward_for_disc)", ref_calls, reuse_calls, reuse_diff)
    # same generator loss at step 0, different discriminator losses (they saw pre-update reconstructions)
    assert reuse_calls[0][2] == pytest.approx(ref_calls[0][2], rel=1e-6)
    assert abs(reuse_calls[1][2] - ref_calls[1][2]) > 1e-6 or name == "VQ"   # VQ: disc_start=1, d_loss 0 at step 0
    assert abs(reuse_calls[3][2] - ref_calls[3][2]) > 1e-6
    assert reuse_diff > 1e-6
    ref_calls, eval_calls, eval_diff = compare(make, loss_kw={"perceptual_dropout": False})
    report(f"{name} (perceptual_dropout: false)", ref_calls, eval_calls, eval_diff)
    assert abs(eval_calls[0][2] - ref_calls[0][2]) > 1e-4          # LPIPS without dropout: step 0 already differs


def test_lpips_mode_in_training_and_validation() -> None:
    """Dropout on in training, off in validation (Lightning's eval), and the eval-mode switch; the
    VGG trunk stays frozen either way."""
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *a) -> None:
            seen.append(("train", pl_module.loss.perceptual_loss.training))

        def on_validation_batch_start(self, trainer, pl_module, *a) -> None:
            seen.append(("val", pl_module.loss.perceptual_loss.training))

    for dropout in (True, False):
        seen.clear()
        model = kl_model(loss_kw={"perceptual_dropout": dropout})
        model.learning_rate = LR
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=1, limit_val_batches=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=1, callbacks=[Probe()])
        trainer.fit(model, DataLoader(Images(2), batch_size=1), DataLoader(Images(1), batch_size=1))
        assert ("val", False) in seen and ("val", True) not in seen
        assert {m for s, m in seen if s == "train"} == {dropout}
        assert not any(p.requires_grad for p in model.loss.perceptual_loss.parameters())
        assert all(p.grad is None for p in model.loss.perceptual_loss.parameters())
