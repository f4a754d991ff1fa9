"""`ldm evaluate`: FID, KID and precision/recall of generated images against a data set.

Both sets go through the same feature network (`ldm_cli.evaluation.features`:
torchvision's Inception v3 from a local file, or any TorchScript module) and are
compared in its feature space with FID, KID and improved precision/recall
(`ldm_cli.evaluation.distances`; docs/MATH.md, §7).

With the default network the numbers are comparable between ldm runs but not with
published FIDs (see `ldm_cli.evaluation.features`). FID is biased upward for small sets: compare
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.common.files import atomic_write
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.config import DataConfig
from ldm_cli.data.cache import cache_dir_for, cache_stem, load_images, make_cache_dir, read_cache
from ldm_cli.data.decoding import load_image_file
from ldm_cli.data.sources import list_image_files, resolve_source
from ldm_cli.errors import UsageError
from ldm_cli.evaluation.distances import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    PR_K,
    PR_MAX_IMAGES,
    SUBSET_SEED,
    frechet_distance,
    gaussian_stats,
    kernel_distance,
    knn_radii,
    pr_subset,
    precision_recall,
    subset_rows,
)
from ldm_cli.evaluation.features import FeatureNetwork, load_feature_network

logger = logging.getLogger("ldm")

STATS_FORMAT = 1  # bump whenever what the cached reference statistics hold changes
PROGRESS_EVERY = 500  # images between log lines when output is not a terminal (at least)


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
    with atomic_write(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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

