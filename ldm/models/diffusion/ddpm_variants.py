"""LatentDiffusion variants: SD2 upscaling / inpainting / depth fine-tunes, and layout-to-image.

Configs name them as `ldm.models.diffusion.ddpm.<Name>` (resolved from there).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from pytorch_lightning.utilities import rank_zero_info

from ldm.models.diffusion import logging as image_logs
from ldm.models.diffusion.ddpm import _TrainDisabled, freeze
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.util import exists, instantiate_from_config


def _bchw(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()


class LatentUpscaleDiffusion(LatentDiffusion):
    """SD2 x4 upscaler: the noise-augmented low-res image is concatenated to z, its noise level is the
    UNet's class label (conditioning_key hybrid-adm), text via cross-attention."""

    def __init__(self, *args, low_scale_config: Mapping[str, Any], low_scale_key: str = "LR",
                 noise_level_key: Optional[str] = None, **kwargs):
        # low_scale_config: {target, params} of the low-res conditioning (upscaling.ImageConcatWithNoiseAugmentation)
        # low_scale_key: batch key of the low-res image (B, H, W, C)
        # noise_level_key: batch key of a fixed noise level (not implemented, as the original)
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:   # neither the cond stage nor the low-scale model may train
            raise ValueError("LatentUpscaleDiffusion needs cond_stage_trainable: false")
        self.instantiate_low_stage(low_scale_config)
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key

    def instantiate_low_stage(self, config: Mapping[str, Any]) -> None:
        self.low_scale_model = freeze(instantiate_from_config(config))

    @torch.no_grad()
    def get_input(self, batch, k, cond_key=None, bs=None, log_mode=False):
        if not log_mode:
            z, c = super().get_input(batch, k, force_c_encode=True, bs=bs)
        else:
            z, c, x, xrec, xc = super().get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                                  force_c_encode=True, return_original_cond=True, bs=bs)
        x_low = _bchw(batch[self.low_scale_key][:bs]).to(self.device)
        zx, noise_level = self.low_scale_model(x_low)
        if self.noise_level_key is not None:
            raise NotImplementedError("noise_level_key: taking the noise level from the batch is not implemented")
        all_conds = {"c_concat": [zx], "c_crossattn": [c], "c_adm": noise_level}
        if log_mode:
            return z, all_conds, x, xrec, xc, x_low, self.low_scale_model.decode(zx), noise_level
        return z, all_conds

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=4, sample=True, ddim_steps=200, ddim_eta=1., return_keys=None,
                   plot_denoise_rows=False, plot_progressive_rows=True, plot_diffusion_rows=True,
                   unconditional_guidance_scale=1., unconditional_guidance_label=None, use_ema_scope=True,
                   **kwargs):
        return image_logs.log_images_ldm(self, batch, **image_logs.skeleton_args(
            locals(), quantize_denoised=False, inpaint=False))

    def log_inputs(self, batch, N):
        z, c, x, xrec, xc, x_low, x_low_rec, noise_level = self.get_input(batch, self.first_stage_key, bs=N,
                                                                          log_mode=True)
        levels = "-".join(str(v) for v in noise_level.cpu().numpy().tolist())
        log = {"inputs": x, "reconstruction": xrec, "x_lr": x_low, f"x_lr_rec_@noise_levels{levels}": x_low_rec}
        log.update(image_logs.conditioning_logs(self, batch, c["c_crossattn"][0], xc, x))
        return z, c, x, log

    def log_unconditional(self, c, N, label):
        # only the text is guided away from; the low-res image and its noise level stay
        uc_tmp = self.get_unconditional_conditioning(N, label)
        return {k: ([uc_tmp] if k == "c_crossattn" else (list(v) if isinstance(v, list) else v))
                for k, v in c.items()}


