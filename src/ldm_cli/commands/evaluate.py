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

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.common.files import atomic_write, claim_outputs
from ldm_cli.common.progress import ProgressReporter
from ldm_cli.config import DataConfig
from ldm_cli.data.cache import cache_dir_for, cache_stem, holdout_size, load_images, make_cache_dir, read_cache
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
from ldm_cli.evaluation.face_quality import (
    KL_SMOOTHING,
    LEGIBLE_P,
    FaceScores,
    heldout_faces,
    load_face_network,
    load_or_build_reference,
    prior_batches,
    reconstruction_batches,
    score_faces,
)
from ldm_cli.evaluation.features import FACES_REFERENCE, FeatureNetwork, load_feature_network, uses_face_network
from ldm_cli.modelfiles.bundles import DenoiserBundle, load_denoiser
from ldm_cli.training.start import default_model_file

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


# --------------------------------------------------------------------------- the model behind the samples

SAMPLE_RECORD = "sample.json"  # `ldm sample` writes it beside grid.png and images/
NO_MODEL_HINT = (
    "pass --checkpoint DENOISER.safetensors, or evaluate a folder written by `ldm sample` "
    "(its sample.json names the checkpoint)"
)


@dataclass(frozen=True)
class ModelChoice:
    """The denoiser file whose VAE makes the VAE-recon and prior references, and how it was found."""

    path: Path
    origin: str  # "--checkpoint", "sample.json" or "default"


def sample_record(samples: Path) -> Path | None:
    """The samples folder's `sample.json` (or that of the sample folder above an `images/` folder)."""
    folder = Path(samples)
    candidates = [folder / SAMPLE_RECORD] + ([folder.parent / SAMPLE_RECORD] if folder.name == "images" else [])
    return next((c for c in candidates if c.is_file()), None)


