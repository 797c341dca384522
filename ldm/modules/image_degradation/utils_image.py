"""Image utilities of the original `ldm.modules.image_degradation.utils_image` (KAIR's utils_image),
at their original names and signatures. Conventions as the original: numpy images are HWC
(RGB unless a name says BGR), "uint" = uint8 in [0, 255], "single" = float32 in [0, 1];
tensors are CHW / NCHW floats in [0, 1]. Resizing and the uint/single conversions are the
ones our data pipeline uses (`ldm.data.degradation.utils_image`)."""
from __future__ import annotations

import math
import os
import random
from datetime import datetime
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ldm.data.degradation.utils_image import imresize_np, single2uint, uint2single  # noqa: F401

IMG_EXTENSIONS = [".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".ppm", ".PPM", ".bmp", ".BMP", ".tif"]


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise ImportError("this function reads/writes images with OpenCV: pip install opencv-python-headless") from e
    return cv2


# ----------------------------------------------------------------------------------------
# files and folders
# ----------------------------------------------------------------------------------------
def is_image_file(filename: str) -> bool:
    return any(filename.endswith(ext) for ext in IMG_EXTENSIONS)


def get_timestamp() -> str:
    return datetime.now().strftime("%y%m%d-%H%M%S")


def get_image_paths(dataroot: Optional[str]) -> Optional[list[str]]:
    """Sorted paths of the images under `dataroot` (None for None)."""
    if dataroot is None:
        return None
    if not os.path.isdir(dataroot):
        raise FileNotFoundError(f"'{dataroot}' is not a directory")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(dataroot) for f in files if is_image_file(f))
    if not paths:
        raise FileNotFoundError(f"'{dataroot}' has no image files")
    return paths


def mkdir(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def mkdirs(paths: Any) -> None:
    for p in [paths] if isinstance(paths, str) else paths:
        mkdir(p)


def mkdir_and_rename(path: str) -> None:
    """Create `path`; an existing one is renamed to `path_archived_<timestamp>` first."""
    if os.path.exists(path):
        os.rename(path, path + "_archived_" + get_timestamp())
    os.makedirs(path)


def imshow(x: np.ndarray, title: Optional[str] = None, cbar: bool = False, figsize: Any = None) -> None:
    import matplotlib.pyplot as plt
    plt.figure(figsize=figsize)
    plt.imshow(np.squeeze(x), interpolation="nearest", cmap="gray")
    if title:
        plt.title(title)
    if cbar:
        plt.colorbar()
    plt.show()


def surf(Z: np.ndarray, cmap: str = "rainbow", figsize: Any = None) -> None:
    import matplotlib.pyplot as plt
    plt.figure(figsize=figsize)
    ax = plt.axes(projection="3d")
    h, w = Z.shape[:2]
    X, Y = np.meshgrid(np.arange(0, w, 1), np.arange(0, h, 1))
    ax.plot_surface(X, Y, Z, cmap=cmap)
    plt.show()


def patches_from_image(img: np.ndarray, p_size: int = 512, p_overlap: int = 64, p_max: int = 800) -> list[np.ndarray]:
    """Overlapping p_size x p_size patches of an image larger than p_max (else the image itself)."""
    h, w = img.shape[:2]
    if min(h, w) <= p_max:
        return [img]
    step = p_size - p_overlap
    ys = list(np.arange(0, h - p_size, step, dtype=int)) + [h - p_size]
    xs = list(np.arange(0, w - p_size, step, dtype=int)) + [w - p_size]
    return [img[i:i + p_size, j:j + p_size] for i in ys for j in xs]


def imssave(imgs: Sequence[np.ndarray], img_path: str) -> None:
    """Save patches as <img_path without extension>_s0000.png, _s0001.png, ..."""
    base = os.path.splitext(img_path)[0]
    for i, img in enumerate(imgs):
        imsave(img, f"{base}_s{i:04d}.png")


def split_imageset(original_dataroot: str, taget_dataroot: str, n_channels: int = 3, p_size: int = 800,
                   p_overlap: int = 96, p_max: int = 1000) -> None:
    """Split every large image under `original_dataroot` into patches saved in `taget_dataroot`."""
    for path in get_image_paths(original_dataroot):
        img = imread_uint(path, n_channels=n_channels)
        imssave(patches_from_image(img, p_size, p_overlap, p_max), os.path.join(taget_dataroot, os.path.basename(path)))


# ----------------------------------------------------------------------------------------
# reading and writing
# ----------------------------------------------------------------------------------------
def imread_uint(path: str, n_channels: int = 3) -> np.ndarray:
    """HxWx3 RGB (n_channels=3) or HxWx1 grayscale uint8."""
    from PIL import Image
    img = Image.open(path)
    if n_channels == 1:
        return np.asarray(img.convert("L"))[..., None]
    return np.asarray(img.convert("RGB"))


def imsave(img: np.ndarray, img_path: str) -> None:
    """Save an RGB (or grayscale) uint8 image."""
    from PIL import Image
    img = np.squeeze(img)
    Image.fromarray(img).save(img_path)


imwrite = imsave


def read_img(path: str) -> np.ndarray:
    """HWC BGR float32 in [0, 1] (grayscale: HxWx1), as the original reads with OpenCV."""
    cv2 = _cv2()
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f"cannot read image '{path}'")
    img = img.astype(np.float32) / 255.0
    return img[..., None] if img.ndim == 2 else img[:, :, :3]


