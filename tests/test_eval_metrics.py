"""FID / KID / IS / precision-recall from features, against closed forms, scipy and torch-fidelity."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.eval.fid import (feature_statistics, fid_features_vs_stats, fid_from_features, frechet_distance,
                          inception_score, kernel_inception_distance)
from ldm.eval.prdc import precision_recall


def _feats(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """n samples of one fixed correlated Gaussian (per d), drawn with `seed`."""
    mix = np.random.RandomState(d).randn(d, d) / np.sqrt(d)
    return (np.random.RandomState(seed).randn(n, d) @ (np.eye(d) + mix)) * scale + shift


def test_fid_of_a_set_against_itself_is_zero():
    f = _feats(500, 32, 0) + 3.0
    assert abs(fid_from_features(f, f)) < 1e-6


def test_fid_equals_direct_scipy_computation():
    f1, f2 = _feats(400, 24, 1), _feats(300, 24, 2, shift=0.3, scale=1.2)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid_from_features(f1, f2) == pytest.approx(direct, rel=1e-10, abs=1e-10)
    # torch-fidelity's own formula (eigenvalues of S1 S2) agrees
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert fid_from_features(f1, f2) == pytest.approx(tf["frechet_inception_distance"], rel=1e-8)


def test_fid_closed_form_for_diagonal_gaussians():
    # d^2 = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances a, b
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_few_samples_exact_low_rank_path_equals_sqrtm():
    f_small, f_ref = _feats(40, 64, 3, shift=0.5), _feats(300, 64, 4)   # 40 samples < 64 dims
    mu, sigma = feature_statistics(f_ref)
    direct = frechet_distance(*feature_statistics(f_small), mu, sigma)  # sqrtm on the rank-39 product
    assert fid_features_vs_stats(f_small, mu, sigma) == pytest.approx(direct, rel=1e-7)
    assert abs(fid_features_vs_stats(f_small, *feature_statistics(f_small))) < 1e-8
    assert fid_from_features(f_small, f_ref) == pytest.approx(direct, rel=1e-7)


def test_fid_rank_deficient_covariances_stay_finite():
    f1, f2 = _feats(20, 64, 3), _feats(20, 64, 4)        # N < D: singular covariances
    d = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert np.isfinite(d) and d > 0


def test_feature_statistics_are_unbiased_mean_and_cov():
    f = _feats(50, 5, 5)
    mu, sigma = feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, (f - mu).T @ (f - mu) / 49)


def test_kid_matches_torch_fidelity_estimator():
    from torch_fidelity.metric_kid import kid_features_to_metric

    f1, f2 = _feats(120, 16, 6), _feats(100, 16, 7, shift=0.2)
    ours = kernel_inception_distance(f1, f2, subsets=10, subset_size=50, seed=123)
    ref = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=10, kid_subset_size=50,
                                 rng_seed=123, verbose=False)
    assert ours["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert ours["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)


def test_kid_sanity_zero_for_same_distribution_and_grows_with_shift():
    base, other = _feats(400, 16, 8), _feats(400, 16, 9)     # two samples of one distribution
    same = kernel_inception_distance(base, other, subsets=20, subset_size=200)
    assert abs(same["kid_mean"]) < 3 * same["kid_std"] + 1e-3
    kids = [kernel_inception_distance(base, other + s, subsets=20, subset_size=200)["kid_mean"]
            for s in (0.2, 0.5, 1.0)]
    assert same["kid_mean"] + 3 * same["kid_std"] < kids[0] < kids[1] < kids[2]
    # the subset size is capped by the smaller set and reported
    assert kernel_inception_distance(base, other[:50], subsets=2)["kid_subset_size"] == 50


def test_inception_score_extremes_and_torch_fidelity_agreement():
    assert inception_score(np.zeros((100, 10)))["is_mean"] == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0    # sure and uniform over 10 classes
    assert inception_score(confident, splits=1)["is_mean"] == pytest.approx(10.0, rel=1e-6)
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.RandomState(0).randn(200, 20) * 3
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    ours = inception_score(logits, splits=10, seed=2020)
    assert ours["is_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert ours["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-9)


def test_precision_recall_identical_sets_are_one():
    f = _feats(200, 16, 10)
    out = precision_recall(f, f.copy(), k=3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0


def test_precision_recall_disjoint_sets_are_zero():
    out = precision_recall(_feats(100, 8, 11), _feats(100, 8, 12, shift=100.0), k=3)
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["coverage"] == 0.0 and out["density"] == 0.0


def test_precision_recall_hand_computed_1d():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])   # k=1 radii: 1 everywhere
    fake = np.array([[0.5], [10.0], [4.9]])                 # k=1 radii: 4.4, 5.1, 4.4
    out = precision_recall(real, fake, k=1)
    assert out["precision"] == pytest.approx(2 / 3)           # 0.5 and 4.9 inside, 10 outside
    assert out["recall"] == 1.0
    assert out["density"] == pytest.approx((2 + 0 + 1) / 3)  # 0.5 in balls of 0 and 1; 4.9 in ball of 4
    assert out["coverage"] == pytest.approx(3 / 5)           # real 0, 1, 4 have a fake within radius 1


def test_precision_recall_match_torch_fidelity_k3():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _feats(150, 12, 13), _feats(120, 12, 14, shift=0.4, scale=0.8)
    p, r = calculate_precision_recall_full(torch.from_numpy(fake).float(), torch.from_numpy(real).float(), 3)
    out = precision_recall(real, fake, k=3)
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1
    assert out["precision"] == pytest.approx(p, abs=1 / 120 + 1e-9)   # float32 ties may flip one sample
    assert out["recall"] == pytest.approx(r, abs=1 / 150 + 1e-9)