class LatentFinetuneDiffusion(LatentDiffusion):
    """Basis of fine-tunes that add concat channels (inpainting, depth2img, upscaling-ft); with
    `finetune_keys`, the checkpoint's input conv is zero-extended to the new input channels."""

    def __init__(self, concat_keys: Sequence[str],
                 finetune_keys=("model.diffusion_model.input_blocks.0.0.weight",
                                "model_ema.diffusion_modelinput_blocks00weight"),
                 keep_finetune_dims: int = 4, c_concat_log_start: Optional[int] = None,
                 c_concat_log_end: Optional[int] = None, *args, **kwargs):
        # concat_keys: batch keys concatenated to z (after encoding / resizing)
        # finetune_keys: checkpoint keys whose input channels are extended (None disables fine-tune mode)
        # keep_finetune_dims: input channels kept from the checkpoint (the rest start at zero)
        # c_concat_log_start, c_concat_log_end: channel range of c_concat decoded in the image logs
        super().__init__(*args, **kwargs)
        self.finetune_keys = finetune_keys
        self.concat_keys = concat_keys
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start = c_concat_log_start
        self.c_concat_log_end = c_concat_log_end
        if exists(self.finetune_keys) and not exists(self._init_checkpoint["path"]):
            raise ValueError("can only finetune from a given checkpoint (set ckpt_path or finetune_keys: null)")

    def _prepare_checkpoint(self, sd):
        """Fine-tune mode: zero-extend the checkpoint's `finetune_keys` to this model's input channels,
        keeping its first keep_finetune_dims channels."""
        if not exists(self.finetune_keys):
            return sd
        own = self.state_dict()
        for k in list(sd):
            if k in self.finetune_keys and k in own:
                rank_zero_info(f"modifying key '{k}' and keeping its original {self.keep_dims} (channels) "
                               f"dimensions only")
                new_entry = torch.zeros(own[k].shape, dtype=sd[k].dtype)   # zero init
                new_entry[:, :self.keep_dims, ...] = sd[k]
                sd[k] = new_entry
        return sd

    def concat_conditioning(self, batch, z: torch.Tensor, bs: Optional[int]
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (c_concat (B, C', h, w), c_adm or None: a noise level that also conditions the UNet)."""
        raise NotImplementedError

    @torch.no_grad()
    def get_input(self, batch, k, cond_key=None, bs=None, return_first_stage_outputs=False):
        if self.cond_stage_trainable:   # restricted to non-trainable encoders, as the original
            raise ValueError(f"trainable cond stages are not supported by {type(self).__name__}")
        z, c, x, xrec, xc = super().get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                              force_c_encode=True, return_original_cond=True, bs=bs)
        if not exists(self.concat_keys):
            raise ValueError("concat_keys must be set")
        c_cat, c_adm = self.concat_conditioning(batch, z, bs)
        all_conds = {"c_concat": [c_cat], "c_crossattn": [c]}
        if c_adm is not None:
            all_conds["c_adm"] = c_adm
        if return_first_stage_outputs:
            return z, all_conds, x, xrec, xc
        return z, all_conds

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=4, sample=True, ddim_steps=200, ddim_eta=1., return_keys=None,
                   quantize_denoised=True, inpaint=True, plot_denoise_rows=False, plot_progressive_rows=True,
                   plot_diffusion_rows=True, unconditional_guidance_scale=1., unconditional_guidance_label=None,
                   use_ema_scope=True, **kwargs):
        # as the original: no quantized, inpainting or progressive rows for the fine-tunes
        return image_logs.log_images_ldm(self, batch, **image_logs.skeleton_args(
            locals(), quantize_denoised=False, inpaint=False, plot_progressive_rows=False))

    def log_inputs(self, batch, N):
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, bs=N, return_first_stage_outputs=True)
        c_cat, c = c["c_concat"][0], c["c_crossattn"][0]
        log = {"inputs": x, "reconstruction": xrec}
        log.update(image_logs.conditioning_logs(self, batch, c, xc, x))
        if not (self.c_concat_log_start is None and self.c_concat_log_end is None):
            log["c_concat_decoded"] = self.decode_first_stage(c_cat[:, self.c_concat_log_start:self.c_concat_log_end])
        return z, {"c_concat": [c_cat], "c_crossattn": [c]}, x, log

    def log_unconditional(self, c, N, label):
        return {"c_concat": c["c_concat"], "c_crossattn": [self.get_unconditional_conditioning(N, label)]}


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """SD2 inpainting: c_concat = [mask resized to z, encoded masked image]; text via cross-attention."""

    def __init__(self, concat_keys=("mask", "masked_image"), masked_image_key: str = "masked_image", *args, **kwargs):
        # concat_keys: batch keys concatenated to z, in order
        # masked_image_key: the concat key that is encoded by the first stage (the others are resized)
        super().__init__(concat_keys, *args, **kwargs)
        self.masked_image_key = masked_image_key
        if self.masked_image_key not in concat_keys:
            raise ValueError(f"masked_image_key '{masked_image_key}' must be one of concat_keys {concat_keys}")

    def concat_conditioning(self, batch, z, bs):
        c_cat = []
        for ck in self.concat_keys:
            cc = _bchw(batch[ck])
            if bs is not None:
                cc = cc[:bs]
            cc = cc.to(self.device)
            if ck != self.masked_image_key:
                cc = F.interpolate(cc, size=z.shape[-2:])
            else:
                cc = self.get_first_stage_encoding(self.encode_first_stage(cc))
            c_cat.append(cc)
        return torch.cat(c_cat, dim=1), None

    @torch.no_grad()
    def log_images(self, batch, *args, **kwargs):
        log = super().log_images(batch, *args, **kwargs)
        log["masked_image"] = _bchw(batch["masked_image"])
        return log


