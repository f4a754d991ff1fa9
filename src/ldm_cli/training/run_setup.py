"""Opening a run folder for training: one trainer at a time (its lock), where the run
starts (fresh, resumed, started over), and the run's own files written only once it has
proven it can start (docs/ARCHITECTURE.md, "Errors and exit codes").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator

from ldm_cli.common.files import atomic_write
from ldm_cli.config import RunConfig, to_toml
from ldm_cli.errors import UsageError
from ldm_cli.training import rundir
from ldm_cli.training.distributed import on_main_for_all
from ldm_cli.training.metrics import MetricsLog
from ldm_cli.training.resume_rules import check_resume_settings
from ldm_cli.training.state import check_newest_identity
from ldm_cli.training.tracking import start_tracking

if TYPE_CHECKING:
    from ldm_cli.training.loop import Run

logger = logging.getLogger("ldm")


@contextmanager
def run_dir_lock(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock (`rundir.RunLock`) for the whole run; the main process
    takes it for every process, and all of them refuse when it cannot."""
    lock = rundir.RunLock(run_dir)
    on_main_for_all(accelerator, lock.acquire,
                    UsageError(f"output '{run_dir}': the main process could not take its lock"))
    try:
        yield
    except KeyboardInterrupt:
        newest = rundir.latest_checkpoint(run_dir)
        logger.warning(f"stopped at once: the newest checkpoint is {newest or 'none'}"
                       + ("; resume with --resume" if newest else ""))
        raise
    finally:
        if accelerator.is_main_process:
            lock.release()


def decide_start(accelerator: Accelerator, config: RunConfig, run_dir: Path, resume: bool,
                 overwrite: bool, identity: dict[str, str]) -> rundir.StartMode:
    """How the run starts (every process checks; nothing is written): refuse what would
    lose or mix up earlier work, and changed settings a resume cannot take."""
    mode = rundir.check_start(run_dir, resume, overwrite, rundir.export_name(config.task_name))
    if mode is rundir.StartMode.RESUME:
        check_resume_settings(run_dir, rundir.CONFIG_FILE, config)
        check_newest_identity(run_dir, accelerator.process_index, identity)
    elif mode is rundir.StartMode.RESTART and accelerator.is_main_process:
        logger.warning(f"'{run_dir}' holds only the start of a run that never saved a checkpoint "
                       f"({', '.join(rundir.leftovers(run_dir))}): starting it over")
    accelerator.wait_for_everyone()
    return mode


def start_run_dir(run: Run, mode: rundir.StartMode) -> None:
    """The run can start: remove what it replaces, write its config and open its metrics."""
    if run.is_main:
        if mode.clears:
            rundir.clear_run(run.run_dir, rundir.export_name(run.config.task_name))
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.run_dir / rundir.CONFIG_FILE) as tmp:
            tmp.write_text(to_toml(run.config))
        resumed_at = run.step if mode is rundir.StartMode.RESUME else None
        run.metrics = MetricsLog(run.run_dir / rundir.METRICS_CSV, resumed_at)
    run.accelerator.wait_for_everyone()
    start_tracking(run.accelerator, run.config)
