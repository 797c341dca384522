"""PatchGAN discriminator (pix2pix, Isola et al. 2017) as taming-transformers' `NLayerDiscriminator`,
the GAN losses and the warm-up gate shared by the first-stage losses.

Keys: `main.<i>.weight/bias` of one `nn.Sequential` (conv, LeakyReLU, then per layer
conv / norm / LeakyReLU, and a final 1-channel conv), BatchNorm buffers included.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def weights_init(m: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch (Glow)."""

    def __init__(self, num_features: int, logdet: bool = False, affine: bool = True, allow_reverse_init: bool = False):
        # num_features: channels; logdet: also return the log-determinant; affine must be True
        # allow_reverse_init: allow data-dependent init from the reverse pass
        assert affine
        super().__init__()
        self.logdet = logdet
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.allow_reverse_init = allow_reverse_init
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, input: torch.Tensor) -> None:
        flat = input.transpose(0, 1).reshape(input.shape[1], -1)
        self.loc.data.copy_(-flat.mean(1)[None, :, None, None])
        self.scale.data.copy_(1 / (flat.std(1)[None, :, None, None] + 1e-6))

    def forward(self, input: torch.Tensor, reverse: bool = False):
        if reverse:
            return self.reverse(input)
        squeeze = input.ndim == 2
        if squeeze:
            input = input[:, :, None, None]
        if self.training and int(self.initialized.item()) == 0:
            self.initialize(input)
            self.initialized.fill_(1)
        h = self.scale * (input + self.loc)
        if squeeze:
            h = h.squeeze(-1).squeeze(-1)
        if self.logdet:
            logdet = input.shape[2] * input.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
            return h, logdet * torch.ones(input.shape[0]).to(input)
        return h

    def reverse(self, output: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.initialized.item()) == 0:
            if not self.allow_reverse_init:
                raise RuntimeError("Initializing ActNorm in reverse direction is disabled by default. "
                                   "Use allow_reverse_init=True to enable.")
            self.initialize(output)
            self.initialized.fill_(1)
        squeeze = output.ndim == 2
        if squeeze:
            output = output[:, :, None, None]
        h = output / self.scale - self.loc
        return h.squeeze(-1).squeeze(-1) if squeeze else h


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, input_nc, H, W) -> (B, 1, h, w) real/fake logits."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        # input_nc: input channels; ndf: filters of the first conv (doubled per layer, capped at 8x)
        # n_layers: stride-2 conv layers after the first; use_actnorm: ActNorm instead of BatchNorm
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = norm_layer is not nn.BatchNorm2d    # BatchNorm has its own affine shift
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
                                nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_prev, nf_mult = nf_mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * nf_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias),
                    norm_layer(ndf * nf_mult), nn.LeakyReLU(0.2, True)]
        nf_prev, nf_mult = nf_mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * nf_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias),
                norm_layer(ndf * nf_mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*seq)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before `threshold` steps, `weight` from then on (the discriminator's warm-up gate)."""
    return value if global_step < threshold else weight


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        disc_weight: Union[float, torch.Tensor]) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021, Eq. 7): ||grad nll|| / (||grad g|| + 1e-4) w.r.t. the decoder's
    last layer, clamped to [0, 1e4], detached, times `disc_weight`."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


class PatchGANLoss(nn.Module):
    """The adversarial half shared by the first-stage losses (KL and VQ): a PatchGAN discriminator,
    a hinge/vanilla discriminator loss gated by `disc_start`, and the adaptive generator weight.
    Subclasses call `_init_perceptual` first and then `_init_gan` (the state-dict order is
    `perceptual_loss.*` then `discriminator.*`, as the original).

    Mode of the perceptual network: built in eval (as the original), it follows the loss's
    `train()`/`eval()` like any submodule, so its dropout is active in training as it was when
    Lightning 1.x called `model.train()`; `perceptual_dropout=False` keeps it in eval always."""

    def _init_perceptual(self, perceptual_weights: str, perceptual_dropout: bool) -> None:
        self.perceptual_loss = build_perceptual_loss(perceptual_weights)
        self.perceptual_dropout = bool(perceptual_dropout)

    def train(self, mode: bool = True) -> "PatchGANLoss":
        super().train(mode)
        if not self.perceptual_dropout:
            self.perceptual_loss.eval()
        return self

    def _init_gan(self, disc_start: int, disc_num_layers: int, disc_in_channels: int, disc_factor: float,
                  disc_weight: float, use_actnorm: bool, disc_conditional: bool, disc_loss: str,
                  disc_ndf: int = 64) -> None:
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"Unknown GAN loss '{disc_loss}': expected 'hinge' or 'vanilla'")
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm, ndf=disc_ndf).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor | None = None) -> torch.Tensor:
        """Adaptive weight of the generator loss; 0 where no gradient exists (evaluation without autograd)."""
        if last_layer is None:
            raise ValueError("calculate_adaptive_weight needs `last_layer` (the decoder's last weight)")
        if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
            if self.training:
                raise RuntimeError("the adaptive GAN weight needs gradients of the losses w.r.t. `last_layer` "
                                   "in training mode (is autograd disabled?)")
            return torch.tensor(0.0, device=nll_loss.device)
        return adaptive_gan_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)

    def _logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            assert not self.disc_conditional, "a conditional discriminator needs `cond`"
            return self.discriminator(x.contiguous())
        assert self.disc_conditional, "`cond` given to an unconditional discriminator"
        return self.discriminator(torch.cat((x.contiguous(), cond), dim=1))

    def _generator_adversarial(self, nll_loss: torch.Tensor, reconstructions: torch.Tensor,
                               cond: torch.Tensor | None, global_step: int,
                               last_layer: torch.Tensor | None, need_weight: bool = True):
        """-> (g_loss, d_weight, disc_factor) of the generator update."""
        g_loss = -torch.mean(self._logits(reconstructions, cond))
        if need_weight:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer=last_layer)
        else:
            d_weight = torch.tensor(0.0, device=g_loss.device)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        return g_loss, d_weight, disc_factor

    def _discriminator_step(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                            cond: torch.Tensor | None, global_step: int, split: str):
        """Second pass (optimizer_idx 1): the discriminator's loss on detached real and fake images."""
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log


def build_perceptual_loss(perceptual_weights: str = "pretrained") -> nn.Module:
    """LPIPS in eval mode; `perceptual_weights`: "pretrained" (see ldm.modules.losses.lpips) or "random"."""
    from ldm.modules.losses.lpips import LPIPS
    if perceptual_weights not in ("pretrained", "random"):
        raise ValueError(f"perceptual_weights must be 'pretrained' or 'random', got {perceptual_weights!r}")
    return LPIPS(pretrained=perceptual_weights == "pretrained").eval()
