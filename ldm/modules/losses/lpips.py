"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 trunk, as taming-transformers' `LPIPS`.

State-dict keys are the original's: `scaling_layer.shift/scale` (buffers),
`net.slice1..5.<i>.weight/bias` (torchvision VGG16 `features`, split after relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3, i.e. at indices 4/9/16/23/30) and
`lin0..4.model.1.weight` (1x1 convs, no bias, after a Dropout at `model.0`).

Weights (nothing is ever downloaded):
  * the calibrated linear layers come from the installed `lpips` package
    (`lpips/weights/v0.1/vgg.pth`, shipped inside the wheel);
  * the VGG16 trunk comes from torchvision's ImageNet checkpoint in the torch hub cache,
    `$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth` (TORCH_HOME defaults to ~/.cache/torch).

Design choice for a missing file: building never fails (configs must build offline, on
the meta device, and before a checkpoint's `load_state_dict` supplies every weight; the
LPIPS weights are part of every first-stage training checkpoint). Instead the module
remembers which pretrained weights it could not load, and the first `forward` raises
FileNotFoundError naming the file and the folder to put it in, unless a `load_state_dict`
has supplied those weights in the meantime. So a real training run can never silently
use a random VGG, and `build -> load_state_dict(strict=True) -> run` works offline.

Random weights on purpose (tests, quick starts): `LPIPS(pretrained=False)`, the loss
modules' `perceptual_weights: random`, or the environment variable `LDM_LPIPS_RANDOM=1`.
Building on the meta device never reads files.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ldm import settings

logger = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"
# torchvision VGG16 `features` (config "D"): conv widths, "M" = max-pool
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_SLICE_ENDS = (4, 9, 16, 23, 30)


def vgg16_checkpoint_path() -> Path:
    """Where torchvision keeps the ImageNet VGG16 weights: <torch hub dir>/checkpoints/vgg16-397923af.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_linear_weights_path() -> Optional[Path]:
    """The calibrated LPIPS v0.1 linear layers shipped in the `lpips` package, or None if not installed.
    (Located without importing the package, which pulls in heavy dependencies.)"""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "weights" / "v0.1" / "vgg.pth"


def random_weights_requested() -> bool:
    return settings.current().lpips_random


class ScalingLayer(nn.Module):
    """Map [-1, 1] images to the ImageNet-normalised range the VGG was trained on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 conv (no bias) weighting the channels of one feature difference map."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)


class vgg16(nn.Module):
    """VGG16 `features` split into five slices; forward returns the five relu outputs."""

    def __init__(self, requires_grad: bool = False):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        start = 0
        for n, end in enumerate(_SLICE_ENDS, start=1):
            sl = nn.Sequential()
            for i in range(start, end):
                sl.add_module(str(i), layers[i])
            setattr(self, f"slice{n}", sl)
            start = end
        self.N_slices = len(_SLICE_ENDS)
        if not requires_grad:
            for p in self.parameters():
                p.requires_grad = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for n in range(1, self.N_slices + 1):
            x = getattr(self, f"slice{n}")(x)
            outs.append(x)
        return outs   # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def load_torchvision_features(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy torchvision `vgg16().state_dict()` entries `features.<i>.*` into the slices."""
        mine = {}
        for n, end in enumerate(_SLICE_ENDS, start=1):
            for name in getattr(self, f"slice{n}").state_dict():
                mine[f"slice{n}.{name}"] = sd[f"features.{name}"]
        self.load_state_dict(mine, strict=True)


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise along channels."""
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


def spatial_average(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    return x.mean([2, 3], keepdim=keepdim)


class LPIPS(nn.Module):
    """d(x, y) for images in [-1, 1]: (B, 1, 1, 1). All parameters are frozen."""

    def __init__(self, use_dropout: bool = True, pretrained: bool = True):
        # use_dropout: Dropout before each linear layer (inactive in eval mode) as the original
        # pretrained: load the calibrated LPIPS + ImageNet VGG16 weights (see module doc); False: random
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.chns = [64, 128, 256, 512, 512]
        self.net = vgg16(requires_grad=False)
        for i, c in enumerate(self.chns):
            setattr(self, f"lin{i}", NetLinLayer(c, use_dropout=use_dropout))
        # weights that should have come from a file but did not: {"net"|"lin": (file, hint)}
        self._pending: dict[str, tuple[str, str]] = {}
        if pretrained and random_weights_requested():
            logger.warning("LDM_LPIPS_RANDOM is set: LPIPS uses random (uncalibrated) weights")
            pretrained = False
        if pretrained:
            self._load_pretrained()
        for p in self.parameters():
            p.requires_grad = False

    # ------------------------------------------------------------------ weights
    def _load_pretrained(self) -> None:
        meta = self.lin0.model[-1].weight.device.type == "meta"
        lin_path = lpips_linear_weights_path()
        if lin_path is not None and lin_path.exists() and not meta:
            sd = torch.load(lin_path, map_location="cpu", weights_only=True)
            self.load_state_dict(sd, strict=False)
        else:
            self._pending["lin"] = (str(lin_path or "lpips/weights/v0.1/vgg.pth"),
                                    "it ships with the `lpips` package: pip install lpips")
        vgg_path = vgg16_checkpoint_path()
        if vgg_path.exists() and not meta:
            self.net.load_torchvision_features(torch.load(vgg_path, map_location="cpu", weights_only=True))
        else:
            self._pending["net"] = (str(vgg_path),
                                    f"put torchvision's ImageNet VGG16 weights '{VGG16_FILE}' into "
                                    f"{vgg_path.parent} (or point TORCH_HOME elsewhere)")

    def _keys_of(self, part: str) -> list[str]:
        if part == "net":
            return ["net." + k for k in self.net.state_dict()]
        return [f"lin{i}.{k}" for i in range(len(self.chns)) for k in getattr(self, f"lin{i}").state_dict()]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict that carries the trunk / the linear layers replaces the missing files.
        for part in list(self._pending):
            if all(prefix + k in state_dict for k in self._keys_of(part)):
                del self._pending[part]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_weights(self) -> None:
        if self._pending:
            path, hint = next(iter(self._pending.values()))
            raise FileNotFoundError(
                f"LPIPS pretrained weights not found: {path} ({hint}). Nothing is downloaded at run time. "
                "For random LPIPS weights (tests only) set LDM_LPIPS_RANDOM=1 or `perceptual_weights: random`.")

    # ------------------------------------------------------------------ distance
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_weights()
        outs0, outs1 = self.net(self.scaling_layer(input)), self.net(self.scaling_layer(target))
        val = None
        for kk in range(len(self.chns)):
            diff = (normalize_tensor(outs0[kk]) - normalize_tensor(outs1[kk])) ** 2
            res = spatial_average(getattr(self, f"lin{kk}").model(diff), keepdim=True)
            val = res if val is None else val + res
        return val
