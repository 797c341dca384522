"""Improved precision and recall (Kynkäänniemi et al. 2019), plus density and coverage.

Each set's manifold is the union of balls around its points whose radius is the distance to
the k-th nearest neighbour in the same set (k=3, the paper's and torch-fidelity's default).
    precision = fraction of generated samples inside the real manifold (<=, as the paper);
    recall    = fraction of real samples inside the generated manifold;
    density / coverage (Naeem et al. 2020) use the real manifold only (strict <, as their code).
Distances are computed in float64 in row blocks, on the given device.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_tensor(x: ArrayLike, device: Union[str, torch.device]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float64, device=device)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b))."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def _row_blocks(n_rows: int, n_cols: int, max_elems: int = 1 << 25):
    step = max(1, max_elems // max(1, n_cols))
    for lo in range(0, n_rows, step):
        yield slice(lo, min(n_rows, lo + step))


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in x (itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points, got {len(x)}")
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for s in _row_blocks(len(x), len(x)):
        out[s] = _sq_dists(x[s], x).kthvalue(k + 1, dim=1).values
    return out


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, device: Union[str, torch.device] = "cpu",
                     density_coverage: bool = True) -> dict[str, float]:
    """Precision/recall of `fake` w.r.t. `real` features (N, D); optionally density/coverage."""
    r, f = _as_tensor(real, device), _as_tensor(fake, device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    rad_r, rad_f = knn_radii(r, k), knn_radii(f, k)
    in_real = torch.zeros(len(f), dtype=torch.bool, device=r.device)
    density_count = torch.zeros((), dtype=torch.float64, device=r.device)
    for s in _row_blocks(len(f), len(r)):
        d = _sq_dists(f[s], r)                                # (b, N_real)
        in_real[s] = (d <= rad_r[None]).any(dim=1)
        if density_coverage:
            density_count += (d < rad_r[None]).sum()
    in_fake = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    covered = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    for s in _row_blocks(len(r), len(f)):
        d = _sq_dists(r[s], f)                                # (b, N_fake)
        in_fake[s] = (d <= rad_f[None]).any(dim=1)
        covered[s] = d.min(dim=1).values < rad_r[s]
    out = {"precision": in_real.double().mean().item(), "recall": in_fake.double().mean().item(), "pr_k": k}
    if density_coverage:
        out["density"] = density_count.item() / (k * len(f))
        out["coverage"] = covered.double().mean().item()
    return out
