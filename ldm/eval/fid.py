"""FID, KID and Inception Score from features (numpy, float64).

FID (Heusel et al. 2017) follows pytorch-fid / the TTUR reference:
    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)),
with `scipy.linalg.sqrtm` and an eps*I offset when the product is singular.
KID (Binkowski et al. 2018) and IS (Salimans et al. 2016) reproduce torch-fidelity 0.4's
estimators (unbiased MMD^2 with the cubic polynomial kernel over random subsets; IS over
shuffled splits of the unbiased logits), with the same random draws for the same seed.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N>=2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"FID: sqrtm has a large imaginary component ({max_imag:.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return fid_features_vs_stats(features1, *feature_statistics(features2))


def fid_features_vs_stats(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID between a feature set and reference statistics.

    With at least as many samples as dimensions this is `frechet_distance` (sqrtm). With fewer,
    the samples' covariance S_f = A^T A / (n-1) (A centred, n x D) has rank < n, sqrtm of the
    singular product is slow and inaccurate, and the exact identity
        Tr sqrtm(S_f sigma) = sum_i sqrt(lambda_i(A sigma A^T / (n-1)))
    (same non-zero eigenvalues, n x n instead of D x D) is used instead.
    """
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if n > d:
        return frechet_distance(*feature_statistics(f), mu, sigma)
    if n < 2:
        raise ValueError("FID needs at least 2 samples")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    mu_f = f.mean(axis=0)
    a = f - mu_f
    m = a @ sigma @ a.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu_f - mu
    return float(diff.dot(diff) + (a * a).sum() / (n - 1) + np.trace(sigma) - 2.0 * tr_covmean)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 estimate (diagonals of K_xx, K_yy dropped; K_xy kept), as torch-fidelity."""
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020, degree: int = 3,
                              gamma: Optional[float] = None, coef0: float = 1.0) -> dict[str, float]:
    """KID mean/std over `subsets` random subsets (drawn as torch-fidelity does for `rng_seed`).

    `subset_size` is capped at the smaller set size (torch-fidelity would refuse); the size
    used is returned as `kid_subset_size`.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set")
    if size < subset_size:
        logger.warning("KID: subset size capped at %d (fewer samples than %d)", size, subset_size)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), size, replace=False)]
        b = f2[rng.choice(len(f2), size, replace=False)]
        kern = lambda x, y: polynomial_kernel(x, y, degree, gamma, coef0)  # noqa: E731
        mmds[i] = mmd2_unbiased(kern(a, a), kern(a, b), kern(b, b))
    return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std()), "kid_subset_size": size,
            "kid_subsets": subsets}


def inception_score(logits: np.ndarray, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> dict[str, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split; mean and std over splits (torch-fidelity's recipe)."""
    x = np.asarray(logits, np.float64)
    n = len(x)
    splits = max(1, min(splits, n))
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_c, log_p_c = p[lo:hi], log_p[lo:hi]
        log_q = np.log(p_c.mean(axis=0, keepdims=True))
        scores.append(np.exp((p_c * (log_p_c - log_q)).sum(axis=1).mean()))
    return {"is_mean": float(np.mean(scores)), "is_std": float(np.std(scores)), "is_splits": splits}
