"""Distances between two sets of features: FID, KID and precision/recall.

FID   Fréchet distance of Gaussians fitted to the features (Heusel et al. 2017):
      FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}), in float64.
KID   Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of MMD²
      with the kernel k(x, y) = (x·y/d + 1)³, averaged over random subsets (100 subsets
      of min(1000, n) images per side); mean and standard deviation over the subsets.
P/R   Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is
      the union of balls around its features with the radius of the k-th (k = 3)
      nearest neighbour; precision is the share of generated features inside the
      reference manifold, recall the share of reference features inside the generated
      one. At most 10 000 features per side take part (a fixed random subset), because
      the cost grows with the product of the set sizes.

The formulas are in docs/MATH.md, §7. Everything here works on feature tensors; which
network makes the features is `ldm_cli.evaluation.features`' business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
PR_MAX_IMAGES = 10_000
SUBSET_SEED = 0
DISTANCE_CHUNK = 1024  # rows of a pairwise-distance block
STATS_CHUNK = 4096  # rows per step when accumulating the covariance


# --------------------------------------------------------------------------- Fréchet distance (FID)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean `(D,)` and unbiased covariance `(D, D)` of `(N, D)` features, in float64, in chunks."""
    n = len(features)
    if n < 2:
        raise ValueError("a covariance needs at least 2 feature vectors")
    mu = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for start in range(0, n, STATS_CHUNK):
        mu += features[start:start + STATS_CHUNK].double().sum(0)
    mu /= n
    sigma = torch.zeros(len(mu), len(mu), dtype=torch.float64, device=features.device)
    for start in range(0, n, STATS_CHUNK):
        centred = features[start:start + STATS_CHUNK].double() - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def psd_eigenvalues(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with rounding noise removed: negative ones, and those
    within d·ε·max of zero, become 0.

    A singular covariance (fewer images than feature dimensions) has eigenvalues that
    are 0 in exact arithmetic but come out as ±1e-16·‖Σ‖; their square roots (1e-8) would
    add up to a visible error over thousands of dimensions.
    """
    tolerance = values.abs().max() * len(values) * torch.finfo(values.dtype).eps
    return torch.where(values > tolerance, values, torch.zeros_like(values))


def sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * psd_eigenvalues(values).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Tr((Σ₁Σ₂)^{1/2}) for covariances Σ₁, Σ₂.

    Σ₁Σ₂ is not symmetric, but it has the same eigenvalues as the symmetric PSD matrix
    Σ₁^{1/2} Σ₂ Σ₁^{1/2}; the trace of the square root is the sum of the square roots
    of those eigenvalues. Two symmetric eigendecompositions, stable also for singular
    covariances (no general eigensolver, no complex square roots, no scipy).
    """
    root1 = sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    values = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return psd_eigenvalues(values).sqrt().sum()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) in float64 (Heusel et al. 2017, the FID)."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    mean_term = (mu1 - mu2).pow(2).sum()
    cov_term = sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(0.0, float(mean_term + cov_term))  # a squared distance; rounding can dip below 0 by ~1e-12


# --------------------------------------------------------------------------- kernel distance (KID)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y/d + 1)³ for all pairs of rows (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² between two equal-size sets: the diagonals of k(x, x) and k(y, y) are left out."""
    m = len(x)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kernel_distance(
    x: torch.Tensor, y: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
    seed: int = SUBSET_SEED,
) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD² over random subsets, in float64.

    Each subset draws min(subset_size, len(x), len(y)) rows of each set without
    replacement (Bińkowski et al. 2018).
    """
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors per side")
    rng = np.random.default_rng(seed)
    x, y = x.double(), y.double()
    values = []
    for _ in range(subsets):
        rows_x = torch.from_numpy(rng.choice(len(x), m, replace=False)).to(x.device)
        rows_y = torch.from_numpy(rng.choice(len(y), m, replace=False)).to(y.device)
        values.append(mmd2_unbiased(x[rows_x], y[rows_y]))
    spread = float(np.std(values)) if len(values) > 1 else 0.0
    return float(np.mean(values)), spread


# --------------------------------------------------------------------------- precision and recall


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖aᵢ − bⱼ‖² for all pairs, in float64, never negative."""
    a, b = a.double(), b.double()
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)


def knn_radii(features: torch.Tensor, k: int = PR_K) -> torch.Tensor:
    """For each row, the distance to its k-th nearest other row (Kynkäänniemi et al. 2019)."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} feature vectors")
    radii = []
    for start in range(0, len(features), DISTANCE_CHUNK):
        d2 = squared_distances(features[start:start + DISTANCE_CHUNK], features)
        radii.append(d2.kthvalue(k + 1, dim=1).values.sqrt())  # the (k+1)-th smallest skips the row itself
    return torch.cat(radii)


def share_inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> float:
    """The share of `queries` within `radii[j]` of some `points[j]`: inside the manifold of `points`."""
    inside = 0
    limit = radii.double().to(points.device).pow(2)
    for start in range(0, len(queries), DISTANCE_CHUNK):
        d2 = squared_distances(queries[start:start + DISTANCE_CHUNK], points)
        inside += int((d2 <= limit).any(dim=1).sum())
    return inside / len(queries)


def subset_rows(n: int, limit: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """All of `range(n)` if n ≤ limit, else a fixed random subset of `limit` rows, sorted."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def pr_subset(features: torch.Tensor) -> torch.Tensor:
    """The rows of a feature set that take part in precision and recall (at most PR_MAX_IMAGES)."""
    return features[torch.from_numpy(subset_rows(len(features), PR_MAX_IMAGES)).to(features.device)]


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = PR_K, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real`.

    precision: share of fake features inside the real manifold; recall: share of real
    features inside the fake manifold. `real_radii`, when given, are `knn_radii(real, k)`.
    """
    if real_radii is None:
        real_radii = knn_radii(real, k)
    precision = share_inside(fake, real, real_radii)
    recall = share_inside(real, fake, knn_radii(fake, k))
    return precision, recall


# --------------------------------------------------------------------------- one set against another


@dataclass(frozen=True)
class Distances:
    """One set of features against a reference. Precision and recall are None when a
    side has at most k = 3 features."""

    fd: float
    kid_mean: float
    kid_std: float
    precision: float | None
    recall: float | None


def reference_radii(features: torch.Tensor) -> torch.Tensor:
    """k-NN radii of the reference side's precision/recall subset (empty when N ≤ k)."""
    return knn_radii(pr_subset(features)) if len(features) > PR_K else torch.empty(0, dtype=torch.float64)


def distances_to_reference(
    fake: torch.Tensor, real: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, radii: torch.Tensor,
) -> Distances:
    """FD, KID and precision/recall of `fake` features against the reference `real`, whose
    Gaussian (μ, Σ) and k-NN radii are already known (cached), all on `fake`'s device."""
    device = fake.device
    fake_mu, fake_sigma = gaussian_stats(fake)
    fd = frechet_distance(fake_mu, fake_sigma, mu.to(device), sigma.to(device))
    kid_mean, kid_std = kernel_distance(fake, real.to(device))
    precision = recall = None
    if len(fake) > PR_K and len(radii):
        precision, recall = precision_recall(pr_subset(real.to(device)), pr_subset(fake), real_radii=radii.to(device))
    return Distances(fd, kid_mean, kid_std, precision, recall)