# ----------------------------------------------------------------------------------------
# numpy <-> tensor, uint <-> single
# ----------------------------------------------------------------------------------------
def uint162single(img: np.ndarray) -> np.ndarray:
    return np.float32(img / 65535.0)


def single2uint16(img: np.ndarray) -> np.ndarray:
    return np.uint16((img.clip(0, 1) * 65535.0).round())


def uint2tensor4(img: np.ndarray) -> torch.Tensor:
    return uint2tensor3(img)[None]


def uint2tensor3(img: np.ndarray) -> torch.Tensor:
    img = img[..., None] if img.ndim == 2 else img
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)


def tensor2uint(img: torch.Tensor) -> np.ndarray:
    img = img.detach().squeeze().float().clamp_(0, 1).cpu().numpy()
    if img.ndim == 3:
        img = np.transpose(img, (1, 2, 0))
    return np.uint8((img * 255.0).round())


def single2tensor3(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()


def single2tensor4(img: np.ndarray) -> torch.Tensor:
    return single2tensor3(img)[None]


def tensor2single(img: torch.Tensor) -> np.ndarray:
    img = img.detach().squeeze().float().cpu().numpy()
    return np.transpose(img, (1, 2, 0)) if img.ndim == 3 else img


def tensor2single3(img: torch.Tensor) -> np.ndarray:
    img = tensor2single(img)
    return img[..., None] if img.ndim == 2 else img


def single2tensor5(img: np.ndarray) -> torch.Tensor:
    """HWC(D) -> 1 x C x H x W (x D)."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1, *range(3, img.ndim)).float()[None]


def single32tensor5(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).float()[None, None]


def single42tensor4(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1, 3).float()


def tensor2img(tensor: torch.Tensor, out_type: Any = np.uint8, min_max: tuple[float, float] = (0, 1)) -> np.ndarray:
    """A 4D (first image), 3D (CHW, RGB) or 2D tensor -> HWC BGR (or HW) numpy image of `out_type`."""
    t = tensor.detach().squeeze().float().cpu().clamp_(*min_max)
    t = (t - min_max[0]) / (min_max[1] - min_max[0])
    if t.dim() == 4:
        t = t[0]
    if t.dim() == 3:
        img = np.transpose(t.numpy()[[2, 1, 0]], (1, 2, 0))
    elif t.dim() == 2:
        img = t.numpy()
    else:
        raise TypeError(f"only 4D, 3D or 2D tensors, got {t.dim()}D")
    return (img * 255.0).round().astype(out_type) if out_type == np.uint8 else img.astype(out_type)


# ----------------------------------------------------------------------------------------
# augmentation (the 8 flips / rotations)
# ----------------------------------------------------------------------------------------
def augment_img(img: np.ndarray, mode: int = 0) -> np.ndarray:
    ops = {0: lambda x: x, 1: lambda x: np.flipud(np.rot90(x)), 2: np.flipud, 3: lambda x: np.rot90(x, k=3),
           4: lambda x: np.flipud(np.rot90(x, k=2)), 5: np.rot90, 6: lambda x: np.rot90(x, k=2),
           7: lambda x: np.flipud(np.rot90(x, k=3))}
    return ops[mode](img)


def augment_img_tensor4(img: torch.Tensor, mode: int = 0) -> torch.Tensor:
    """augment_img on the (H, W) dims of an N x C x H x W tensor."""
    ops = {0: lambda x: x, 1: lambda x: x.rot90(1, [2, 3]).flip([2]), 2: lambda x: x.flip([2]),
           3: lambda x: x.rot90(3, [2, 3]), 4: lambda x: x.rot90(2, [2, 3]).flip([2]),
           5: lambda x: x.rot90(1, [2, 3]), 6: lambda x: x.rot90(2, [2, 3]), 7: lambda x: x.rot90(3, [2, 3]).flip([2])}
    return ops[mode](img)


def augment_img_tensor(img: torch.Tensor, mode: int = 0) -> torch.Tensor:
    """augment_img on a C x H x W (or N x C x H x W) tensor."""
    return augment_img_tensor4(img[None], mode)[0] if img.dim() == 3 else augment_img_tensor4(img, mode)


def augment_img_np3(img: np.ndarray, mode: int = 0) -> np.ndarray:
    ops = {0: lambda x: x, 1: lambda x: x.transpose(1, 0, 2), 2: lambda x: x[::-1], 3: lambda x: x[::-1].transpose(1, 0, 2),
           4: lambda x: x[:, ::-1], 5: lambda x: x[:, ::-1].transpose(1, 0, 2), 6: lambda x: x[:, ::-1][::-1],
           7: lambda x: x[:, ::-1][::-1].transpose(1, 0, 2)}
    return ops[mode](img)


def augment_imgs(img_list: list[np.ndarray], hflip: bool = True, rot: bool = True) -> list[np.ndarray]:
    """The same random horizontal flip / vertical flip / transpose for every image of the list."""
    hf, vf, tr = hflip and random.random() < 0.5, rot and random.random() < 0.5, rot and random.random() < 0.5

    def _augment(img: np.ndarray) -> np.ndarray:
        if hf:
            img = img[:, ::-1]
        if vf:
            img = img[::-1]
        if tr:
            img = img.transpose(1, 0, 2)
        return img
    return [_augment(img) for img in img_list]


# ----------------------------------------------------------------------------------------
# cropping, color spaces
# ----------------------------------------------------------------------------------------
def modcrop(img_in: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W to multiples of `scale`."""
    img = np.copy(img_in)
    if img.ndim not in (2, 3):
        raise ValueError(f"wrong img ndim: {img.ndim}")
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def shave(img_in: np.ndarray, border: int = 0) -> np.ndarray:
    img = np.copy(img_in)
    h, w = img.shape[:2]
    return img[border:h - border, border:w - border]


_RGB2YCBCR = np.array([[65.481, -37.797, 112.0], [128.553, -74.203, -93.786], [24.966, 112.0, -18.214]])
_YCBCR2RGB = np.array([[0.00456621, 0.00456621, 0.00456621], [0, -0.00153632, 0.00791071],
                       [0.00625893, -0.00318811, 0]])


def _ycbcr(img: np.ndarray, matrix: np.ndarray, only_y: bool) -> np.ndarray:
    in_type = img.dtype
    x = img.astype(np.float32) * (1.0 if in_type != np.uint8 else 1.0 / 255.0)
    out = x @ matrix[:, 0] + 16.0 if only_y else x @ matrix + [16, 128, 128]
    return out.round().astype(np.uint8) if in_type == np.uint8 else (out / 255.0).astype(in_type)


def rgb2ycbcr(img: np.ndarray, only_y: bool = True) -> np.ndarray:
    """MATLAB rgb2ycbcr (ITU-R BT.601) of a uint8 [0, 255] or float [0, 1] RGB image."""
    return _ycbcr(img, _RGB2YCBCR, only_y)


def bgr2ycbcr(img: np.ndarray, only_y: bool = True) -> np.ndarray:
    """rgb2ycbcr of a BGR image."""
    return _ycbcr(img, _RGB2YCBCR[::-1], only_y)


def ycbcr2rgb(img: np.ndarray) -> np.ndarray:
    """MATLAB ycbcr2rgb of a uint8 or float [0, 1] YCbCr image."""
    in_type = img.dtype
    x = img.astype(np.float32) * (1.0 if in_type == np.uint8 else 255.0)
    out = x @ _YCBCR2RGB * 255.0 + [-222.921, 135.576, -276.836]
    return out.round().clip(0, 255).astype(np.uint8) if in_type == np.uint8 else (out / 255.0).astype(in_type)


def channel_convert(in_c: int, tar_type: str, img_list: list[np.ndarray]) -> list[np.ndarray]:
    """Convert BGR images to 'gray' / 'y' (HxWx1), or grayscale images to 3 channels ('RGB')."""
    if in_c == 3 and tar_type == "gray":
        return [np.expand_dims(img @ np.array([0.114, 0.587, 0.299]), axis=2).astype(img.dtype) for img in img_list]
    if in_c == 3 and tar_type == "y":
        return [np.expand_dims(bgr2ycbcr(img, only_y=True), axis=2) for img in img_list]
    if in_c == 1 and tar_type == "RGB":
        return [np.repeat(img if img.ndim == 3 else img[..., None], 3, axis=2) for img in img_list]
    return img_list


# ----------------------------------------------------------------------------------------
# metrics (uint8-range images)
# ----------------------------------------------------------------------------------------
def calculate_psnr(img1: np.ndarray, img2: np.ndarray, border: int = 0) -> float:
    if img1.shape != img2.shape:
        raise ValueError("Input images must have the same dimensions.")
    h, w = img1.shape[:2]
    a = img1[border:h - border, border:w - border].astype(np.float64)
    b = img2[border:h - border, border:w - border].astype(np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def ssim(img1: np.ndarray, img2: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two single-channel [0, 255] images: 11x11 Gaussian window, sigma 1.5."""
    from scipy.signal import convolve2d
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    r = np.arange(11) - 5
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def filt(x: np.ndarray) -> np.ndarray:
        return convolve2d(x, window[::-1, ::-1], mode="valid")
    a, b = img1.astype(np.float64), img2.astype(np.float64)
    mu1, mu2 = filt(a), filt(b)
    s1, s2, s12 = filt(a ** 2) - mu1 ** 2, filt(b ** 2) - mu2 ** 2, filt(a * b) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())


def calculate_ssim(img1: np.ndarray, img2: np.ndarray, border: int = 0) -> float:
    """SSIM of two [0, 255] images (mean over channels for 3-channel images)."""
    if img1.shape != img2.shape:
        raise ValueError("Input images must have the same dimensions.")
    h, w = img1.shape[:2]
    a, b = img1[border:h - border, border:w - border], img2[border:h - border, border:w - border]
    if a.ndim == 2:
        return ssim(a, b)
    if a.ndim == 3 and a.shape[2] in (1, 3):
        return float(np.mean([ssim(a[..., i], b[..., i]) for i in range(a.shape[2])]))
    raise ValueError("Wrong input image dimensions.")


# ----------------------------------------------------------------------------------------
# MATLAB imresize (bicubic, antialiased)
# ----------------------------------------------------------------------------------------
def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic kernel (a = -0.5)."""
    ax = torch.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1).type_as(ax)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)).type_as(ax))


