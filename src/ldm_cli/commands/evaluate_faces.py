"""`ldm evaluate` against `builtin:faces`: the face-attribute network's scores of the
samples beside three references — held-out real faces (the floor), their VAE
reconstructions, and decoded prior samples — and the table that shows them.

The VAE references need the model behind the samples: `--checkpoint`, else the one the
samples folder's sample.json names, else runs/denoiser/denoiser.safetensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.commands.sample_folder import sample_batches
from ldm_cli.config import DataConfig
from ldm_cli.data.cache import holdout_size
from ldm_cli.errors import UsageError
from ldm_cli.evaluation.face_quality import (
    FaceScores,
    heldout_faces,
    load_face_network,
    load_or_build_reference,
    prior_batches,
    reconstruction_batches,
    score_faces,
)
from ldm_cli.evaluation.features import FACES_REFERENCE
from ldm_cli.modelfiles.bundles import DenoiserBundle, load_denoiser
from ldm_cli.training.start import default_model_file

logger = logging.getLogger("ldm")

KID_SCALE = 1000  # KID is printed ×1000


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


# --------------------------------------------------------------------------- the table


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
