"""`ldm evaluate`: FID, KID and precision/recall of generated images against a data set.

Against `builtin:faces` with no feature-network flag, the packaged face-attribute
network scores the samples (`ldm_cli.evaluation.face_quality`): FD, KID and
precision/recall in its 192-d features, legibility and attribute KL, each printed
beside three references measured the same way (same image count where the held-out
split allows): the floor (held-out faces vs the training faces), VAE reconstructions
of those held-out faces, and decoded prior samples z ~ N(0, I). The last two need the
denoiser file (it bundles its VAE): `--checkpoint`, else the one the samples folder's
`sample.json` names (written by `ldm sample`), else runs/denoiser/denoiser.safetensors
if it exists; without one, the floor alone is printed, with how to get the others.
The training faces (and their held-out split) are those the denoiser was trained on
when it was trained on builtin:faces, else the default split (4096 faces, 5 % held
out, seed 0); their features are cached like the reference statistics below
(`-facestats-….safetensors`).

Otherwise both sets go through the same feature network (`ldm_cli.evaluation.features`:
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

`--json PATH` writes every number (each set's scores, per-head KL, counts, the network's
identity) for scripts; like every output it is claimed first and written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_cli.commands.evaluate_faces import KID_SCALE, FaceEvaluationReport, evaluate_faces, format_face_report
from ldm_cli.commands.sample_folder import sample_batches, sample_files, sample_resolution
from ldm_cli.common.device import default_device
from ldm_cli.common.files import atomic_write, claim_outputs
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.config import DataConfig
from ldm_cli.data.cache import cache_dir_for, cache_stem, read_cache
from ldm_cli.data.prepare import load_images, make_cache_dir
from ldm_cli.data.sources import resolve_source
from ldm_cli.errors import UsageError
from ldm_cli.evaluation.distances import PR_K, distances_to_reference, gaussian_stats, reference_radii, subset_rows
from ldm_cli.evaluation.face_quality import KL_SMOOTHING, LEGIBLE_P
from ldm_cli.evaluation.features import FeatureNetwork, load_feature_network, uses_face_network
from ldm_cli.evaluation.reference_cache import cache_path, consistent_stats, read_cached, write_cached

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
            progress.advance(by=len(batch))
    assert features is not None and done == total, "every image yields one feature vector"
    return features


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
    return cache_path(cfg, "fidstats", {"format": STATS_FORMAT, "network": net.identity, "num_reference": num_reference})


def read_stats(path: Path, net: FeatureNetwork) -> ReferenceStats | None:
    """Cached reference statistics if `path` holds a complete, matching file; else None."""
    tensors = read_cached(path, STATS_FORMAT, net.identity, "reference statistics")
    if tensors is None or not consistent_stats(tensors):
        return None
    return ReferenceStats(tensors["mu"], tensors["sigma"], tensors["features"], tensors["radii"])


def write_stats(path: Path, stats: ReferenceStats, net: FeatureNetwork, source: str, resolution: int) -> None:
    """Write reference statistics as safetensors (no pickle), atomically."""
    write_cached(path, {"mu": stats.mu, "sigma": stats.sigma, "features": stats.features, "radii": stats.radii},
                 STATS_FORMAT, net.identity, network_name=net.name, source=source, resolution=str(resolution),
                 count=str(len(stats.features)))


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
    return ReferenceStats(mu.cpu(), sigma.cpu(), features, reference_radii(on_device).cpu())


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
    json_path: Path | None = None


def check_evaluate_args(batch_size: int, num_reference: int | None) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if num_reference is not None and num_reference < 2:
        raise UsageError(f"--num-reference {num_reference}: must be at least 2")


def evaluate_in_features(
    files: list[Path], resolution: int, cfg: DataConfig, net: FeatureNetwork, *, num_reference: int | None,
    batch_size: int, device: torch.device,
) -> EvaluationReport:
    """FID, KID and precision/recall of the sample files in the features of `net`."""
    ref, cache_path, reused = reference_stats(cfg, net, num_reference, batch_size)
    fake = extract_features(net, sample_batches(files, resolution, batch_size), len(files), "samples").to(device)
    d = distances_to_reference(fake, ref.features, ref.mu, ref.sigma, ref.radii)
    return EvaluationReport(
        fid=d.fd, kid_mean=d.kid_mean, kid_std=d.kid_std, precision=d.precision, recall=d.recall, n_samples=len(files),
        n_reference=len(ref.features), network=net.name, resolution=resolution, reference_cache=cache_path,
        reference_cached=reused,
    )


def run_evaluate(
    samples: Path, reference: str, *, inception_weights: Path | None = None, features: Path | None = None,
    features_size: int | None = None, batch_size: int = 50, num_reference: int | None = None,
    device: torch.device | str | None = None, checkpoint: Path | None = None, json_path: Path | None = None,
    overwrite: bool = False,
) -> EvaluationReport | FaceEvaluationReport:
    """Score the images in `samples` against the data source `reference`: with the face-attribute
    network for builtin:faces (unless a feature-network flag is given), else FID, KID and
    precision/recall in Inception's or a TorchScript network's features."""
    started = time.perf_counter()
    check_evaluate_args(batch_size, num_reference)
    faces_path = uses_face_network(reference, inception_weights, features, features_size)
    if checkpoint is not None and not faces_path:
        raise UsageError("--checkpoint adds the VAE-recon and prior references, measured with the face-attribute "
                         "network: only against builtin:faces without --inception-weights, --features or --features-size")
    if json_path is not None:
        claim_outputs([Path(json_path)], overwrite)
    files = sample_files(Path(samples))
    resolution = sample_resolution(files[0])
    device = torch.device(device) if device is not None else default_device()
    report: EvaluationReport | FaceEvaluationReport
    if faces_path:
        report = evaluate_faces(Path(samples), files, resolution, checkpoint=checkpoint, num_reference=num_reference,
                                batch_size=batch_size, device=device)
    else:
        cfg = reference_config(reference, resolution, num_reference)  # checks the source before any heavy work
        net = load_feature_network(inception_weights, features, features_size, device)
        report = evaluate_in_features(files, resolution, cfg, net, num_reference=num_reference,
                                      batch_size=batch_size, device=device)
    report.seconds = time.perf_counter() - started
    if json_path is not None:
        report.json_path = write_json(Path(json_path), report_json(report))
    return report


# --------------------------------------------------------------------------- what it prints and writes



def format_report(report: EvaluationReport | FaceEvaluationReport) -> list[str]:
    """The lines `ldm evaluate` prints."""
    if isinstance(report, FaceEvaluationReport):
        return format_face_report(report)

    def share(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else f"n/a (needs more than {PR_K} images per side)"

    return [
        (f"{report.n_samples} samples vs {report.n_reference} reference images at {report.resolution}px, "
         f"features: {report.network}"),
        f"FID        {report.fid:.4f}",
        f"KID ×{KID_SCALE}   {report.kid_mean * KID_SCALE:.4f} ± {report.kid_std * KID_SCALE:.4f}",
        f"precision  {share(report.precision)}",
        f"recall     {share(report.recall)}",
        f"reference statistics {'reused from' if report.reference_cached else 'cached in'} {report.reference_cache}",
        *([f"numbers written to {report.json_path}"] if report.json_path else []),
    ]


def report_json(report: EvaluationReport | FaceEvaluationReport) -> dict[str, object]:
    """Every number of the report, as JSON values."""
    if isinstance(report, EvaluationReport):
        values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(report).items() if k != "json_path"}
        return {"network_kind": "features", **values}
    data = report.data
    return {
        "network_kind": "face-attributes",
        "network": report.network,
        "resolution": report.resolution,
        "reference": {"source": data.source, "split": "train", "count": report.n_reference,
                      "builtin_size": data.builtin_size, "holdout_fraction": data.holdout_fraction, "seed": data.seed,
                      "cache": str(report.reference_cache), "cached": report.reference_cached},
        "checkpoint": str(report.checkpoint) if report.checkpoint is not None else None,
        "note": report.note,
        "legibility_threshold": LEGIBLE_P,
        "attribute_kl": {"direction": "KL(set || reference), nats, of argmax class histograms",
                         "smoothing": KL_SMOOTHING},
        "sets": {key: scores.to_dict() if scores is not None else None for key, scores in report.scores.items()},
        "seconds": report.seconds,
    }


def write_json(path: Path, values: dict[str, object]) -> Path:
    """`values` as indented JSON at `path`, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(values, indent=1) + "\n", encoding="utf-8")
    return path
