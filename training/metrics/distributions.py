"""Distances between two sets of video features: FVD's Frechet distance and KVD's kernel MMD.

Both take features as `[N, D]` arrays (I3D logits for FVD/KVD, `D = 400`) and compute in float64 numpy,
so that the statistic does not depend on the device or dtype the features were computed in.
"""

from __future__ import annotations

import numpy as np


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected features [N >= 2, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and covariance `[D, D]` of `features [N, D]`.

    The covariance is the unbiased sample covariance (normalised by N - 1), as in the FID/FVD reference
    code (`np.cov(x, rowvar=False)`).
    """
    x = _features(features, "gaussian_stats")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))` (Dowson & Landau 1982; Heusel et al. 2017, FID).
    `Tr (S1 S2)^(1/2)` is computed as `Tr (S1^(1/2) S2 S1^(1/2))^(1/2)`: the two matrices are similar,
    and the second is symmetric PSD, so an eigendecomposition gives it without the complex round-off of a
    general `sqrtm` on a singular product (N < D makes the covariances singular).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    # a distance: round-off of the square roots left identical sets of fewer clips than dimensions at -6e-4,
    # printed as -0.00
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def fvd(real_features: np.ndarray, gen_features: np.ndarray) -> float:
    """Frechet video distance between two feature sets `[N, D]` (Unterthiner et al. 2018)."""
    return frechet_distance(*gaussian_stats(real_features), *gaussian_stats(gen_features))


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> np.ndarray:
    """`k(x, y) = (gamma x.y + coef0)^degree` for all pairs: `[N, D], [M, D] -> [N, M]`; gamma = 1/D by default.

    The defaults are the KID/KVD kernel (Binkowski et al. 2018): `(x.y / D + 1)^3`.
    """
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased estimator of the squared MMD with the polynomial kernel (Gretton et al. 2012, eq. 3).

    `1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)`
    over the full sets (no subsets, as the protocol fixes). It can be slightly negative when the sets are
    samples of one distribution.
    """
    x, y = _features(x, "mmd2_unbiased x"), _features(y, "mmd2_unbiased y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    k_xx = polynomial_kernel(x, x, degree)
    k_yy = polynomial_kernel(y, y, degree)
    k_xy = polynomial_kernel(x, y, degree)
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())


KVD_SCALE = 1000.0  # KVD is reported as 1000 x MMD^2, the convention of the papers' tables


def kvd(real_features: np.ndarray, gen_features: np.ndarray) -> float:
    """Kernel video distance as reported: `1000 x MMD^2_unbiased` with the cubic polynomial kernel."""
    return KVD_SCALE * mmd2_unbiased(real_features, gen_features)


def real_vs_real_floor(real_features: np.ndarray, seed: int = 0) -> dict[str, float | int]:
    """FVD and KVD between two halves of the real set: the sample-size floor to report beside the scores.

    The halves come from a seeded permutation, not from the set's order, because eval clips are stored
    grouped by source and the first and second halves would then differ in content, not just in sample.
    With N real clips each half has N // 2 (an odd last clip is left out).
    """
    x = _features(real_features, "real_vs_real_floor")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    half = x.shape[0] // 2
    a, b = x[order[:half]], x[order[half : 2 * half]]
    mmd2 = mmd2_unbiased(a, b)
    return {"fvd": fvd(a, b), "kvd": KVD_SCALE * mmd2, "mmd2": mmd2, "n_half": half, "seed": seed}
