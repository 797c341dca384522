"""A diffusers pipeline for our class-conditional LDMs (the cin256 family), which diffusers
itself does not ship: class label -> embedding (cross-attention context, as ClassEmbedder does,
or the UNet's own class embedding) -> DDIM -> first-stage decode. DiT-style call:
`pipe(class_labels=[1, 7], num_inference_steps=50, guidance_scale=3.0)`.

Load an exported folder with `LDMClassConditionalPipeline.from_pretrained(DIR, local_files_only=True)`."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class ClassEmbedding(ModelMixin, ConfigMixin):
    """ClassEmbedder's table as a diffusers model: labels (B,) -> context (B, 1, embed_dim)."""

    @register_to_config
    def __init__(self, num_classes: int = 1000, embed_dim: int = 512):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels[:, None].long())


class LDMClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional latent diffusion: `class_embedder` is None when the UNet embeds the
    labels itself (UNet2DModel with num_class_embeds)."""

    model_cpu_offload_seq = "class_embedder->unet->vqvae"
    _optional_components = ["class_embedder"]

    def __init__(self, vqvae, unet, scheduler, class_embedder: Optional[ClassEmbedding] = None):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler, class_embedder=class_embedder)

    def _net(self, latents: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.class_embedder is not None:
            return self.unet(latents, t, encoder_hidden_states=self.class_embedder(labels)).sample
        return self.unet(latents, t, class_labels=labels).sample

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int]], guidance_scale: float = 1.0,
                 uncond_label: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, num_inference_steps: int = 50, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True):
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else list(class_labels),
                                 device=self.device)
        unet_cfg = self.unet.config
        shape = (len(labels), unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device="cpu").to(self.device)
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        if guidance_scale != 1.0 and uncond_label is None:
            uncond_label = (self.class_embedder.config.num_classes if self.class_embedder is not None
                            else unet_cfg.num_class_embeds) - 1
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            if guidance_scale != 1.0:
                both = torch.cat([torch.full_like(labels, uncond_label), labels])
                e_u, e_c = self._net(torch.cat([latents] * 2), t, both).chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            else:
                eps = self._net(latents, t, labels)
            latents = self.scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
        if output_type == "latent":
            return ImagePipelineOutput(images=latents) if return_dict else (latents,)
        image = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=image) if return_dict else (image,)
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
