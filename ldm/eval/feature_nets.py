"""Feature networks of the metrics papers report now, read from local weights only.

- `DinoV2Features`: DINOv2 ViT-L/14 CLS features (1024-d) for FD-DINOv2 (Stein et al. 2023),
  preprocessed as torch-fidelity / dgm-eval do (TF1-exact bilinear resize to 224, ImageNet
  mean/std). Built with timm's `vit_large_patch14_dinov2` from the official
  `dinov2_vitl14_pretrain.pth` (torch-fidelity's own DINOv2 extractor only loads through
  torch.hub, i.e. from the network).
- `ClipFeatures`: open_clip image and text embeddings (L2-normalised) for CLIP score and CMMD
  (Jayasumana et al. 2024 use ViT-L-14-336 / openai), from a local open_clip checkpoint file.

Both have the interface of `InceptionFeatures` (`__call__(uint8 batch) -> {layer: (B, D)}`,
`extract`, `cache_id`, `provenance`, `feature_key`) so reference statistics are cached per
dataset split for any of them. Missing weights raise `FeatureWeightsNotFound` naming the
file and where to put it, at construction (i.e. before sampling). `random_weights=True` builds
a seeded random network (`arch` may name a tiny one) for offline tests; results carry
`RANDOM_FEATURES_NOTE`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ldm.eval.features import file_sha256, to_uint8_nchw

DINOV2 = "dinov2"
CLIP_IMAGE = "clip_image"
DINOV2_FILENAME = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
CLIP_ARCH, CLIP_TAG = "ViT-L-14-336", "openai"
CLIP_FILENAME = "open_clip_pytorch_model.bin"
RANDOM_FEATURES_NOTE = "{net}: RANDOM weights — numbers are not comparable to published ones"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_NETS: dict[tuple, Any] = {}


class FeatureWeightsNotFound(FileNotFoundError):
    """Local weights of a feature network are missing; the message says which file and where."""


def _find(explicit: Optional[str], env: str, filename: str, what: str, url: str, flag: str) -> Path:
    cands = [Path(p).expanduser() for p in (explicit, os.environ.get(env)) if p]
    if explicit and not cands[0].is_file():
        raise FeatureWeightsNotFound(f"{what} weights file '{explicit}' (given explicitly) does not exist; "
                                     f"expected '{filename}' (from {url}).")
    cands.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    for p in cands:
        if p.is_file():
            return p
    raise FeatureWeightsNotFound(
        f"{what} weights not found (nothing is downloaded at runtime). Put '{filename}' (from {url}) at\n  "
        f"{cands[-1]}\nor pass {flag} PATH / set {env}. Looked in:\n  " + "\n  ".join(map(str, cands))
        + "\nFor an offline smoke test only, use --random-features (numbers then mean nothing).")


def _seeded(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights: N(0, 1/fan_in) matrices / kernels / tokens, unit norms and layer
    scales (so that every block changes the features), zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:   # norm weights, layer-scale gammas, logit scale
                p.fill_(1.0)
    return net


def resize_normalise(x: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size), TF1-exact bilinear resize (torch-fidelity's), normalised."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
    return (x - m) / s


@dataclass
class _Extractor:
    weights_path: Optional[str] = None
    random_weights: bool = False
    device: Union[str, torch.device] = "cpu"
    seed: int = 0
    arch: Optional[str] = None           # network variant (tests: a tiny one)
    model: Any = field(init=False, repr=False)
    provenance: dict = field(init=False)
    feature_key: str = field(init=False, default="")

    def _arch(self, default: str) -> Any:
        """`arch`, with config sections (DictConfig) as plain dicts."""
        from omegaconf import OmegaConf
        arch = self.arch or default
        return OmegaConf.to_container(arch, resolve=True) if OmegaConf.is_config(arch) else arch

    @property
    def cache_id(self) -> str:
        w = "RANDOM-seed%d" % self.seed if self.random_weights else self.provenance["sha256"][:16]
        return f"{self.feature_key}-{self.provenance['arch']}-{w}"

    def _provenance(self, network: str, arch: str, path: Optional[Path]) -> dict:
        if path is None:
            return {"network": network, "arch": arch, "weights": "RANDOM", "random_seed": self.seed,
                    "note": RANDOM_FEATURES_NOTE.format(net=network)}
        return {"network": network, "arch": arch, "weights": str(path), "sha256": file_sha256(path)}

    def extract(self, batches: Iterable, progress: bool = False, desc: str = "features") -> dict[str, np.ndarray]:
        from tqdm import tqdm
        out: list[np.ndarray] = []
        with tqdm(desc=desc, unit="img", disable=not progress) as bar:
            for b in batches:
                out.append(self(b)[self.feature_key])
                bar.update(len(b))
        if not out:
            raise ValueError("no images to extract features from")
        return {self.feature_key: np.concatenate(out)}


@dataclass
class DinoV2Features(_Extractor):
    """DINOv2 CLS-token features. arch: a timm model name (default vit_large_patch14_dinov2)."""

    def __post_init__(self) -> None:
        import timm
        self.feature_key = DINOV2
        arch = self._arch("vit_large_patch14_dinov2")
        name = arch if isinstance(arch, str) else "custom-vit"
        path = None if self.random_weights else _find(self.weights_path, "LDM_DINOV2_WEIGHTS", DINOV2_FILENAME,
                                                      "DINOv2 ViT-L/14", DINOV2_URL, "--dinov2-weights")
        self.provenance = self._provenance("DINOv2 (timm VisionTransformer, CLS token)", name, path)
        key = (DINOV2, repr(arch), self.provenance.get("sha256", self.seed), str(self.device))
        if key not in _NETS:
            if isinstance(arch, str):
                net = timm.create_model(arch, pretrained=False, img_size=224, num_classes=0)
            else:   # VisionTransformer kwargs (tests: a tiny ViT/14)
                from timm.models.vision_transformer import VisionTransformer
                net = VisionTransformer(**arch, img_size=224, num_classes=0)
            if path is None:
                _seeded(net, self.seed)
            else:
                from timm.models.vision_transformer import checkpoint_filter_fn
                sd = torch.load(path, map_location="cpu", weights_only=True)
                net.load_state_dict(checkpoint_filter_fn(sd, net), strict=True)
            _NETS[key] = net.to(self.device).eval().requires_grad_(False)
        self.model = _NETS[key]

    @torch.no_grad()
    def __call__(self, images: Union[np.ndarray, torch.Tensor]) -> dict[str, np.ndarray]:
        x = resize_normalise(to_uint8_nchw(images).to(self.device), 224, IMAGENET_MEAN, IMAGENET_STD)
        return {DINOV2: self.model(x).double().cpu().numpy()}


@dataclass
class ClipFeatures(_Extractor):
    """open_clip embeddings, L2-normalised. arch: an open_clip model name (default ViT-L-14-336),
    or a dict {embed_dim, vision_cfg, text_cfg} for a custom (tiny) CLIP."""

    def __post_init__(self) -> None:
        import open_clip
        self.feature_key = CLIP_IMAGE
        arch = self._arch(CLIP_ARCH)
        name = arch if isinstance(arch, str) else "custom"
        path = None if self.random_weights else _find(
            self.weights_path, "LDM_CLIP_WEIGHTS", CLIP_FILENAME, f"open_clip {CLIP_ARCH} ({CLIP_TAG})",
            f"the Hugging Face repo of open_clip's '{CLIP_ARCH}/{CLIP_TAG}'", "--clip-weights")
        self.provenance = self._provenance("open_clip CLIP (L2-normalised embeddings)", name, path)
        key = (CLIP_IMAGE, repr(arch), self.provenance.get("sha256", self.seed), str(self.device))
        if key not in _NETS:
            if isinstance(arch, str):
                net = open_clip.create_model(arch, pretrained=str(path) if path else None)
            else:
                net = open_clip.model.CLIP(**arch)
                if path is not None:
                    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            if path is None:
                _seeded(net, self.seed)
            _NETS[key] = net.to(self.device).eval().requires_grad_(False)
        self.model = _NETS[key]
        self.image_size = self.model.visual.image_size
        self.image_size = self.image_size[0] if isinstance(self.image_size, (tuple, list)) else self.image_size
        ctx = getattr(self.model, "context_length", 77)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)

    @torch.no_grad()
    def __call__(self, images: Union[np.ndarray, torch.Tensor]) -> dict[str, np.ndarray]:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        x = resize_normalise(to_uint8_nchw(images).to(self.device), self.image_size, OPENAI_DATASET_MEAN,
                             OPENAI_DATASET_STD)
        f = self.model.encode_image(x).double()
        return {CLIP_IMAGE: torch.nn.functional.normalize(f, dim=-1).cpu().numpy()}

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        f = self.model.encode_text(tokens).double()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()