class LatentDepth2ImageDiffusion(LatentFinetuneDiffusion):
    """SD2 depth2img: c_concat = monocular depth (depth_stage_config, e.g. MiDaS) normalised to [-1, 1]."""

    def __init__(self, depth_stage_config, concat_keys=("midas_in",), *args, **kwargs):
        # depth_stage_config: {target, params} of the depth estimator (depth_model)
        super().__init__(concat_keys=concat_keys, *args, **kwargs)
        self.depth_model = instantiate_from_config(depth_stage_config)
        self.depth_stage_key = concat_keys[0]

    def concat_conditioning(self, batch, z, bs):
        if len(self.concat_keys) != 1:
            raise ValueError("depth2img takes exactly one concat key")
        cc = batch[self.concat_keys[0]]
        if bs is not None:
            cc = cc[:bs].to(self.device)
        cc = F.interpolate(self.depth_model(cc), size=z.shape[2:], mode="bicubic", align_corners=False)
        lo, hi = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
        return 2. * (cc - lo) / (hi - lo + 0.001) - 1., None

    @torch.no_grad()
    def log_images(self, batch, *args, **kwargs):
        log = super().log_images(batch, *args, **kwargs)
        depth = self.depth_model(batch[self.depth_stage_key])
        lo, hi = torch.amin(depth, dim=[1, 2, 3], keepdim=True), torch.amax(depth, dim=[1, 2, 3], keepdim=True)
        log["depth"] = 2. * (depth - lo) / (hi - lo) - 1.
        return log


