"""The one training loop both models share, on Hugging Face Accelerate.

Read it top to bottom like nanoGPT's loop: build the accelerator, decide where the run
starts, build the task, then for each update: draw this process's share of the global
batch, accumulate gradients, clip, step AdamW and the EMA, log, and now and then save a
resumable checkpoint and draw previews. Everything random is a function of the seed
and the step (the data order) or lives in the checkpointed RNG state (flips, noise,
timesteps), so a resumed run continues exactly where it stopped.

Batch size: `train.batch_size` is the GLOBAL batch of one update; each process draws
batch_size / (world_size × grad_accum_steps) examples per micro-step.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from ldm_cli import rundir
from ldm_cli.config import LoggingConfig, OptimConfig, TrainConfig, to_toml
from ldm_cli.ema import EMA
from ldm_cli.errors import ConfigError, LdmError
from ldm_cli.progress import ProgressReporter, setup_logging
from ldm_cli.viz import plot_metrics

logger = logging.getLogger("ldm")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on a signal after saving; requeue it


@dataclass
class TrainTask:
    """What one model family gives the shared loop."""

    name: str  # "vae" or "denoiser": the exported file is f"{name}.safetensors"
    model: nn.Module
    num_examples: int
    get_batch: Callable[[torch.Tensor], torch.Tensor]  # example indices → CPU batch
    loss: Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]
    export: Callable[[nn.Module, Path], None]  # eval model, run dir → writes the .safetensors
    preview: Callable[[nn.Module, int, Path], None] | None = None  # eval model, step, run dir
    metric_panels: list[str] = field(default_factory=lambda: ["loss"])
    log_scale_panels: list[str] = field(default_factory=list)


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


# --------------------------------------------------------------------------- set-up


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator on CUDA when present, else a real (gloo) CPU process group."""
    AcceleratorState._reset_state(reset_partial_state=False)  # allow several runs per process
    on_cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=not on_cuda, mixed_precision=precision)


def per_process_batch(cfg: TrainConfig, world_size: int) -> int:
    """Examples one process draws per micro-step; the global batch must divide evenly."""
    parts = world_size * cfg.grad_accum_steps
    if cfg.batch_size % parts:
        raise ConfigError(
            [f"train.batch_size {cfg.batch_size} is not divisible by world size {world_size}"
             f" × grad_accum_steps {cfg.grad_accum_steps}"]
        )
    return cfg.batch_size // parts


class BatchOrder:
    """Which examples each process sees at each update — a pure function of the step.

    Epoch e is the permutation drawn from seed + e; update s takes the s-th slice of
    `global_batch` examples of its epoch; micro-step m and process r take their own
    contiguous part of it. The union over processes is the same for any world size.
    """

    def __init__(self, num_examples: int, global_batch: int, accum: int, world: int, rank: int, seed: int):
        if num_examples < global_batch:
            raise ConfigError([f"train.batch_size {global_batch} is larger than the training set ({num_examples})"])
        self.n, self.global_batch, self.seed = num_examples, global_batch, seed
        self.micro = global_batch // accum
        self.local = self.micro // world
        self.rank = rank
        self.steps_per_epoch = num_examples // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int, micro_step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        start = within * self.global_batch + micro_step * self.micro + self.rank * self.local
        return self._perm[start : start + self.local]


def learning_rate_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then constant or cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and 1-D scales (Loshchilov & Hutter 2019)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)


# --------------------------------------------------------------------------- preemption


