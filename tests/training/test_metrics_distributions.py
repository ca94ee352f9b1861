"""FVD's Frechet distance and KVD's MMD against closed forms and plain reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from training.metrics import (
    frechet_distance,
    fvd,
    gaussian_stats,
    kvd,
    mmd2_unbiased,
    polynomial_kernel,
    real_vs_real_floor,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _frechet_scipy(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (FID reference code)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_exact_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # For commuting covariances the distance is |dmu|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1 + 4 + 0.25 + 1 + 1 + (3 - 0.5) ** 2)


def test_frechet_matches_scipy_sqrtm_for_full_covariances():
    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_scipy(mu1, s1, mu2, s2), rel=1e-9)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            frechet_distance(mu2, s2, mu1, s1), rel=1e-9
        )
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_the_distance_of_a_set_to_itself_is_not_negative():
    """Fewer clips than feature dimensions (singular covariances): the square roots' round-off gave
    identical sets an FVD of about -6e-4, printed as -0.00 in the results table."""
    for seed in range(5):
        x = np.random.default_rng(seed).normal(size=(8, 64)) * 10
        assert 0.0 <= fvd(x, x) < 1e-3


def test_fvd_of_samples_approaches_the_closed_form_of_their_gaussians():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -0.5, 2.0])
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    expected = _frechet_scipy(mu1, s1, mu2, s2)
    assert fvd(x, y) == pytest.approx(expected, rel=0.02)


def test_covariance_is_normalised_by_n_minus_one():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3))
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False, ddof=1), rtol=1e-12)
    assert not np.allclose(sigma, np.cov(x, rowvar=False, ddof=0))
    # And through the public FVD: tiny sets make N vs N-1 a large difference.
    y = rng.normal(size=(5, 3)) + 1
    ref = _frechet_scipy(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fvd(x, y) == pytest.approx(ref, rel=1e-9)


def test_fvd_with_singular_covariances_is_finite():
    # N < D, as for a small eval set with 400-d features: both covariances are singular.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 0.5
    value = fvd(x, y)
    ref = _frechet_scipy(*gaussian_stats(x), *gaussian_stats(y))
    assert np.isfinite(value) and value == pytest.approx(ref, rel=1e-6)


def _mmd2_double_loop(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_matches_a_plain_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(9, 3)) * 1.5 + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_double_loop(x, y), rel=1e-12)
    assert kvd(x, y) == pytest.approx(1000 * _mmd2_double_loop(x, y), rel=1e-12)


def test_polynomial_kernel_defaults_are_kid():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(3, 7)), rng.normal(size=(4, 7))
    np.testing.assert_allclose(polynomial_kernel(x, y), (x @ y.T / 7 + 1) ** 3, rtol=1e-12)


def test_mmd_separates_distributions_and_is_near_zero_within_one():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    c = rng.normal(size=(400, 8)) + 1.0
    same, diff = mmd2_unbiased(a, b), mmd2_unbiased(a, c)
    assert abs(same) < 0.1 * diff


def test_real_vs_real_floor_is_deterministic_and_uses_halves():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(21, 5))
    floor = real_vs_real_floor(real, seed=3)
    assert floor == real_vs_real_floor(real, seed=3)
    assert floor["n_half"] == 10 and floor["seed"] == 3
    order = np.random.default_rng(3).permutation(21)
    a, b = real[order[:10]], real[order[10:20]]
    assert floor["fvd"] == pytest.approx(fvd(a, b), rel=1e-12)
    assert floor["kvd"] == pytest.approx(1000 * floor["mmd2"]) and floor["mmd2"] == pytest.approx(
        mmd2_unbiased(a, b)
    )


def test_bad_features_are_rejected():
    with pytest.raises(ValueError, match="N >= 2"):
        fvd(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        kvd(np.full((3, 2), np.nan), np.zeros((3, 2)))