class LatentUpscaleFinetuneDiffusion(LatentFinetuneDiffusion):
    """Condition on a low-res image (optionally noise-augmented: its level becomes c_adm)."""

    def __init__(self, concat_keys=("lr",), reshuffle_patch_size=None, low_scale_config=None, low_scale_key=None,
                 *args, **kwargs):
        # reshuffle_patch_size: space-to-depth factor applied to the low-res image
        # low_scale_config, low_scale_key: optional noise augmentation of batch[low_scale_key]
        super().__init__(concat_keys=concat_keys, *args, **kwargs)
        self.reshuffle_patch_size = reshuffle_patch_size
        self.low_scale_model = None
        if low_scale_config is not None:
            if not exists(low_scale_key):
                raise ValueError("low_scale_config needs low_scale_key")
            self.low_scale_model = freeze(instantiate_from_config(low_scale_config))
            self.low_scale_key = low_scale_key

    def concat_conditioning(self, batch, z, bs):
        if len(self.concat_keys) != 1:
            raise ValueError("upscaling-ft takes exactly one concat key")
        ck = self.concat_keys[0]
        cc = rearrange(batch[ck], "b h w c -> b c h w")
        if exists(self.reshuffle_patch_size):
            p = int(self.reshuffle_patch_size)
            cc = rearrange(cc, "b c (p1 h) (p2 w) -> b (p1 p2 c) h w", p1=p, p2=p)
        if bs is not None:
            cc = cc[:bs].to(self.device)
        if exists(self.low_scale_model) and ck == self.low_scale_key:
            return self.low_scale_model(cc)     # (noise-augmented image, its noise level)
        return cc, None

    @torch.no_grad()
    def log_images(self, batch, *args, **kwargs):
        log = super().log_images(batch, *args, **kwargs)
        log["lr"] = rearrange(batch["lr"], "b h w c -> b c h w")
        return log


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    """SD 2.1 unCLIP: a (noise-augmented) CLIP image embedding of batch[embedding_key] conditions the
    UNet as its class vector (c_adm), text via cross-attention."""

    def __init__(self, embedder_config, embedding_key: str = "jpg", embedding_dropout: float = 0.5,
                 freeze_embedder: bool = True, noise_aug_config=None, *args, **kwargs):
        # embedder_config: {target, params} of the image embedder (e.g. FrozenOpenCLIPImageEmbedder)
        # embedding_key: batch key of the image to embed
        # embedding_dropout: training probability of zeroing the embedding (guidance)
        # freeze_embedder: keep the embedder frozen
        # noise_aug_config: {target, params} of the embedding's noise augmentation (its level is appended)
        super().__init__(*args, **kwargs)
        self.embed_key = embedding_key
        self.embedding_dropout = embedding_dropout
        embedder = instantiate_from_config(embedder_config)
        self.embedder = freeze(embedder) if freeze_embedder else embedder
        if noise_aug_config is not None:
            noise_augmentor = instantiate_from_config(noise_aug_config).eval()
            noise_augmentor.train = _TrainDisabled(noise_augmentor)   # frozen mode, parameters as they are
            self.noise_augmentor = noise_augmentor
        else:
            self.noise_augmentor = None

    def get_input(self, batch, k, cond_key=None, bs=None, **kwargs):
        outputs = LatentDiffusion.get_input(self, batch, k, bs=bs, **kwargs)
        z, c = outputs[0], outputs[1]
        c_adm = self.embedder(rearrange(batch[self.embed_key][:bs], "b h w c -> b c h w"))
        if self.noise_augmentor is not None:
            c_adm, noise_level_emb = self.noise_augmentor(c_adm)
            c_adm = torch.cat((c_adm, noise_level_emb), 1)
        if self.training:
            keep = torch.bernoulli((1. - self.embedding_dropout) * torch.ones(c_adm.shape[0], device=c_adm.device))
            c_adm = keep[:, None] * c_adm
        return [z, {"c_crossattn": [c], "c_adm": c_adm}, *outputs[2:]]

    @torch.no_grad()
    def log_images(self, batch, N=8, n_row=4, **kwargs):
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, bs=N, return_first_stage_outputs=True,
                                           return_original_cond=True)
        log = {"inputs": x, "reconstruction": xrec}
        log.update(image_logs.conditioning_logs(self, batch, c["c_crossattn"][0], xc, x))
        uc = self.get_unconditional_conditioning(N, kwargs.get("unconditional_guidance_label", [""]))
        scale = kwargs.get("unconditional_guidance_scale", 5.)
        ema_scope = self.ema_scope if kwargs.get("use_ema_scope", True) else nullcontext
        sample_kw = dict(batch_size=N, ddim=True, ddim_steps=kwargs.get("ddim_steps", 50), eta=kwargs.get("ddim_eta", 0.))
        samples = image_logs.cfg_samples(self, c, {"c_crossattn": [uc], "c_adm": c["c_adm"]}, scale, ema_scope,
                                         sample_kw)
        log[f"samplescfg_scale_{scale:.2f}"] = next(iter(samples.values()))
        return log


class Layout2ImgDiffusion(LatentDiffusion):
    """Layout-to-image (cond_stage_key coordinates_bbox); logs the layouts as images."""

    def __init__(self, cond_stage_key: str, *args, **kwargs):
        if cond_stage_key != "coordinates_bbox":
            raise ValueError('Layout2ImgDiffusion only for cond_stage_key="coordinates_bbox"')
        super().__init__(cond_stage_key=cond_stage_key, *args, **kwargs)

    @torch.no_grad()
    def log_images(self, batch, N=8, *args, **kwargs):
        logs = super().log_images(batch=batch, N=N, *args, **kwargs)
        dset = self.trainer.datamodule.datasets["train" if self.training else "validation"]
        mapper = dset.conditional_builders[self.cond_stage_key]
        label = lambda catno: dset.get_textual_label(dset.get_category_id(catno))   # noqa: E731
        bbox_imgs = [mapper.plot(tknzd_bbox.detach().cpu(), label, (256, 256))
                     for tknzd_bbox in batch[self.cond_stage_key][:N]]
        logs["bbox_image"] = torch.stack(bbox_imgs, dim=0)
        return logs
