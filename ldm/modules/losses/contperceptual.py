"""Loss of the KL-regularised autoencoder (LDM paper, Sec. 3 and App. G): L1 + LPIPS reconstruction
under a learned scalar output log-variance, a small KL term and a PatchGAN adversarial term.

Generator update (optimizer_idx 0), per image (sums over pixels, mean over the batch):
    rec = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)
    nll = rec / exp(logvar) + logvar
    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) + d_weight * disc_factor * (-mean D(x_rec))
with d_weight the adaptive weight (grad-norm ratio at the decoder's last layer, times
disc_weight) and disc_factor = 0 before `disc_start` steps. Discriminator update
(optimizer_idx 1): disc_factor * hinge (or vanilla) loss on D(x) and D(x_rec).

As in the original, `pixelloss_weight` is stored but does not enter the loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ldm.modules.losses.discriminator import (  # noqa: F401  (re-exported as the original's star import did)
    ActNorm, NLayerDiscriminator, PatchGANLoss, adopt_weight, build_perceptual_loss, hinge_d_loss,
    vanilla_d_loss, weights_init)
from ldm.modules.losses.lpips import LPIPS  # noqa: F401
from ldm.modules.losses.vqperceptual import DummyLoss  # noqa: F401  (configs name contperceptual.DummyLoss)


class LPIPSWithDiscriminator(PatchGANLoss):
    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 perceptual_weights: str = "pretrained", perceptual_dropout: bool = True):
        # disc_start: global step from which the adversarial terms are switched on
        # logvar_init: initial value of the learned output log-variance `logvar`
        # kl_weight: weight of the KL term; pixelloss_weight: kept for compatibility (unused, as the original)
        # disc_num_layers / disc_in_channels: PatchGAN depth and input channels
        # disc_factor: overall factor of both adversarial losses once enabled
        # disc_weight: multiplies the adaptive generator weight; perceptual_weight: LPIPS weight (0: off)
        # use_actnorm: ActNorm instead of BatchNorm in the discriminator
        # disc_conditional: the discriminator also sees `cond` (channel-concatenated)
        # disc_loss: "hinge" | "vanilla"; perceptual_weights: "pretrained" | "random" LPIPS weights
        # perceptual_dropout: LPIPS dropout active in training (how the released models were trained,
        #   see ldm.models.autoencoder); false: LPIPS always in eval
        super().__init__()
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self._init_perceptual(perceptual_weights, perceptual_dropout)
        self.perceptual_weight = perceptual_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self._init_gan(disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                       use_actnorm, disc_conditional, disc_loss)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                split: str = "train", weights: Optional[torch.Tensor] = None):
        """-> (loss, log dict); `posteriors` is the encoder's DiagonalGaussianDistribution,
        `weights` optional per-pixel weights of the NLL."""
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, cond, global_step, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")

        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss, d_weight, disc_factor = self._generator_adversarial(
            nll_loss, reconstructions, cond, global_step, last_layer, need_weight=self.disc_factor > 0.0)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