def calculate_weights_indices(in_length: int, out_length: int, scale: float, kernel: str, kernel_width: float,
                              antialiasing: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """MATLAB imresize's contributions: (weights, 1-based input indices) per output pixel, and how
    many pixels the input must be symmetrically padded with at the start / end."""
    if scale < 1 and antialiasing:
        kernel_width = kernel_width / scale        # a wider kernel low-passes when shrinking
    x = torch.linspace(1, out_length, out_length)
    u = x / scale + 0.5 * (1 - 1 / scale)          # output pixel centre in input coordinates
    left = torch.floor(u - kernel_width / 2)
    p = math.ceil(kernel_width) + 2
    indices = left.view(out_length, 1) + torch.linspace(0, p - 1, p).view(1, p)
    dist = u.view(out_length, 1) - indices
    weights = scale * cubic(dist * scale) if scale < 1 and antialiasing else cubic(dist)
    weights = weights / weights.sum(1, keepdim=True)
    # as MATLAB: a first / last column with zero weights is cut (p - 2 columns kept each time)
    zeros = (weights == 0).sum(0)
    if zeros[0] > 0:
        indices, weights = indices[:, 1:p - 1], weights[:, 1:p - 1]
    if zeros[-1] > 0:
        indices, weights = indices[:, 0:p - 2], weights[:, 0:p - 2]
    weights, indices = weights.contiguous(), indices.contiguous()
    sym_len_s = int(-indices.min() + 1)
    sym_len_e = int(indices.max() - in_length)
    indices = indices + sym_len_s - 1
    return weights, indices, sym_len_s, sym_len_e


def imresize(img: torch.Tensor, scale: float, antialiasing: bool = True) -> torch.Tensor:
    """MATLAB bicubic imresize of a C x H x W (or H x W) float tensor in [0, 1]."""
    squeeze = img.dim() == 2
    x = img[None] if squeeze else img
    out = imresize_np(x.permute(1, 2, 0).cpu().numpy().astype(np.float64), scale, antialiasing)
    out = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(img.dtype)
    return out[0] if squeeze else out
