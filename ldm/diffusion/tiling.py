"""Patch-wise ("split_input") processing of images larger than a network was trained on.

The image is cut into overlapping kernel_size patches (torch Unfold), each patch goes
through `fn`, the outputs are multiplied by a weighting that falls off towards the patch
border, stitched back together (Fold) and divided by the folded weighting, so every
output pixel is a convex combination of the patch outputs covering it.

`fn` may change the spatial size by an integer factor: uf > 1 upsamples (decoding latents
into images, uf = first-stage factor), df > 1 downsamples (encoding images into latents).

`split_input_params` (set on a LatentDiffusion by the user, as in the original) holds:
ks, stride, vqf (the first stage's factor), patch_distributed_vq (use it for the first
stage too), clip_min_weight, clip_max_weight, tie_braker, clip_min_tie_weight,
clip_max_tie_weight, and optionally original_image_size.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

Tensor = torch.Tensor


def meshgrid(h: int, w: int) -> Tensor:
    """(h, w, 2) integer grid of (y, x) coordinates."""
    y = torch.arange(0, h).view(h, 1, 1).repeat(1, w, 1)
    x = torch.arange(0, w).view(1, w, 1).repeat(h, 1, 1)
    return torch.cat([y, x], dim=-1)


def delta_border(h: int, w: int) -> Tensor:
    """(h, w) normalised distance to the nearest border: 0 at the border, 0.5 at the centre."""
    lower_right_corner = torch.tensor([h - 1, w - 1]).view(1, 1, 2)
    arr = meshgrid(h, w) / lower_right_corner
    dist_left_up = torch.min(arr, dim=-1, keepdim=True)[0]
    dist_right_down = torch.min(1 - arr, dim=-1, keepdim=True)[0]
    return torch.min(torch.cat([dist_left_up, dist_right_down], dim=-1), dim=-1)[0]


def get_weighting(h: int, w: int, Ly: int, Lx: int, device: torch.device, params: Mapping[str, Any]) -> Tensor:
    """(1, h*w, Ly*Lx) weight of each pixel of each patch (optionally times a per-patch tie breaker)."""
    weighting = torch.clip(delta_border(h, w), params["clip_min_weight"], params["clip_max_weight"])
    weighting = weighting.view(1, h * w, 1).repeat(1, 1, Ly * Lx).to(device)
    if params["tie_braker"]:
        L_weighting = torch.clip(delta_border(Ly, Lx), params["clip_min_tie_weight"], params["clip_max_tie_weight"])
        weighting = weighting * L_weighting.view(1, 1, Ly * Lx).to(device)
    return weighting


def get_fold_unfold(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], params: Mapping[str, Any],
                    uf: int = 1, df: int = 1):
    """-> (fold, unfold, normalization, weighting) for x (B, C, H, W).

    unfold cuts x into patches of kernel_size; fold stitches outputs of kernel_size*uf//df
    (stride scaled alike) into an (H*uf//df, W*uf//df) image; normalization (1, 1, H', W') is
    the folded weighting; weighting is (1, 1, kh', kw', L)."""
    if uf > 1 and df > 1:
        raise NotImplementedError("uf and df cannot both be > 1")
    _, _, h, w = x.shape
    Ly = (h - kernel_size[0]) // stride[0] + 1   # number of patches
    Lx = (w - kernel_size[1]) // stride[1] + 1

    def scale(n: int) -> int:
        return n * uf if uf > 1 else n // df

    unfold = torch.nn.Unfold(kernel_size=kernel_size, dilation=1, padding=0, stride=stride)
    # Output patch size. (The original used kernel_size[0] for both dimensions when uf/df != 1,
    # which only ever crashed for non-square kernels.)
    kh, kw = scale(kernel_size[0]), scale(kernel_size[1])
    out_hw = (scale(h), scale(w))
    fold = torch.nn.Fold(output_size=out_hw, kernel_size=(kh, kw), dilation=1, padding=0,
                         stride=(scale(stride[0]), scale(stride[1])))
    weighting = get_weighting(kh, kw, Ly, Lx, x.device, params).to(x.dtype)
    normalization = fold(weighting).view(1, 1, *out_hw)   # normalises the overlap
    weighting = weighting.view((1, 1, kh, kw, Ly * Lx))
    return fold, unfold, normalization, weighting


def fit_to(ks: Sequence[int], stride: Sequence[int], h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shrink kernel and stride to the image when it is smaller than them (first-stage tiling)."""
    ks = (min(ks[0], h), min(ks[1], w))
    stride = (min(stride[0], h), min(stride[1], w))
    return ks, stride


def unfold_patches(x: Tensor, unfold: torch.nn.Unfold, kernel_size: Sequence[int]) -> Tensor:
    """(B, C, H, W) -> (B, C, kh, kw, L) patches."""
    z = unfold(x)   # (B, C*kh*kw, L)
    return z.view((z.shape[0], -1, kernel_size[0], kernel_size[1], z.shape[-1]))


def tiled_apply(fn: Callable[[Tensor, int], Tensor], x: Tensor, kernel_size: Sequence[int],
                stride: Sequence[int], params: Mapping[str, Any], uf: int = 1, df: int = 1) -> Tensor:
    """Apply fn(patch, i) to every patch of x and blend the outputs back into one image.

    fn maps a (B, C, kh, kw) patch to (B, C', kh*uf//df, kw*uf//df). Returns (B, C', H', W')."""
    fold, unfold, normalization, weighting = get_fold_unfold(x, kernel_size, stride, params, uf=uf, df=df)
    patches = unfold_patches(x, unfold, kernel_size)
    outputs = [fn(patches[..., i], i) for i in range(patches.shape[-1])]
    o = torch.stack(outputs, dim=-1) * weighting   # (B, C', kh', kw', L)
    o = o.view((o.shape[0], -1, o.shape[-1]))       # (B, C'*kh'*kw', L)
    return fold(o) / normalization
