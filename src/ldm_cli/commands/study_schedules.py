"""Section 5 of `ldm study`: how the noise schedule affects training.

The studied denoiser's own run config (`config.toml` in its run folder) is trained
again three times for the same number of updates, once with each schedule of
docs/MATH.md §2 — linear, cosine and sigmoid — and nothing else changed: same VAE,
data, model, optimiser, seed. Each run measures its sample quality as it trains
(`[quality]`: FD and legibility of a fixed draw of DDIM samples, every updates/8), so
the result is FD against training updates, one curve per schedule; the final models
are then scored like section 1 (DDIM-50, the study's number of samples).

The runs live in OUT/schedules/<schedule>/. A finished run with the same config is
reused when the study runs again; an interrupted one resumes.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ldm_cli.config import DenoiserRunConfig, load_config, to_toml
from ldm_cli.data.sources import resolve_source
from ldm_cli.errors import UsageError
from ldm_cli.training import rundir
from ldm_cli.training.denoiser_task import train_denoiser

SCHEDULES = ("linear", "cosine", "sigmoid")
CURVE_POINTS = 8  # quality measurements per run


@dataclass(frozen=True)
class QualityCurve:
    """FD and legibility of a schedule's run against its updates, from its metrics.csv."""

    schedule: str
    steps: list[int]
    fd: list[float]
    legibility: list[float]
    denoiser: Path  # the exported model


def run_config_of(checkpoint: Path) -> Path:
    """The `config.toml` of the run that wrote `checkpoint`, and the VAE it names, both checked."""
    path = Path(checkpoint).parent / rundir.CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"--schedules: {path} not found; the noise-schedule section retrains the denoiser from the "
                         "config.toml of its run folder, so pass a denoiser file inside its run folder")
    config = load_config(DenoiserRunConfig, path)
    if resolve_source(config.data).kind != "builtin":
        raise UsageError(f"--schedules: the run trained on {config.data.source!r}; the quality curves need "
                         "builtin:faces, which the face-attribute network reads")
    vae = config.latents.vae
    if vae is None or not Path(vae).is_file():
        raise UsageError(f"--schedules: the VAE the denoiser was trained on, {vae!r} (latents.vae in {path}), "
                         "is not there; run the study from the folder the denoiser was trained in")
    return path


def schedule_config(config_path: Path, schedule: str, updates: int, out_dir: Path) -> DenoiserRunConfig:
    """The run config with another schedule, `updates` updates and a quality curve of CURVE_POINTS points."""
    base = load_config(DenoiserRunConfig, config_path)
    every = max(1, updates // CURVE_POINTS)
    return load_config(DenoiserRunConfig, config_path, updates={
        "diffusion.schedule": schedule, "train.max_steps": updates,
        "optim.warmup_steps": min(base.optim.warmup_steps, updates // 10), "quality.every": every,
        "logging.checkpoint_every": max(1, updates // 2), "logging.preview_every": updates,
        "logging.log_every": every, "output.dir": str(out_dir / "schedules" / schedule),
    })


def is_finished(config: DenoiserRunConfig) -> bool:
    """Whether the run folder already holds this very run, exported."""
    run_dir = Path(config.output.dir)
    saved = run_dir / rundir.CONFIG_FILE
    exported = run_dir / rundir.export_name(config.task_name)
    return exported.is_file() and saved.is_file() and saved.read_text() == to_toml(config)


def train_schedules(config_path: Path, updates: int, out_dir: Path, overwrite: bool) -> list[QualityCurve]:
    """Train (or reuse) one run per schedule and read its quality curve."""
    curves = []
    for schedule in SCHEDULES:
        config = schedule_config(config_path, schedule, updates, out_dir)
        run_dir = Path(config.output.dir)
        if overwrite or not is_finished(config):
            resume = not overwrite and rundir.latest_checkpoint(run_dir) is not None
            train_denoiser(config, resume=resume, overwrite=not resume)
        curves.append(read_curve(schedule, run_dir))
    return curves


def read_curve(schedule: str, run_dir: Path) -> QualityCurve:
    """The rows of metrics.csv that carry a quality measurement."""
    with (run_dir / rundir.METRICS_CSV).open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("fd")]
    return QualityCurve(schedule, [int(r["step"]) for r in rows], [float(r["fd"]) for r in rows],
                        [float(r["legibility"]) for r in rows], run_dir / rundir.export_name("denoiser"))
