"""The run directory: what a training run writes, and the rules for starting over.

    RUN/config.toml          resolved config of the run
    RUN/metrics.csv          one row per update
    RUN/metrics.png          loss curves
    RUN/previews/            preview grids during training
    RUN/checkpoints/step-00000500/{state.pt, rng-0.pt, …}   resumable training state
    RUN/latent-cache.safetensors                            denoiser runs: the encoded training set
    RUN/vae.safetensors or RUN/denoiser.safetensors         the exported model

    RUN/.lock                                               held while a trainer runs there

A folder is a run when it holds a complete checkpoint or an exported model. A new run
in such a folder is refused unless `--resume` (continue from the newest complete
checkpoint) or `--overwrite` (start over) is given; a folder with only the leftovers of
a start that never reached its first checkpoint is started over without asking. One
trainer at a time: `RunLock`. Checkpoints are written to a temporary folder and renamed
into place, so a process killed during a save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ldm_cli.common.files import check_writable, temporary_sibling
from ldm_cli.errors import UsageError

logger = logging.getLogger("ldm")

CONFIG_FILE = "config.toml"
METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
CHECKPOINTS = "checkpoints"
PREVIEWS = "previews"
LATENT_CACHE = "latent-cache.safetensors"  # denoiser runs: encoded training set
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
LOCK_FILE = ".lock"


def export_name(task_name: str) -> str:
    """The exported model of a run: `vae.safetensors` or `denoiser.safetensors`."""
    return f"{task_name}.safetensors"


class StartMode(Enum):
    """How a run starts in its folder (decided by `check_start` before anything is written)."""

    FRESH = "fresh"  # nothing there yet
    RESUME = "resume"  # continue from the newest complete checkpoint
    RESTART = "restart"  # the folder holds only the leftovers of a run that never saved a checkpoint
    OVERWRITE = "overwrite"  # --overwrite: the earlier run's files go once the new one can start

    @property
    def clears(self) -> bool:
        return self in (StartMode.RESTART, StartMode.OVERWRITE)


def leftovers(run_dir: Path) -> list[str]:
    """Files a run writes before its first checkpoint (config.toml, metrics, previews)."""
    return [name for name in (CONFIG_FILE, METRICS_CSV, METRICS_PNG, PREVIEWS) if (run_dir / name).exists()]


def check_start(run_dir: Path, resume: bool, overwrite: bool, export_name: str) -> StartMode:
    """Refuse (exit 2) to start where starting would lose or mix up earlier work.

    A folder is a run when it holds a complete checkpoint or an exported model. A folder
    with only the leftovers of a start that failed or was stopped before its first
    checkpoint is not: it is started over (and the caller says so), with or without
    --resume.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output '{run_dir}': exists and is not a folder")
    has_checkpoint = latest_checkpoint(run_dir) is not None
    is_run = has_checkpoint or (run_dir / export_name).exists()
    if resume:
        if has_checkpoint:
            return StartMode.RESUME
        if is_run:
            raise UsageError(f"--resume: '{run_dir}' holds a finished run but no checkpoint to resume from")
        if not leftovers(run_dir):
            raise UsageError(f"--resume: '{run_dir}' holds no complete checkpoint to resume from")
        return StartMode.RESTART
    if is_run and not overwrite:
        raise UsageError(
            f"output '{run_dir}': already holds a run; pass --resume to continue it or --overwrite to start over"
        )
    check_writable(run_dir)
    if overwrite and is_run:
        return StartMode.OVERWRITE
    return StartMode.RESTART if leftovers(run_dir) else StartMode.FRESH


def clear_run(run_dir: Path, export_name: str) -> None:
    """Remove an earlier run's files (only those a run writes). The latent cache stays:
    its key says whether it still fits (`ldm_cli.training.latent_cache`)."""
    for name in (CONFIG_FILE, METRICS_CSV, METRICS_PNG, export_name):
        (run_dir / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, PREVIEWS):
        shutil.rmtree(run_dir / name, ignore_errors=True)


# --------------------------------------------------------------------------- the lock


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: float

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """False only when it is known to be gone: a dead pid on this host."""
        if self.host != socket.gethostname():
            return True  # cannot look into another host
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_lock(path: Path) -> LockOwner | None:
    try:
        record = json.loads(path.read_text())
        return LockOwner(int(record["pid"]), str(record["host"]), float(record["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """An exclusive claim on a run folder: RUN/.lock holds the owner's pid and host.

    Only the main process of a (distributed) run takes it; the others share it. A lock
    whose owner is a dead process on this host is stale and taken over, with a warning.
    A lock held by a live process, or by another host, refuses the second trainer with
    one line naming the holder. The lock is removed when the run ends, however it ends;
    a folder the lock created and that stayed empty is removed with it.
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / LOCK_FILE
        self.created_dir = False

    def acquire(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"output '{self.run_dir}': exists and is not a folder")
        check_writable(self.run_dir)
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The lock appears whole or not at all: written aside, then hard-linked into place
        # (link fails if the lock exists). A lock created empty and filled afterwards
        # would, for a moment, look unreadable — stale — to a second trainer.
        owner = temporary_sibling(self.path)
        owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        try:
            for _attempt in range(2):
                try:
                    os.link(owner, self.path)
                    return
                except FileExistsError:
                    self._handle_existing()
        finally:
            owner.unlink(missing_ok=True)
        raise UsageError(f"output '{self.run_dir}': could not take its lock {self.path}")

    def _handle_existing(self) -> None:
        owner = read_lock(self.path)
        if owner is not None and owner.is_alive() and not owner.is_this_process():
            raise UsageError(
                f"output '{self.run_dir}': another trainer is using it (pid {owner.pid} on {owner.host}, since "
                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(owner.started))}); wait for it, use another --out, "
                f"or delete {self.path} if that run is gone"
            )
        what = "unreadable" if owner is None else f"left by pid {owner.pid} on {owner.host}, which is gone"
        logger.warning(f"taking over the stale lock of '{self.run_dir}' ({what})")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        owner = read_lock(self.path)
        if owner is not None and owner.is_this_process():
            self.path.unlink(missing_ok=True)
        if self.created_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


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
