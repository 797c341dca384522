"""Loss of the VQ autoencoder (VQGAN, Esser et al. 2021, Eq. 4-7) with taming-transformers' semantics,
plus latent-diffusion's extras (`n_classes` perplexity logging, `pixel_loss` "l1"/"l2").

Generator update (optimizer_idx 0), means over all elements:
    nll = mean(pixel(x, x_rec) + perceptual_weight * LPIPS(x, x_rec))
    loss = nll + d_weight * disc_factor * (-mean D(x_rec)) + codebook_weight * mean(codebook_loss)
Discriminator update (optimizer_idx 1): as in contperceptual. `pixelloss_weight` is stored
but does not enter the loss (as in both originals). The released VQ configs name this class
as `taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator` (resolved by ldm.util).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.losses.discriminator import (  # noqa: F401  (the original exported these from here)
    ActNorm, NLayerDiscriminator, PatchGANLoss, adopt_weight, build_perceptual_loss, hinge_d_loss,
    vanilla_d_loss, weights_init)
from ldm.modules.losses.lpips import LPIPS  # noqa: F401


class DummyLoss(nn.Module):
    """A loss with no parameters, for first stages that are never trained (inference configs)."""


def hinge_d_loss_with_exemplar_weights(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                                       weights: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss with one weight per example."""
    assert weights.shape[0] == logits_real.shape[0] == logits_fake.shape[0]
    loss_real = torch.mean(F.relu(1.0 - logits_real), dim=[1, 2, 3])
    loss_fake = torch.mean(F.relu(1.0 + logits_fake), dim=[1, 2, 3])
    loss_real = (weights * loss_real).sum() / weights.sum()
    loss_fake = (weights * loss_fake).sum() / weights.sum()
    return 0.5 * (loss_real + loss_fake)


def measure_perplexity(predicted_indices: torch.Tensor, n_embed: int):
    """-> (perplexity, number of codes used); perplexity == n_embed when all codes are used equally."""
    encodings = F.one_hot(predicted_indices.long(), n_embed).float().reshape(-1, n_embed)
    avg_probs = encodings.mean(0)
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    return perplexity, torch.sum(avg_probs > 0)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.abs(x - y)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.pow(x - y, 2)


class VQLPIPSWithDiscriminator(PatchGANLoss):
    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: Optional[int] = None, perceptual_loss: str = "lpips", pixel_loss: str = "l1",
                 perceptual_weights: str = "pretrained", perceptual_dropout: bool = True):
        # disc_start: global step from which the adversarial terms are switched on
        # codebook_weight: weight of the quantiser loss; pixelloss_weight: kept for compatibility (unused)
        # disc_num_layers / disc_in_channels / disc_ndf: PatchGAN depth, input channels, first width
        # disc_factor: overall factor of both adversarial losses once enabled
        # disc_weight: multiplies the adaptive generator weight; perceptual_weight: LPIPS weight (0: off)
        # use_actnorm: ActNorm instead of BatchNorm; disc_conditional: the discriminator also sees `cond`
        # disc_loss: "hinge" | "vanilla"; n_classes: codebook size, enables perplexity logging
        # perceptual_loss: only "lpips"; pixel_loss: "l1" | "l2"
        # perceptual_weights: "pretrained" | "random" LPIPS weights
        # perceptual_dropout: LPIPS dropout active in training (how the released models were trained,
        #   see ldm.models.autoencoder); false: LPIPS always in eval
        super().__init__()
        if perceptual_loss != "lpips":
            raise ValueError(f"Unknown perceptual loss '{perceptual_loss}': only 'lpips' is implemented")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self._init_perceptual(perceptual_weights, perceptual_dropout)
        self.perceptual_weight = perceptual_weight
        self.pixel_loss = l1 if pixel_loss == "l1" else l2
        self._init_gan(disc_start, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                       use_actnorm, disc_conditional, disc_loss, disc_ndf=disc_ndf)
        self.n_classes = n_classes

    def forward(self, codebook_loss: Optional[torch.Tensor], inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, split: str = "train",
                predicted_indices: Optional[torch.Tensor] = None):
        """-> (loss, log dict)."""
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, cond, global_step, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        if codebook_loss is None:
            codebook_loss = torch.zeros(1, device=inputs.device)

        rec_loss = self.pixel_loss(inputs.contiguous(), reconstructions.contiguous())
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros(1, device=inputs.device)
        nll_loss = torch.mean(rec_loss)

        g_loss, d_weight, disc_factor = self._generator_adversarial(
            nll_loss, reconstructions, cond, global_step, last_layer)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach().mean()}
        if predicted_indices is not None and self.n_classes is not None:
            with torch.no_grad():
                perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_usage
        return loss, log
