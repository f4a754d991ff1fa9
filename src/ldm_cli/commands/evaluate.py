"""`ldm evaluate`: FID, KID and precision/recall of generated images against a data set.

Both sets go through the same feature network (`ldm_cli.features`: torchvision's
Inception v3 from a local file, or any TorchScript module) and are compared in its
feature space:

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

With the default network the numbers are comparable between ldm runs but not with
published FIDs (see `ldm_cli.features`). FID is biased upward for small sets: compare
runs with the same number of samples.

Samples are a folder of images, as `ldm sample` writes them (its `images/` subfolder
is used when given the sample folder itself). The reference is any ldm data source
(folder, zip, builtin:faces), prepared by `ldm_cli.data` at the samples' resolution, so
both sets are compared at the size the model generates.

The reference side's statistics (μ, Σ, its features and k-NN radii) are cached as a
safetensors file in the data cache folder (`$LDM_CACHE_DIR`, else ~/.cache/ldm), keyed
by the source (with its file list), the resolution, the number of reference images and
the feature network's identity (a hash of its file). Features are computed in batches;
only the D-dimensional features are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.config import DataConfig
from ldm_cli.data import (
    cache_dir_for, cache_stem, list_image_files, load_image_file, load_images, make_cache_dir, read_cache,
    resolve_source, temporary_path,
)
from ldm_cli.errors import UsageError
from ldm_cli.features import FeatureNetwork, load_feature_network
from ldm_cli.progress import ProgressReporter

logger = logging.getLogger("ldm")

STATS_FORMAT = 1  # bump whenever what the cached reference statistics hold changes
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
PR_MAX_IMAGES = 10_000
SUBSET_SEED = 0
DISTANCE_CHUNK = 1024  # rows of a pairwise-distance block
STATS_CHUNK = 4096  # rows per step when accumulating the covariance
PROGRESS_EVERY = 500  # images between log lines when output is not a terminal (at least)


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
    """Eigenvalues of a PSD matrix with rounding noise removed: those within d·ε·max of zero become 0.

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


# --------------------------------------------------------------------------- feature extraction


