"""The run directory: what a training run writes, and the rules for starting over.

    RUN/config.toml          resolved config of the run
    RUN/metrics.csv          one row per update
    RUN/metrics.png          loss curves
    RUN/previews/            preview grids during training
    RUN/checkpoints/step-00000500/{state.pt, rng-0.pt, …}   resumable training state
    RUN/latent-cache.safetensors                            denoiser runs: the encoded training set
    RUN/vae.safetensors or RUN/denoiser.safetensors         the exported model

A new run in a directory that already holds one is refused unless `--resume` (continue
from the newest complete checkpoint) or `--overwrite` (start over) is given.
Checkpoints are written to a temporary folder and renamed into place, so a process
killed during a save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ldm_cli.common.files import check_writable
from ldm_cli.errors import UsageError

CONFIG_FILE = "config.toml"
METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
CHECKPOINTS = "checkpoints"
PREVIEWS = "previews"
LATENT_CACHE = "latent-cache.safetensors"  # denoiser runs: encoded training set
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_RUN_MARKERS = (CONFIG_FILE, METRICS_CSV, CHECKPOINTS)


def export_name(task_name: str) -> str:
    """The exported model of a run: `vae.safetensors` or `denoiser.safetensors`."""
    return f"{task_name}.safetensors"


def holds_run(run_dir: Path) -> bool:
    """True when `run_dir` already has the files of a training run."""
    return any((run_dir / name).exists() for name in _RUN_MARKERS)


def check_start(run_dir: Path, resume: bool, overwrite: bool, export_name: str) -> None:
    """Refuse (exit 2) to start where starting would lose or mix up earlier work."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output '{run_dir}': exists and is not a folder")
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UsageError(f"--resume: '{run_dir}' holds no complete checkpoint to resume from")
        return
    if not overwrite and (holds_run(run_dir) or (run_dir / export_name).exists()):
        raise UsageError(
            f"output '{run_dir}': already holds a run; pass --resume to continue it or --overwrite to start over"
        )
    check_writable(run_dir)


def clear_run(run_dir: Path, export_name: str) -> None:
    """For `--overwrite`: remove the earlier run's files (only those a run writes)."""
    for name in (CONFIG_FILE, METRICS_CSV, METRICS_PNG, LATENT_CACHE, export_name):
        (run_dir / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, PREVIEWS):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale temporary folders."""
    for _, folder in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    root = run_dir / CHECKPOINTS
    for child in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(child, ignore_errors=True)