def recorded_checkpoint(record: Path) -> Path:
    """The checkpoint a `sample.json` names (a relative path is relative to its folder)."""
    try:
        path = Path(json.loads(record.read_text(encoding="utf-8"))["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"'{record}': does not name a checkpoint (not a sample record); pass --checkpoint") from None
    return path if path.is_absolute() else record.parent / path


def choose_model(samples: Path, checkpoint: Path | None) -> tuple[ModelChoice | None, str | None]:
    """(the denoiser to use, None), or (None, why there is none and how to get one)."""
    if checkpoint is not None:
        return ModelChoice(Path(checkpoint), "--checkpoint"), None
    record = sample_record(samples)
    if record is not None:
        path = recorded_checkpoint(record)
        if path.is_file():
            return ModelChoice(path, SAMPLE_RECORD), None
        return None, f"{record} names the checkpoint '{path}', which is not there; pass --checkpoint DENOISER.safetensors"
    default = default_model_file("denoiser")
    if default.is_file():
        return ModelChoice(default, "default"), None
    return None, NO_MODEL_HINT


def load_model(choice: ModelChoice, resolution: int, device: torch.device) -> tuple[DenoiserBundle | None, str | None]:
    """The denoiser bundle on `device`, if it makes images of the samples' size.

    A file named by the user or by sample.json that does not is an error; the default
    run's file is merely skipped (it may belong to another experiment)."""
    bundle = load_denoiser(choice.path)
    if bundle.vae.resolution != resolution:
        problem = f"checkpoint '{choice.path}' makes {bundle.vae.resolution}px images, but the samples are {resolution}px"
        if choice.origin == "default":
            return None, f"{problem}; {NO_MODEL_HINT}"
        raise UsageError(f"{problem}; pass --checkpoint with the denoiser that made them")
    logger.info("VAE reconstructions and prior decodes from %s (%s)", choice.path, choice.origin)
    return bundle.to(device), None


def trained_data(bundle: DenoiserBundle) -> DataConfig:
    """The data the denoiser was trained on (its `data` metadata), else its VAE's."""
    try:
        return DataConfig.model_validate(bundle.metadata["data"])
    except (KeyError, ValueError, TypeError):
        return bundle.vae.data


def faces_config(resolution: int, bundle: DenoiserBundle | None) -> DataConfig:
    """builtin:faces at the samples' resolution, split as the model's training data was
    (when that is builtin:faces with at least 2 held-out faces), else the default split."""
    default = DataConfig(source=FACES_REFERENCE, resolution=resolution)
    if bundle is None:
        return default
    trained = trained_data(bundle)
    if trained.source.strip() != FACES_REFERENCE:
        return default
    if holdout_size(trained.builtin_size, trained.holdout_fraction) < 2:
        logger.warning("the model's builtin:faces data holds out fewer than 2 faces; using the default split "
                       "(%d faces, %g held out), some of which the model may have seen",
                       default.builtin_size, default.holdout_fraction)
        return default
    return default.model_copy(update={"builtin_size": trained.builtin_size,
                                      "holdout_fraction": trained.holdout_fraction, "seed": trained.seed})


# --------------------------------------------------------------------------- the face-attribute scores

FACE_SETS = {"samples": "samples", "floor": "floor", "vae_reconstruction": "VAE recon", "prior": "prior"}


@dataclass
class FaceEvaluationReport:
    """What `ldm evaluate` measured with the face-attribute network. `scores` maps each of
    FACE_SETS to its scores; VAE recon and prior are None without a model (`note` says why)."""

    scores: dict[str, FaceScores | None]
    network: dict[str, object]  # FaceNetwork.describe()
    resolution: int
    data: DataConfig  # builtin:faces as split for the reference (training faces) and the floor (held out)
    n_reference: int
    reference_cache: Path
    reference_cached: bool
    checkpoint: Path | None
    note: str | None
    seconds: float = 0.0
    json_path: Path | None = None


def evaluate_faces(
    samples: Path, files: list[Path], resolution: int, *, checkpoint: Path | None, num_reference: int | None,
    batch_size: int, device: torch.device,
) -> FaceEvaluationReport:
    """Score the sample files and the three references against builtin:faces' training faces."""
    choice, note = choose_model(samples, checkpoint)
    bundle = None
    if choice is not None:
        bundle, note = load_model(choice, resolution, device)
    cfg = faces_config(resolution, bundle)
    network = load_face_network(device=device)
    reference, cache_path, cached = load_or_build_reference(cfg, network, num_reference, batch_size)

    def score(images: torch.Tensor | Iterator[torch.Tensor], what: str, total: int | None = None) -> FaceScores:
        return score_faces(images, reference, network, total=total, batch_size=batch_size, what=what)

    scores: dict[str, FaceScores | None] = dict.fromkeys(FACE_SETS)
    scores["samples"] = score(sample_batches(files, resolution, batch_size), "samples", len(files))
    heldout = heldout_faces(cfg, len(files))
    scores["floor"] = score(heldout, "held-out faces")
    if bundle is not None:
        scores["vae_reconstruction"] = score(reconstruction_batches(bundle.vae, heldout, batch_size),
                                             "VAE reconstructions", len(heldout))
        scores["prior"] = score(prior_batches(bundle.vae, len(files), batch_size), "prior decodes", len(files))
    return FaceEvaluationReport(
        scores=scores, network=network.describe(), resolution=resolution, data=cfg, n_reference=len(reference),
        reference_cache=cache_path, reference_cached=cached, checkpoint=choice.path if bundle is not None else None,
        note=note,
    )


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


KID_SCALE = 1000


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


FACE_ROWS = (  # label, how to read one FaceScores
    ("FD", lambda s: s.fd),
    (f"KID ×{KID_SCALE}", lambda s: s.kid_mean * KID_SCALE),
    ("precision", lambda s: s.precision),
    ("recall", lambda s: s.recall),
    ("legibility", lambda s: s.legibility),
    ("attribute KL", lambda s: s.attribute_kl),
    ("images", lambda s: s.count),
)
HOW_TO_READ = (
    "lower is better for FD, KID and attribute KL, higher for precision, recall and legibility; "
    "floor: held-out real faces, VAE recon: those faces through the VAE, prior: decoded z ~ N(0, I)"
)


def table_cell(value: float | None) -> str:
    """A number for the table: counts as they are, scores to 3 decimals."""
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def face_table(scores: dict[str, FaceScores | None]) -> list[str]:
    """metric × set, the sets without scores left out."""
    shown = [key for key, value in scores.items() if value is not None]
    lines = [f"{'':<13}" + "".join(f"{FACE_SETS[key]:>11}" for key in shown)]
    for label, read in FACE_ROWS:
        lines.append(f"{label:<13}" + "".join(f"{table_cell(read(scores[key])):>11}" for key in shown))
    return lines


def format_face_report(report: FaceEvaluationReport) -> list[str]:
    """The title, the table, how to read it, where VAE recon and prior come from (or how to get them)."""
    network, samples, floor = report.network, report.scores["samples"], report.scores["floor"]
    title = (f"{samples.count} samples vs {report.n_reference} training faces of {FACES_REFERENCE} at "
             f"{report.resolution}px; features: {network['name']} ({network['feature_dim']}-d, "
             f"sha256 {str(network['sha256'])[:12]})")
    lines = [title, *face_table(report.scores), HOW_TO_READ]
    if report.checkpoint is not None:
        lines.append(f"VAE recon and prior: {report.checkpoint}")
    else:
        lines.append(f"VAE recon and prior need the denoiser: {report.note}")
    if floor.count < samples.count:
        lines.append(f"the held-out split holds {floor.count} faces, fewer than the samples: "
                     "FD and KID are biased upward for smaller sets")
    verb = "reused from" if report.reference_cached else "cached in"
    lines.append(f"reference features {verb} {report.reference_cache}")
    if report.json_path:
        lines.append(f"numbers written to {report.json_path}")
    return lines


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