class StopFlag:
    """Set by SIGTERM or SIGUSR1; the loop finishes the step, checkpoints and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every process when any process was signalled (one tiny all-reduce)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, state: dict, keep: int) -> None:
    """Write every process's RNG state and the main process's training state, atomically."""
    final = rundir.checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(state, tmp / rundir.STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        rundir.prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(folder: Path, rank: int) -> tuple[dict, dict | None]:
    """Training state and this process's RNG state (None if saved by a different world size)."""
    state = torch.load(folder / rundir.STATE_FILE, map_location="cpu", weights_only=True)
    rng_file = folder / f"rng-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return state, rng


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """Appends one CSV row per update; on resume, drops rows after the resumed step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.columns: list[str] | None = None
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if rows:
                self.columns = list(rows[0].keys())
            self._rewrite(rows)
        elif path.exists():
            path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            if self.columns:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict[str, float]) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row.keys())
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


# --------------------------------------------------------------------------- the loop


def train(
    build_task: Callable[[Accelerator], TrainTask],
    config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    export_name: str,
) -> TrainResult:
    """Train the task's model under `config` (`.train`, `.optim`, `.logging`) in `run_dir`."""
    tcfg: TrainConfig = config.train
    ocfg: OptimConfig = config.optim
    lcfg: LoggingConfig = config.logging
    accelerator = make_accelerator(tcfg)
    is_main = accelerator.is_main_process
    setup_logging(is_main)
    local_batch = per_process_batch(tcfg, accelerator.num_processes)

    # 1. Where the run starts: refuse before anything is written (every process checks).
    rundir.check_start(run_dir, resume, overwrite, export_name)
    accelerator.wait_for_everyone()
    if is_main:
        if overwrite:
            rundir.clear_run(run_dir, export_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / rundir.CONFIG_FILE).write_text(to_toml(config))
    accelerator.wait_for_everyone()

    # 2. The task: same initial weights everywhere, then a different RNG stream per process.
    torch.manual_seed(tcfg.seed)
    task = build_task(accelerator)
    torch.manual_seed(tcfg.seed * 1000 + 1 + accelerator.process_index)
    order = BatchOrder(task.num_examples, tcfg.batch_size, tcfg.grad_accum_steps,
                       accelerator.num_processes, accelerator.process_index, tcfg.seed)
    raw_model = task.model
    optimizer = make_optimizer(raw_model, ocfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, ocfg, tcfg.max_steps)
    )
    ema = EMA(raw_model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    # 3. Resume: weights, optimizer, schedule, EMA, counters and RNG streams.
    step, nonfinite_total = 0, 0
    if resume:
        folder = rundir.latest_checkpoint(run_dir)
        state, rng = load_checkpoint(folder, accelerator.process_index)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, nonfinite_total = int(state["step"]), int(state["nonfinite_total"])
        if rng is not None:
            restore_rng_state(rng)
        logger.info(f"resuming {run_dir} from step {step}")
    metrics = MetricsLog(run_dir / rundir.METRICS_CSV, step if resume else None) if is_main else None
    if step >= tcfg.max_steps:
        logger.info(f"{run_dir} is already at step {step} of {tcfg.max_steps}; nothing to train")

    def training_state() -> dict:
        return {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
            "step": step, "nonfinite_total": nonfinite_total,
        }

    def eval_model() -> nn.Module:
        return ema.shadow if ema is not None else raw_model

    def checkpoint_and_draw() -> None:
        save_checkpoint(accelerator, run_dir, step, training_state(), lcfg.keep_checkpoints)
        if is_main:
            plot_metrics(run_dir / rundir.METRICS_CSV, run_dir / rundir.METRICS_PNG,
                         task.metric_panels, task.log_scale_panels)

    logger.info(
        f"training {task.name}: {tcfg.max_steps} updates, global batch {tcfg.batch_size} "
        f"({accelerator.num_processes} process(es) × {local_batch} × {tcfg.grad_accum_steps} accumulation), "
        f"{task.num_examples} examples, device {accelerator.device}, precision {accelerator.mixed_precision}"
    )
    start_step, nonfinite_in_row, preempted = step, 0, False
    started = time.perf_counter()
    model.train()
    with StopFlag() as stop, ProgressReporter(f"train {task.name}", tcfg.max_steps, step, lcfg.log_every, is_main) as bar:
        while step < tcfg.max_steps:
            # -- one update: accumulate gradients over micro-steps, then clip and step.
            logs: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(tcfg.grad_accum_steps):
                batch = task.get_batch(order.indices(step, micro)).to(accelerator.device, non_blocking=True)
                last = micro == tcfg.grad_accum_steps - 1
                with (nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
                    loss, parts = task.loss(model, batch, step)
                accelerator.backward(loss / tcfg.grad_accum_steps)
                loss_sum += loss.item() / tcfg.grad_accum_steps
                for k, v in parts.items():
                    logs[k] = logs.get(k, 0.0) + v / tcfg.grad_accum_steps
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm(ocfg))
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)).item())
            if finite:
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update(raw_model)
                nonfinite_in_row = 0
            else:
                nonfinite_total += 1
                nonfinite_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if not finite:
                logger.warning(f"step {step}: non-finite loss or gradient; update skipped")
                if nonfinite_in_row >= lcfg.max_nonfinite_in_row:
                    last_good = rundir.latest_checkpoint(run_dir)
                    raise LdmError(
                        f"training stopped: {nonfinite_in_row} non-finite losses in a row at step {step}; "
                        f"last good checkpoint: {last_good or 'none'} (lower optim.lr or check the data)"
                    )
            if is_main:
                row = {"step": step, "loss": loss_sum, **logs, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if finite else float("nan"),
                       "time": time.perf_counter() - started}
                metrics.append(row)
            bar.advance(f"loss {loss_sum:.4f}")

            # -- now and then: checkpoint, plot, preview; on a signal, save and leave.
            if stop.agreed(accelerator):
                checkpoint_and_draw()
                preempted = True
                logger.warning(f"stop requested: saved a checkpoint at step {step}; resume with --resume")
                break
            if step % lcfg.checkpoint_every == 0 and step < tcfg.max_steps:
                checkpoint_and_draw()
            if task.preview is not None and is_main and step % lcfg.preview_every == 0 and step < tcfg.max_steps:
                task.preview(eval_model(), step, run_dir)

    seconds = time.perf_counter() - started
    export_path = None
    if not preempted:
        if step > start_step or rundir.latest_checkpoint(run_dir) is None:
            checkpoint_and_draw()
        if is_main:
            if task.preview is not None:
                task.preview(eval_model(), step, run_dir)
            task.export(eval_model(), run_dir)
            export_path = run_dir / export_name
        accelerator.wait_for_everyone()
    done = step - start_step
    return TrainResult(
        run_dir=run_dir, steps_done=done, final_step=step, seconds=seconds,
        steps_per_second=done / seconds if seconds > 0 else 0.0, skipped_nonfinite=nonfinite_total,
        preempted=preempted, world_size=accelerator.num_processes, export_path=export_path,
    )


def max_grad_norm(cfg: OptimConfig) -> float:
    """Max gradient norm for clipping; infinity when clipping is off (norm still measured)."""
    return cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
