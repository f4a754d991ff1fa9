"""The one training loop both models share, on Hugging Face Accelerate.

Read `train` top to bottom like nanoGPT's loop: build the accelerator, decide where the
run starts, build the task, then for each update: draw this process's share of the
global batch, accumulate gradients, clip, step AdamW and the EMA, log, and now and then
save a resumable checkpoint and draw previews. Everything random is a function of the
seed and the step (the data order) or lives in the checkpointed RNG state (flips,
noise, timesteps), so a resumed run continues exactly where it stopped.

A task (`TrainTask`) is what one model family gives the loop: its model, how to fetch
a batch, its loss, its previews and its export (`vae_task.py`, `denoiser_task.py`).

Several processes (`accelerate launch --multi_gpu`, `torchrun`, SLURM through
slurm/train.sh) train one model: gradients are averaged by DDP, every process holds
the same weights, and only the main process logs and writes files. The logged loss is
the mean over all processes, so metrics.csv reads the same for any world size.

Stopping early: SIGTERM or SIGUSR1 (SLURM's warning before the time limit, a
preemption) lets the current update finish, saves a checkpoint on every process and
returns `preempted=True` (the CLI exits with EXIT_PREEMPTED). `--resume` continues
from the newest checkpoint that loads, bit for bit as if never stopped.

Non-finite losses or gradients skip the update (weights, optimizer and EMA untouched)
and are counted; `logging.max_nonfinite_in_row` of them in a row stop the run with an
error naming the last good checkpoint. Weights that are not finite are never saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ldm_cli.common.pictures import plot_metrics
from ldm_cli.common.progress import ProgressReporter, setup_logging
from ldm_cli.config import RunConfig
from ldm_cli.errors import LdmError
from ldm_cli.models.ema import EMA
from ldm_cli.training import rundir
from ldm_cli.training.distributed import (
    BatchOrder,
    StopFlag,
    make_accelerator,
    mean_over_processes,
    per_process_batch,
    weights_are_finite,
)
from ldm_cli.training.memory import check_step_fits, estimate_step
from ldm_cli.training.metrics import MetricsLog
from ldm_cli.training.optim import learning_rate_factor, make_ema, make_optimizer, max_grad_norm
from ldm_cli.training.run_setup import decide_start, run_dir_lock, start_run_dir
from ldm_cli.training.speed import SpeedSettings
from ldm_cli.training.state import resume_state, save_checkpoint
from ldm_cli.training.tracking import check_trackers, end_tracking, log_picture, log_values

logger = logging.getLogger("ldm")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on a signal after saving; requeue it


@dataclass
class TrainTask:
    """What one model family gives the shared loop."""

    name: str  # "vae" or "denoiser": the run config's task_name
    model: nn.Module
    num_examples: int
    get_batch: Callable[[torch.Tensor], torch.Tensor]  # example indices → CPU batch
    loss: Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]
    export: Callable[[nn.Module, Path], None]  # eval model, export path → writes the .safetensors
    preview: Callable[[nn.Module, int, Path], Path] | None = None  # eval model, step, run dir → the picture
    metric_panels: list[str] = field(default_factory=lambda: ["loss"])
    log_scale_panels: list[str] = field(default_factory=list)
    # now and then: eval model, step → numbers for metrics.csv (e.g. sample quality)
    measure: Callable[[nn.Module, int], dict[str, float]] | None = None
    measure_every: int = 0
    measure_columns: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    final_step: int
    seconds: float
    steps_per_second: float
    skipped_nonfinite: int
    preempted: bool
    world_size: int
    export_path: Path | None
    is_main_process: bool = True  # only the main process should print the result
    stop_signal: str | None = None  # "SIGTERM", "SIGUSR1" or "SIGINT" when stopped early


@dataclass
class Run:
    """The objects of one training run, and where it stands."""

    config: RunConfig
    run_dir: Path
    accelerator: Accelerator
    task: TrainTask
    model: nn.Module  # as prepared by Accelerate (DDP-wrapped, maybe compiled)
    raw_model: nn.Module  # the same weights, unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    order: BatchOrder
    identity: dict[str, str]  # what the model depends on beyond its config (saved in checkpoints)
    step: int = 0
    saved_step: int | None = None  # the step of the newest checkpoint on disk, if known
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    metrics: MetricsLog | None = None  # main process only

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def eval_model(self) -> nn.Module:
        """The weights previews and exports use: the EMA when there is one."""
        return self.ema.shadow if self.ema is not None else self.raw_model

    def training_state(self) -> dict:
        return {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "step": self.step, "nonfinite_total": self.nonfinite_total, "identity": self.identity,
        }


@dataclass
class Update:
    """What one optimizer update measured (the same on every process)."""

    loss: float
    parts: dict[str, float]
    grad_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


# --------------------------------------------------------------------------- the loop


def train(
    build_task: Callable[[Accelerator], TrainTask], config: RunConfig, *, resume: bool = False,
    overwrite: bool = False, identity: dict[str, str] | None = None,
) -> TrainResult:
    """Train the task's model as `config` says, in `config.output.dir`.

    Nothing is written into the run folder until the run has proven it can start: the
    folder's lock taken, the settings checked, the task built (data found), the
    checkpoint loaded. ``identity`` names what the model depends on beyond its config
    (the VAE file's digest for a denoiser); a resume under another identity is refused.
    A stop signal (SIGTERM, SIGUSR1, a first Ctrl-C) is honoured from the moment this is
    called: even one that arrives while data is loading lets the run save and stop.
    """
    tcfg, lcfg = config.train, config.logging
    run_dir = Path(config.output.dir)
    with StopFlag() as stop:
        check_trackers(lcfg.report_to)
        accelerator, speed = make_accelerator(tcfg, config.task_name, lcfg.report_to, run_dir)
        setup_logging(accelerator.is_main_process)
        per_process_batch(tcfg, accelerator.num_processes)  # refuse an uneven batch first
        with run_dir_lock(accelerator, run_dir):
            mode = decide_start(accelerator, config, run_dir, resume, overwrite, identity or {})
            run = build_run(build_task, config, run_dir, accelerator, speed, identity or {})
            if mode is rundir.StartMode.RESUME:
                run.step, run.nonfinite_total = resume_state(run_dir, accelerator, run.raw_model, run.optimizer,
                                                             run.scheduler, run.ema, tcfg.seed, run.identity)
                run.saved_step = run.step
            start_run_dir(run, mode)
            log_start(run, speed)

            start_step, stopped_by = run.step, None
            started = time.perf_counter()
            run.model.train()
            with ProgressReporter(f"train {run.task.name}", tcfg.max_steps, run.step, lcfg.log_every,
                                  run.is_main) as bar:
                while run.step < tcfg.max_steps:
                    stopped_by = stop.agreed(accelerator)
                    if stopped_by:  # a signal reached some process: save, then leave
                        stop_early(run, stopped_by)
                        break
                    update = optimizer_update(run)
                    record_update(run, update, time.perf_counter() - started, measure_if_due(run))
                    bar.advance(f"loss {update.loss:.4f}")
                    check_nonfinite_streak(run, update)
                    if run.step < tcfg.max_steps:
                        if run.step % lcfg.checkpoint_every == 0:
                            checkpoint(run)
                        if run.step % lcfg.preview_every == 0:
                            draw_preview(run)
            seconds = time.perf_counter() - started
            export_path = None if stopped_by else finish(run)
            end_tracking(accelerator)

    done = run.step - start_step
    return TrainResult(
        run_dir=run_dir, steps_done=done, final_step=run.step, seconds=seconds,
        steps_per_second=done / seconds if seconds > 0 else 0.0, skipped_nonfinite=run.nonfinite_total,
        preempted=stopped_by is not None, world_size=accelerator.num_processes, export_path=export_path,
        is_main_process=run.is_main, stop_signal=stopped_by,
    )


# --------------------------------------------------------------------------- set-up


def build_run(
    build_task: Callable[[Accelerator], TrainTask], config: RunConfig, run_dir: Path, accelerator: Accelerator,
    speed: SpeedSettings, identity: dict[str, str],
) -> Run:
    """The task with the same initial weights everywhere, then a different RNG stream per
    process; its optimiser, learning-rate schedule and EMA, prepared by Accelerate."""
    tcfg = config.train
    torch.manual_seed(tcfg.seed)
    task = build_task(accelerator)
    torch.manual_seed(tcfg.seed * 1000 + 1 + accelerator.process_index)
    order = BatchOrder(task.num_examples, tcfg.batch_size, tcfg.grad_accum_steps,
                       accelerator.num_processes, accelerator.process_index, tcfg.seed)
    raw_model = task.model
    optimizer = make_optimizer(raw_model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, config.optim, tcfg.max_steps)
    )
    # On the training device before the EMA copies it: prepare() would move only the live model.
    raw_model.to(accelerator.device, memory_format=torch.channels_last if speed.channels_last else torch.preserve_format)
    ema = make_ema(raw_model, tcfg)
    model, optimizer = accelerator.prepare(raw_model, optimizer)  # compiles when speed.compile
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    check_memory(task, raw_model, order, config, accelerator)
    return Run(config, run_dir, accelerator, task, model, raw_model, optimizer, scheduler, ema, order, identity)


def check_memory(task: TrainTask, model: nn.Module, order: BatchOrder, config: RunConfig,
                 accelerator: Accelerator) -> None:
    """Refuse a step that would not fit in memory, before the first one runs (`memory.py`)."""
    def loss_of_one() -> torch.Tensor:
        batch = task.get_batch(order.indices(0, 0)[:1]).to(accelerator.device)
        return task.loss(model, batch, 0)[0]

    examples = per_process_batch(config.train, accelerator.num_processes)
    memory = estimate_step(model, loss_of_one, examples)
    check_step_fits(memory, accelerator.device, config.data.resolution,
                    f"configs/quickstart/{config.task_name}.toml")


def log_start(run: Run, speed: SpeedSettings) -> None:
    tcfg, acc = run.config.train, run.accelerator
    if run.step >= tcfg.max_steps:
        logger.info(f"{run.run_dir} is already at step {run.step} of {tcfg.max_steps}; nothing to train")
        return
    local_batch = per_process_batch(tcfg, acc.num_processes)
    todo = f"{tcfg.max_steps} updates"
    if run.step:
        todo = f"{tcfg.max_steps - run.step} updates (steps {run.step + 1}–{tcfg.max_steps})"
    logger.info(
        f"training {run.task.name}: {todo}, global batch {tcfg.batch_size} "
        f"({acc.num_processes} process(es) × {local_batch} × {tcfg.grad_accum_steps} accumulation), "
        f"{run.task.num_examples} examples, device {acc.device}, precision {acc.mixed_precision}, "
        f"channels-last {speed.channels_last}, TF32 {speed.tf32}, compile {speed.compile}"
    )


# --------------------------------------------------------------------------- one update


def optimizer_update(run: Run) -> Update:
    """Accumulate gradients over the micro-steps of this update, clip, and step — or skip
    the step when the loss or the gradient is not finite (decided alike on every process)."""
    tcfg, acc = run.config.train, run.accelerator
    parts: dict[str, float] = {}
    loss_sum = 0.0
    for micro in range(tcfg.grad_accum_steps):
        batch = run.task.get_batch(run.order.indices(run.step, micro)).to(acc.device, non_blocking=True)
        last = micro == tcfg.grad_accum_steps - 1
        # No autocast here: `accelerator.prepare` ran the model's forward under autocast
        # and returns its outputs in float32, so the loss itself is computed in float32.
        with nullcontext() if last else acc.no_sync(run.model):
            loss, logged = run.task.loss(run.model, batch, run.step)
        acc.backward(loss / tcfg.grad_accum_steps)
        loss_sum += loss.item() / tcfg.grad_accum_steps
        for key, value in logged.items():
            parts[key] = parts.get(key, 0.0) + float(value) / tcfg.grad_accum_steps
    loss_sum, parts = mean_over_processes(acc, loss_sum, parts)
    update = Update(loss_sum, parts, float(acc.clip_grad_norm_(run.model.parameters(), max_grad_norm(run.config.optim))))
    if update.finite:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(run.raw_model)
        run.nonfinite_in_row = 0
    else:  # skip: weights, optimizer moments and EMA stay as they were
        run.nonfinite_total += 1
        run.nonfinite_in_row += 1
    run.scheduler.step()  # the learning rate follows the step count, skipped or not
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return update


def measure_if_due(run: Run) -> dict[str, float]:
    """The task's now-and-then measurement (main process), at its steps and the last one."""
    task, every = run.task, run.task.measure_every
    due = every > 0 and (run.step % every == 0 or run.step == run.config.train.max_steps)
    if task.measure is None or not due or not run.is_main:
        return {}
    return task.measure(run.eval_model(), run.step)


def record_update(run: Run, update: Update, elapsed: float, measured: dict[str, float]) -> None:
    """One row of metrics.csv (main process), and the same values for the trackers; the
    columns of measurements stay empty on the updates without one."""
    values = {"loss": update.loss, **update.parts, "lr": run.scheduler.get_last_lr()[0],
              "grad_norm": update.grad_norm if update.finite else float("nan")}
    if run.metrics is not None:
        run.metrics.append({"step": run.step, **values, "time": elapsed,
                            **{column: measured.get(column, "") for column in run.task.measure_columns}})
    log_values(run.accelerator, {**values, **measured}, run.step)


def check_nonfinite_streak(run: Run, update: Update) -> None:
    """Warn about a skipped update; stop the run after too many in a row."""
    if update.finite:
        return
    logger.warning(f"step {run.step}: non-finite loss or gradient; update skipped")
    if run.nonfinite_in_row >= run.config.logging.max_nonfinite_in_row:
        raise LdmError(
            f"training stopped: {run.nonfinite_in_row} non-finite losses in a row at step {run.step}; "
            f"last good checkpoint: {rundir.latest_checkpoint(run.run_dir) or 'none'} "
            "(lower optim.lr or check the data)"
        )


# --------------------------------------------------------------------------- now and then


def checkpoint(run: Run) -> None:
    """Save a resumable checkpoint on every process, then redraw the metrics plot."""
    if not weights_are_finite(run.accelerator, run.raw_model):
        raise LdmError(
            f"training stopped: the model's weights are not finite at step {run.step}; they were not saved; "
            f"last good checkpoint: {rundir.latest_checkpoint(run.run_dir) or 'none'} (lower optim.lr)"
        )
    save_checkpoint(run.accelerator, run.run_dir, run.step, run.training_state(), run.config.logging.keep_checkpoints)
    run.saved_step = run.step
    metrics_csv = run.run_dir / rundir.METRICS_CSV
    if run.is_main and metrics_csv.is_file():  # none yet when stopped before step 1
        plot_metrics(metrics_csv, run.run_dir / rundir.METRICS_PNG, run.task.metric_panels, run.task.log_scale_panels)


def draw_preview(run: Run) -> None:
    if run.task.preview is not None and run.is_main:
        log_picture(run.accelerator, run.task.preview(run.eval_model(), run.step, run.run_dir), run.step)


def stop_early(run: Run, signal_name: str) -> None:
    """On a stop signal: make sure the current step is saved (step 0 too: a requeued job
    then resumes exactly where this one stopped)."""
    if run.saved_step != run.step:
        checkpoint(run)
    how = "Ctrl-C" if signal_name == "SIGINT" else signal_name
    logger.warning(f"stopped by {how}: saved a checkpoint at step {run.step}; resume with --resume")


def finish(run: Run) -> Path | None:
    """The last checkpoint, preview and export; returns the exported file (main process)."""
    if run.saved_step != run.step:
        checkpoint(run)
    export_path = None
    if run.is_main:
        draw_preview(run)
        export_path = run.run_dir / rundir.export_name(run.config.task_name)
        run.task.export(run.eval_model(), export_path)
    run.accelerator.wait_for_everyone()
    return export_path
