"""`NoisyLatentImageClassifier` (latent-diffusion): a classifier of noisy latents z_t of a frozen
LatentDiffusion, trained with cross-entropy at random t (Dhariwal & Nichol 2021, in latent space),
and `ClassifierGuidance`, the score corrector that steers DDIM sampling with it:

    eps'(z_t) = eps(z_t) - s * sqrt(1 - abar_t) * grad_z log p(y | z_t)         (classifier guidance)

    sampler.sample(..., score_corrector=ClassifierGuidance(classifier, scale=s), corrector_kwargs={"y": y})

The diffusion model comes from `diffusion_path`: a run folder (its latest configs/*-project.yaml,
as the original) or a config file; `diffusion_ckpt_path` its weights. The classifier network is
an `EncoderUNetModel` (class labels) or a `UNetModel` (segmentation) made from the diffusion
model's UNet parameters, with in_channels = the latent channels and out_channels = num_classes.
"""
from __future__ import annotations

import glob
import logging
import os
from copy import deepcopy
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel, UNetModel
from ldm.util import default, instantiate_from_config

log = logging.getLogger(__name__)

__models__ = {"class_label": EncoderUNetModel, "segmentation": UNetModel}


def disabled_train(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    """Put in place of a frozen module's `.train`, so that train/eval mode never changes again."""
    return self


def diffusion_config_path(diffusion_path: str) -> str:
    """A config file itself (relative paths: to the working directory, else to the project root, as
    the shipped configs name them), or the latest configs/*-project.yaml of a run folder."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if not os.path.exists(diffusion_path) and os.path.exists(os.path.join(root, diffusion_path)):
        diffusion_path = os.path.join(root, diffusion_path)
    if os.path.isfile(diffusion_path):
        return diffusion_path
    found = sorted(glob.glob(os.path.join(diffusion_path, "configs", "*-project.yaml")))
    if not found:
        raise FileNotFoundError(f"diffusion_path '{diffusion_path}': neither a config file nor a run folder with "
                                f"configs/*-project.yaml")
    return found[-1]    # names start with the run's timestamp: the latest sorts last


class NoisyLatentImageClassifier(pl.LightningModule):

    def __init__(self, diffusion_path: str, num_classes: int, ckpt_path: Optional[str] = None,
                 pool: str = "attention", label_key: Optional[str] = None,
                 diffusion_ckpt_path: Optional[str] = None, scheduler_config: Optional[dict] = None,
                 weight_decay: float = 1.0e-2, log_steps: int = 10, monitor: str = "val/loss", *args, **kwargs):
        super().__init__(*args, **kwargs)
        # diffusion_path: run folder or config of the frozen LatentDiffusion; diffusion_ckpt_path: its weights
        # num_classes: classifier outputs; ckpt_path: classifier weights to start from
        # pool: EncoderUNetModel head (class labels); label_key: batch key of the targets (the diffusion
        #   model's cond_stage_key takes precedence, as the original)
        # scheduler_config: optional LambdaLR schedule ({target, params}); weight_decay: AdamW's
        # log_steps: noise levels at which validation accuracy is measured; monitor: for checkpointing
        self.num_classes = num_classes
        self.diffusion_config = OmegaConf.load(diffusion_config_path(diffusion_path)).model
        self.diffusion_config.params.ckpt_path = diffusion_ckpt_path
        self.load_diffusion()
        self.monitor = monitor
        self.numd = self.diffusion_model.first_stage_model.encoder.num_resolutions - 1
        self.log_time_interval = self.diffusion_model.num_timesteps // log_steps
        self.log_steps = log_steps
        self.label_key = getattr(self.diffusion_model, "cond_stage_key", None) or label_key
        if self.label_key is None:
            raise ValueError("label_key neither in the diffusion model (cond_stage_key) nor in model.params")
        if self.label_key not in __models__:
            raise NotImplementedError(f"label_key '{self.label_key}': one of {sorted(__models__)}")
        self.load_classifier(ckpt_path, pool)
        self.scheduler_config = scheduler_config
        self.use_scheduler = scheduler_config is not None
        self.weight_decay = weight_decay
        self.learning_rate = 1.0e-4    # main.py sets it from base_learning_rate

    def init_from_ckpt(self, path: str, ignore_keys: tuple = (), only_model: bool = False) -> None:
        from ldm.checkpoint import load_into, load_state_dict_file
        sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(tuple(ignore_keys))}
        if only_model:
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        load_into(self.model if only_model else self, sd, source=f"'{path}'")

    def load_diffusion(self) -> None:
        model = instantiate_from_config(self.diffusion_config)
        self.diffusion_model = model.eval()
        self.diffusion_model.train = disabled_train.__get__(self.diffusion_model)
        for param in self.diffusion_model.parameters():
            param.requires_grad = False

    def load_classifier(self, ckpt_path: Optional[str], pool: str) -> None:
        unet = self.diffusion_config.params.unet_config.params
        model_config = deepcopy(OmegaConf.to_container(unet, resolve=True))
        model_config["in_channels"] = unet.out_channels
        model_config["out_channels"] = self.num_classes
        if self.label_key == "class_label":
            model_config["pool"] = pool
        self.model = __models__[self.label_key](**model_config)
        if ckpt_path is not None:
            log.info("Loading classifier weights from '%s'", ckpt_path)
            self.init_from_ckpt(ckpt_path, only_model=True)

    @torch.no_grad()
    def get_x_noisy(self, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        noise = default(noise, lambda: torch.randn_like(x))
        return self.diffusion_model.q_sample(x_start=x, t=t, noise=noise)

    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model(x_noisy, t)

    @torch.no_grad()
    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    @torch.no_grad()
    def get_conditioning(self, batch: dict, k: Optional[str] = None) -> torch.Tensor:
        k = k or self.label_key
        targets = batch[k].to(self.device)
        if self.label_key == "segmentation":
            targets = targets.permute(0, 3, 1, 2)
            for _ in range(self.numd):       # down to the latent resolution
                targets = F.interpolate(targets, size=(targets.shape[-2] // 2, targets.shape[-1] // 2), mode="nearest")
        return targets

    def compute_top_k(self, logits: torch.Tensor, labels: torch.Tensor, k: int, reduction: str = "mean") -> Any:
        _, top_ks = torch.topk(logits, k, dim=1)
        hits = (top_ks == labels[:, None]).float().sum(dim=-1)
        return hits.mean().item() if reduction == "mean" else hits

    def on_train_epoch_start(self) -> None:
        self.diffusion_model.model.to("cpu")   # the UNet is not needed here (as the original, saves memory)

    @torch.no_grad()
    def write_logs(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        prefix = "train" if self.training else "val"
        k5 = min(5, logits.shape[1])
        logs = {f"{prefix}/loss": loss.mean(),
                f"{prefix}/acc@1": self.compute_top_k(logits, targets, k=1),
                f"{prefix}/acc@{k5}": self.compute_top_k(logits, targets, k=k5)}
        self.log_dict(logs, prog_bar=False, logger=True, on_step=self.training, on_epoch=True)
        self.log("loss", logs[f"{prefix}/loss"], prog_bar=True, logger=False)
        if self.training and self._trainer is not None:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], on_step=True, logger=True, on_epoch=False,
                     prog_bar=True)

    def shared_step(self, batch: dict, t: Optional[int] = None) -> tuple:
        x = self.diffusion_model.get_input(batch, k=self.diffusion_model.first_stage_key)[0]
        targets = self.get_conditioning(batch)
        if targets.dim() == 4:
            targets = targets.argmax(dim=1)
        targets = targets.long()
        if t is None:
            t = torch.randint(0, self.diffusion_model.num_timesteps, (x.shape[0],), device=self.device).long()
        else:
            t = torch.full(size=(x.shape[0],), fill_value=t, device=self.device).long()
        x_noisy = self.get_x_noisy(x, t)
        logits = self(x_noisy, t)
        loss = F.cross_entropy(logits, targets, reduction="none")
        if self._trainer is not None:
            self.write_logs(loss.detach(), logits.detach(), targets.detach())
        return loss.mean(), logits, x_noisy, targets

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch)[0]

    def reset_noise_accs(self) -> None:
        every = max(1, self.log_time_interval)
        self.noisy_acc = {t: {"acc@1": [], "acc@5": []} for t in range(0, self.diffusion_model.num_timesteps, every)}

    def on_validation_start(self) -> None:
        self.reset_noise_accs()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch)[0]
        for t in self.noisy_acc:
            _, logits, _, targets = self.shared_step(batch, t)
            self.noisy_acc[t]["acc@1"].append(self.compute_top_k(logits, targets, k=1))
            self.noisy_acc[t]["acc@5"].append(self.compute_top_k(logits, targets, k=min(5, logits.shape[1])))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if not self.use_scheduler:
            return optimizer
        scheduler = instantiate_from_config(self.scheduler_config)
        return [optimizer], [{"scheduler": LambdaLR(optimizer, lr_lambda=scheduler.schedule), "interval": "step",
                              "frequency": 1}]


class ClassifierGuidance:
    """Score corrector for DDIMSampler(score_corrector=..., corrector_kwargs={"y": labels}):
    eps - scale * sqrt(1 - abar_t) * grad_x log p(y | x_t) under a NoisyLatentImageClassifier."""

    def __init__(self, classifier: NoisyLatentImageClassifier, scale: float = 1.0):
        self.classifier = classifier   # evaluated on (x_t, t) as trained
        self.scale = scale             # guidance strength s

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) log p(y | x_t)."""
        return F.log_softmax(self.classifier(x, t), dim=-1).gather(1, y[:, None].long())[:, 0]

    def modify_score(self, model: Any, e_t: torch.Tensor, x: torch.Tensor, t: torch.Tensor, c: Any,
                     y: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("ClassifierGuidance needs the target classes: corrector_kwargs={'y': labels}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(self.log_prob(x_in, t, y.to(x.device)).sum(), x_in)[0]
        abar = model.alphas_cumprod.to(x.device)[t.long()]
        return e_t - self.scale * (1.0 - abar).sqrt().view(-1, *([1] * (x.dim() - 1))).to(e_t.dtype) * grad