def extract_features(net: FeatureNetwork, batches: Iterator[torch.Tensor], total: int, what: str) -> torch.Tensor:
    """Features `(total, D)` float32 of uint8 image batches; only the features are kept."""
    features: torch.Tensor | None = None
    done = 0
    with ProgressReporter(f"features of {what}", total=total, every=max(PROGRESS_EVERY, total // 10)) as progress:
        for images in batches:
            batch = net(images)
            if features is None:
                features = torch.empty(total, batch.shape[1], dtype=torch.float32)
            features[done:done + len(batch)] = batch
            done += len(batch)
            for _ in range(len(batch)):
                progress.advance()
    assert features is not None and done == total, "every image yields one feature vector"
    return features


# --------------------------------------------------------------------------- the samples


def samples_folder(samples: Path) -> Path:
    """The folder of sample images: `samples/images` when given an `ldm sample` output folder."""
    if not samples.exists():
        raise UsageError(f"--samples '{samples}': no such folder")
    if not samples.is_dir():
        raise UsageError(f"--samples '{samples}': not a folder (expected a folder of generated images)")
    nested = samples / "images"
    if nested.is_dir() and list_image_files(nested):
        return nested  # `ldm sample -o DIR` writes DIR/grid.png and DIR/images/000000.png …
    return samples


def sample_files(samples: Path) -> list[Path]:
    """The image files of the samples folder, sorted; at least 2 (a covariance needs them)."""
    folder = samples_folder(samples)
    files = [folder / name for name in list_image_files(folder)]
    if not files:
        raise UsageError(f"--samples '{samples}': holds no images (.png, .jpg, .jpeg, .webp, .bmp)")
    if len(files) < 2:
        raise UsageError(f"--samples '{samples}': holds {len(files)} image; at least 2 are needed")
    return files


def sample_resolution(path: Path) -> int:
    """The side of the first sample (the short side, as data preparation crops to a square)."""
    try:
        with Image.open(path) as image:
            side = min(image.size)
    except Exception as err:  # PIL raises many types for a file that is not an image
        raise UsageError(f"sample '{path}': not a usable image ({err})") from None
    if not 8 <= side <= 4096:
        raise UsageError(f"sample '{path}': {side}px; evaluate needs images of 8 to 4096 pixels")
    return side


def sample_batches(files: list[Path], resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 `(B, 3, R, R)` batches of the sample files, decoded as data sets are."""
    for start in range(0, len(files), batch_size):
        yield torch.stack([load_image_file(f, resolution) for f in files[start:start + batch_size]])


# --------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class ReferenceStats:
    """What the reference side contributes, computed once and cached."""

    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    features: torch.Tensor  # (N, D) float32, for KID
    radii: torch.Tensor  # k-NN radii of pr_subset(features); empty when N ≤ k


def reference_config(reference: str, resolution: int, num_reference: int | None) -> DataConfig:
    """The DataConfig that reads `reference` at `resolution` without disturbing its data cache.

    The data cache holds one train/held-out split; reading it with another split would
    rewrite it, so an existing cache's split is reused (both parts are read here), and
    a new one is made without a held-out part. `--num-reference` sets how many faces
    builtin:faces draws.
    """
    cfg = DataConfig(source=reference, resolution=resolution, holdout_fraction=0.0,
                     **({"builtin_size": num_reference} if num_reference else {}))
    index_path = cache_dir_for(cfg) / f"{cache_stem(resolve_source(cfg), resolution)}.json"
    cached = read_cache(index_path, resolution)
    if cached is not None:
        index = cached[0]
        cfg = cfg.model_copy(update={"holdout_fraction": index.holdout_fraction, "seed": index.seed})
    return cfg


def stats_path(cfg: DataConfig, net: FeatureNetwork, num_reference: int | None) -> Path:
    """The cache file of one reference source, resolution, subset size and feature network."""
    identity = {"format": STATS_FORMAT, "network": net.identity, "num_reference": num_reference,
                "kid": [KID_SUBSETS, KID_SUBSET_SIZE], "pr": [PR_K, PR_MAX_IMAGES, SUBSET_SEED]}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    stem = cache_stem(resolve_source(cfg), cfg.resolution)
    return cache_dir_for(cfg) / f"{stem}-fidstats-{key}.safetensors"


def read_stats(path: Path, net: FeatureNetwork) -> ReferenceStats | None:
    """Cached reference statistics if `path` holds a complete, matching file; else None."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        stats = ReferenceStats(tensors["mu"], tensors["sigma"], tensors["features"], tensors["radii"])
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        logger.warning("reference statistics '%s': unreadable (%s); computing them again", path, err)
        return None
    n, d = stats.features.shape
    consistent = (stats.mu.shape == (d,) and stats.sigma.shape == (d, d)
                  and len(stats.radii) in (0, min(n, PR_MAX_IMAGES)))
    if meta.get("format") != str(STATS_FORMAT) or meta.get("network") != net.identity or not consistent:
        return None
    return stats


def write_stats(path: Path, stats: ReferenceStats, net: FeatureNetwork, source: str, resolution: int) -> None:
    """Write reference statistics as safetensors (no pickle), beside the final name, then rename."""
    tensors = {"mu": stats.mu, "sigma": stats.sigma, "features": stats.features, "radii": stats.radii}
    metadata = {"format": str(STATS_FORMAT), "network": net.identity, "network_name": net.name,
                "source": source, "resolution": str(resolution), "count": str(len(stats.features))}
    tmp = temporary_path(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def reference_batches(parts: list[torch.Tensor], rows: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of the chosen `rows` of the reference, read across its train and held-out parts."""
    offsets = np.cumsum([0] + [len(p) for p in parts])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pieces = []
        for part, lo, hi in zip(parts, offsets[:-1], offsets[1:]):
            inside = chunk[(chunk >= lo) & (chunk < hi)] - lo
            if len(inside):
                pieces.append(part[torch.from_numpy(inside)])
        yield torch.cat(pieces)


def compute_reference(
    cfg: DataConfig, net: FeatureNetwork, num_reference: int | None, batch_size: int
) -> ReferenceStats:
    """Load the reference images (through the data cache) and reduce them to statistics."""
    image_set = load_images(cfg)
    parts = [image_set.train, image_set.holdout]
    available = sum(len(p) for p in parts)
    rows = subset_rows(available, num_reference or available)
    if num_reference and num_reference > available:
        logger.info("reference %r holds %d images, fewer than --num-reference %d; using all",
                    cfg.source, available, num_reference)
    if len(rows) < 2:
        raise UsageError(f"--reference {cfg.source!r}: holds {len(rows)} usable image; at least 2 are needed")
    features = extract_features(net, reference_batches(parts, rows, batch_size), len(rows), "reference")
    on_device = features.to(net.device)
    mu, sigma = gaussian_stats(on_device)
    radii = knn_radii(pr_subset(on_device)) if len(rows) > PR_K else torch.empty(0, dtype=torch.float64)
    return ReferenceStats(mu.cpu(), sigma.cpu(), features, radii.cpu())


def reference_stats(
    cfg: DataConfig, net: FeatureNetwork, num_reference: int | None, batch_size: int
) -> tuple[ReferenceStats, Path, bool]:
    """The reference statistics, from the cache when it matches: (stats, cache file, reused)."""
    path = stats_path(cfg, net, num_reference)
    cached = read_stats(path, net)
    if cached is not None:
        logger.info("reference statistics from %s", path)
        return cached, path, True
    stats = compute_reference(cfg, net, num_reference, batch_size)
    make_cache_dir(cfg)
    write_stats(path, stats, net, cfg.source, cfg.resolution)
    return stats, path, False


# --------------------------------------------------------------------------- the command


@dataclass
class EvaluationReport:
    """What `ldm evaluate` measured. Precision and recall are None when a side has ≤ k images."""

    fid: float
    kid_mean: float
    kid_std: float
    precision: float | None
    recall: float | None
    n_samples: int
    n_reference: int
    network: str
    resolution: int
    reference_cache: Path
    reference_cached: bool  # the reference statistics came from the cache
    seconds: float = 0.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_evaluate_args(batch_size: int, num_reference: int | None) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if num_reference is not None and num_reference < 2:
        raise UsageError(f"--num-reference {num_reference}: must be at least 2")


def run_evaluate(
    samples: Path, reference: str, *, inception_weights: Path | None = None, features: Path | None = None,
    features_size: int | None = None, batch_size: int = 50, num_reference: int | None = None,
    device: torch.device | str | None = None,
) -> EvaluationReport:
    """FID, KID and precision/recall of the images in `samples` against the data source `reference`."""
    started = time.perf_counter()
    check_evaluate_args(batch_size, num_reference)
    files = sample_files(Path(samples))
    resolution = sample_resolution(files[0])
    cfg = reference_config(reference, resolution, num_reference)  # checks the source before any heavy work
    device = torch.device(device) if device is not None else default_device()
    net = load_feature_network(inception_weights, features, features_size, device)
    ref, cache_path, reused = reference_stats(cfg, net, num_reference, batch_size)

    fake = extract_features(net, sample_batches(files, resolution, batch_size), len(files), "samples").to(device)
    real = ref.features.to(device)
    mu, sigma = gaussian_stats(fake)
    fid = frechet_distance(mu, sigma, ref.mu.to(device), ref.sigma.to(device))
    kid_mean, kid_std = kernel_distance(fake, real)
    precision = recall = None
    if len(fake) > PR_K and len(ref.radii):
        precision, recall = precision_recall(pr_subset(real), pr_subset(fake), real_radii=ref.radii.to(device))
    return EvaluationReport(
        fid=fid, kid_mean=kid_mean, kid_std=kid_std, precision=precision, recall=recall, n_samples=len(files),
        n_reference=len(ref.features), network=net.name, resolution=resolution, reference_cache=cache_path,
        reference_cached=reused, seconds=time.perf_counter() - started,
    )


def format_report(report: EvaluationReport) -> list[str]:
    """The lines `ldm evaluate` prints."""
    def share(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else f"n/a (needs more than {PR_K} images per side)"

    kid_scale = 1000
    return [
        f"{report.n_samples} samples vs {report.n_reference} reference images at {report.resolution}px, "
        f"features: {report.network}",
        f"FID        {report.fid:.4f}",
        f"KID ×{kid_scale}   {report.kid_mean * kid_scale:.4f} ± {report.kid_std * kid_scale:.4f}",
        f"precision  {share(report.precision)}",
        f"recall     {share(report.recall)}",
        f"reference statistics {'reused from' if report.reference_cached else 'cached in'} {report.reference_cache}",
    ]

