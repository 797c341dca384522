"""FD-DINOv2, CMMD and CLIP score on precomputed features (the networks: ldm.eval.feature_nets).

- FD-DINOv2 (Stein et al. 2023): the Fréchet distance of FID, on DINOv2 ViT-L/14 features.
- CMMD (Jayasumana et al. 2024, "Rethinking FID"): squared MMD with a Gaussian RBF kernel,
  sigma = 10, on L2-normalised CLIP image embeddings, times 1000. As their reference code, the
  estimator is the plain (biased) one with all pairs, so a set against itself is exactly 0.
- CLIP score (Hessel et al. 2021, in torchmetrics' convention): 100 * max(cos(image, text), 0),
  averaged over image / caption pairs.
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.eval.fid import fid_from_features

CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


def fd_from_features(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between two feature sets (FD-DINOv2 on DINOv2 features)."""
    return float(fid_from_features(x, y))


def _mean_rbf(x: torch.Tensor, y: torch.Tensor, gamma: float, block: int = 4096) -> float:
    """mean over all (i, j) of exp(-gamma * |x_i - y_j|^2), in row blocks (float64)."""
    total = 0.0
    yy = (y * y).sum(1)
    for i in range(0, len(x), block):
        xb = x[i:i + block]
        d2 = (xb * xb).sum(1)[:, None] + yy[None, :] - 2 * xb @ y.T
        total += torch.exp(-gamma * d2.clamp_min(0)).sum().item()
    return total / (len(x) * len(y))


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE,
         device: str | torch.device = "cpu") -> float:
    """CMMD between two sets of CLIP embeddings (rows; normalised by the extractor)."""
    a = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)
    b = torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)
    gamma = 1.0 / (2 * sigma ** 2)
    return scale * (_mean_rbf(a, a, gamma) + _mean_rbf(b, b, gamma) - 2 * _mean_rbf(a, b, gamma))


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> dict[str, float]:
    """Mean / std of 100 * max(cos, 0) over matching rows of the two (normalised) embedding sets."""
    a, b = np.asarray(image_embeddings, np.float64), np.asarray(text_embeddings, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{len(a)} images but {len(b)} captions")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = 100.0 * np.maximum((a * b).sum(1), 0.0)
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std())}
