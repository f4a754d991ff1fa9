"""The one training loop both models share, on Hugging Face Accelerate.

Read it top to bottom like nanoGPT's loop: build the accelerator, decide where the run
starts, build the task, then for each update: draw this process's share of the global
batch, accumulate gradients, clip, step AdamW and the EMA, log, and now and then save a
resumable checkpoint and draw previews. Everything random is a function of the seed
and the step (the data order) or lives in the checkpointed RNG state (flips, noise,
timesteps), so a resumed run continues exactly where it stopped.

Batch size: `train.batch_size` is the GLOBAL batch of one update; each process draws
batch_size / (world_size × grad_accum_steps) examples per micro-step. The logged loss
is the mean over all processes, so metrics.csv reads the same for any world size.

Several processes (`accelerate launch --multi_gpu`, `torchrun`, SLURM through
slurm/train.sh) train one model: gradients are averaged by DDP, every process holds
the same weights, and only the main process logs and writes files. Each checkpoint
records, per process, its rank, the world size and a SHA-256 digest of its weights
(`rng-{rank}.pt`); the loop checks at every checkpoint that all digests agree.

Stopping early: SIGTERM or SIGUSR1 (SLURM's warning before the time limit, a
preemption) lets the current update finish, saves a checkpoint on every process and
returns `preempted=True` (the CLI exits with EXIT_PREEMPTED). `--resume` continues
from the newest checkpoint that loads, bit for bit as if never stopped.

Non-finite losses or gradients skip the update (weights, optimizer and EMA untouched)
and are counted; `logging.max_nonfinite_in_row` of them in a row stop the run with an
error naming the last good checkpoint. Weights that are not finite are never saved.
"""

from __future__ import annotations

import csv
import hashlib
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
from ldm_cli.errors import CheckpointError, ConfigError, LdmError
from ldm_cli.speed import SpeedSettings, apply_speed_settings, resolve_speed
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
    is_main_process: bool = True  # only the main process should print the result


# --------------------------------------------------------------------------- set-up


def make_accelerator(cfg: TrainConfig) -> tuple[Accelerator, SpeedSettings]:
    """An Accelerator on CUDA when present, else a real (gloo) CPU process group, with
    the speed settings (`ldm_cli.speed`) that `auto` resolves to on this machine."""
    AcceleratorState._reset_state(reset_partial_state=False)  # allow several runs per process
    on_cuda = torch.cuda.is_available()
    speed = resolve_speed(cfg, on_cuda)
    apply_speed_settings(speed)
    precision = "bf16" if speed.bf16 else ("no" if cfg.mixed_precision == "auto" else cfg.mixed_precision)
    accelerator = Accelerator(cpu=not on_cuda, mixed_precision=precision,
                              dynamo_backend="inductor" if speed.compile else "no")
    return accelerator, speed


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


def weights_digest(tensors: dict[str, torch.Tensor] | None) -> str | None:
    """SHA-256 over a state dict's tensors (name, dtype, shape, raw bytes) in sorted key order.

    Equal digests mean bitwise-equal weights: how the loop checks that every process
    holds the same model, and how tests compare ranks without loading every tensor twice.
    """
    if tensors is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            continue
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(value.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def process_record(accelerator: Accelerator, step: int, state: dict) -> dict:
    """What `rng-{rank}.pt` holds: this process's RNG streams, who it is, and its weights' digest."""
    ema = state.get("ema")
    return {
        **rng_state(),
        "process_index": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "step": step,
        "model_sha256": weights_digest(state["model"]),
        "ema_sha256": weights_digest(ema["shadow"]) if ema else None,
    }


def check_ranks_agree(accelerator: Accelerator, record: dict) -> bool:
    """Gather every process's weight digests; warn (main process) when they differ."""
    if accelerator.num_processes == 1:
        return True
    from accelerate.utils import gather_object

    digests = gather_object([(record["process_index"], record["model_sha256"], record["ema_sha256"])])
    if len({(model, ema) for _, model, ema in digests}) == 1:
        return True
    lines = ", ".join(f"rank {rank}: {model[:12]}" for rank, model, _ in digests)
    logger.warning(f"step {record['step']}: processes hold different weights ({lines}); "
                   "distributed training is not in sync")
    return False


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, state: dict, keep: int) -> None:
    """Write every process's `rng-{rank}.pt` and the main process's `state.pt`, atomically.

    Every process must call this (it synchronises). The folder is written as
    `.tmp-step-XXXXXXXX` and renamed into place only once complete, so a save killed
    midway leaves the previous checkpoints whole and is ignored by `--resume`.
    """
    final = rundir.checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    record = process_record(accelerator, step, state)
    torch.save(record, tmp / f"rng-{accelerator.process_index}.pt")
    check_ranks_agree(accelerator, record)
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


_STATE_KEYS = ("model", "optimizer", "scheduler", "step", "nonfinite_total")


def load_checkpoint(folder: Path, rank: int) -> tuple[dict, dict | None]:
    """Training state and this process's record (None when this rank saved none).

    Raises when a file is damaged (truncated, not a checkpoint, missing keys).
    """
    state = torch.load(folder / rundir.STATE_FILE, map_location="cpu", weights_only=True)
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"state.pt lacks {', '.join(missing)}")
    rng_file = folder / f"rng-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return state, rng


def load_newest_checkpoint(run_dir: Path, rank: int) -> tuple[Path, dict, dict | None]:
    """The newest complete checkpoint that loads; warns about and skips damaged newer ones."""
    for _, folder in reversed(rundir.complete_checkpoints(run_dir)):
        try:
            state, rng = load_checkpoint(folder, rank)
        except Exception as err:  # noqa: BLE001 — torch.load fails in many ways on a damaged file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            logger.warning(f"checkpoint {folder} does not load ({reason}); trying the one before it")
            continue
        return folder, state, rng
    raise CheckpointError(f"--resume: no checkpoint under '{run_dir / rundir.CHECKPOINTS}' loads")


def restore_process_rng(record: dict | None, accelerator: Accelerator, seed: int, step: int) -> None:
    """Continue this process's random streams exactly, or reseed when that is impossible.

    Exact when the checkpoint was saved by as many processes as there are now. With a
    different world size (or no record for this rank) the streams are reseeded from
    (seed, step, rank): the data order stays exact, flips and noise do not.
    """
    saved_world = record.get("world_size", accelerator.num_processes) if record is not None else None
    if record is not None and saved_world == accelerator.num_processes:
        restore_rng_state(record)
        return
    torch.manual_seed((seed * 1000 + 1 + accelerator.process_index) * 1_000_003 + step)
    logger.info(f"the checkpoint was saved by {saved_world or 'a different number of'} process(es), this run has "
                f"{accelerator.num_processes}: random streams are reseeded (data order stays exact)")


def all_processes_agree(accelerator: Accelerator, value: int) -> bool:
    """True when `value` is the same on every process (one small all-gather)."""
    if accelerator.num_processes == 1:
        return True
    values = accelerator.gather(torch.tensor([value], device=accelerator.device))
    return bool((values == values[0]).all().item())


def weights_are_finite(accelerator: Accelerator, model: nn.Module) -> bool:
    """True when every parameter and buffer is finite on every process."""
    finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                 if isinstance(t, torch.Tensor) and t.is_floating_point())
    if accelerator.num_processes == 1:
        return finite
    bad = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    return accelerator.reduce(bad, reduction="sum").item() == 0


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


def resume_state(
    run_dir: Path, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None, seed: int,
) -> tuple[int, int]:
    """Load the newest checkpoint that loads into the run's objects; returns (step, nonfinite_total)."""
    folder, state, record = load_newest_checkpoint(run_dir, accelerator.process_index)
    step = int(state["step"])
    if not all_processes_agree(accelerator, step):
        raise LdmError(f"--resume: the processes found different checkpoints in '{run_dir}' "
                       "(is the run directory on a file system every node sees?)")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"--resume: checkpoint {folder} does not fit this model and config: {first}") from None
    restore_process_rng(record, accelerator, seed, step)
    logger.info(f"resuming {run_dir} from step {step} ({folder.name})")
    return step, int(state["nonfinite_total"])


def mean_over_processes(
    accelerator: Accelerator, loss: float, parts: dict[str, float]
) -> tuple[float, dict[str, float]]:
    """The loss and its logged parts averaged over all processes (one small all-reduce)."""
    if accelerator.num_processes == 1:
        return loss, parts
    values = torch.tensor([loss, *parts.values()], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean").tolist()
    return values[0], dict(zip(parts, values[1:]))


def train(
    build_task: Callable[[Accelerator], TrainTask],
    config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    export_name: str,
) -> TrainResult:
    """Train the task's model under `config` (`.train`, `.optim`, `.logging`) in `run_dir`.

    A stop signal (SIGTERM, SIGUSR1) is honoured from the moment this is called: even
    one that arrives while data is loading lets the run save and return preempted.
    """
    with StopFlag() as stop:
        return _train(build_task, config, run_dir, stop, resume=resume, overwrite=overwrite, export_name=export_name)


def _train(
    build_task: Callable[[Accelerator], TrainTask], config, run_dir: Path, stop: StopFlag, *,
    resume: bool, overwrite: bool, export_name: str,
) -> TrainResult:
    tcfg: TrainConfig = config.train
    ocfg: OptimConfig = config.optim
    lcfg: LoggingConfig = config.logging
    accelerator, speed = make_accelerator(tcfg)
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
    if speed.channels_last:
        raw_model.to(memory_format=torch.channels_last)
    ema = EMA(raw_model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    model, optimizer = accelerator.prepare(raw_model, optimizer)  # compiles when speed.compile
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)

    # 3. Resume: weights, optimizer, schedule, EMA, counters and RNG streams.
    step, nonfinite_total = 0, 0
    saved_step: int | None = None  # the step of the newest checkpoint on disk, if known
    if resume:
        step, nonfinite_total = resume_state(run_dir, accelerator, raw_model, optimizer, scheduler, ema, tcfg.seed)
        saved_step = step
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
        nonlocal saved_step
        if not weights_are_finite(accelerator, raw_model):
            raise LdmError(
                f"training stopped: the model's weights are not finite at step {step}; they were not saved; "
                f"last good checkpoint: {rundir.latest_checkpoint(run_dir) or 'none'} (lower optim.lr)"
            )
        save_checkpoint(accelerator, run_dir, step, training_state(), lcfg.keep_checkpoints)
        saved_step = step
        if is_main and (run_dir / rundir.METRICS_CSV).is_file():  # none yet when stopped before step 1
            plot_metrics(run_dir / rundir.METRICS_CSV, run_dir / rundir.METRICS_PNG,
                         task.metric_panels, task.log_scale_panels)

    logger.info(
        f"training {task.name}: {tcfg.max_steps} updates, global batch {tcfg.batch_size} "
        f"({accelerator.num_processes} process(es) × {local_batch} × {tcfg.grad_accum_steps} accumulation), "
        f"{task.num_examples} examples, device {accelerator.device}, precision {accelerator.mixed_precision}, "
        f"channels-last {speed.channels_last}, TF32 {speed.tf32}, compile {speed.compile}"
    )
    start_step, nonfinite_in_row, preempted = step, 0, False
    started = time.perf_counter()
    model.train()
    with ProgressReporter(f"train {task.name}", tcfg.max_steps, step, lcfg.log_every, is_main) as bar:
        while step < tcfg.max_steps:
            # -- on a signal (to any process), save and leave before starting the next update.
            if stop.agreed(accelerator):
                if saved_step != step:
                    checkpoint_and_draw()
                preempted = True
                logger.warning(f"stop requested: saved a checkpoint at step {step}; resume with --resume")
                break

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
                    logs[k] = logs.get(k, 0.0) + float(v) / tcfg.grad_accum_steps
            loss_sum, logs = mean_over_processes(accelerator, loss_sum, logs)
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm(ocfg)))
            # Both numbers are the same on every process, so every process decides alike.
            finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                if ema is not None:
                    ema.update(raw_model)
                nonfinite_in_row = 0
            else:  # skip: weights, optimizer moments and EMA stay as they were
                nonfinite_total += 1
                nonfinite_in_row += 1
            scheduler.step()  # the learning rate follows the step count, skipped or not
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if is_main:
                row = {"step": step, "loss": loss_sum, **logs, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm if finite else float("nan"),
                       "time": time.perf_counter() - started}
                metrics.append(row)
            bar.advance(f"loss {loss_sum:.4f}")
            if not finite:
                logger.warning(f"step {step}: non-finite loss or gradient; update skipped")
                if nonfinite_in_row >= lcfg.max_nonfinite_in_row:
                    raise LdmError(
                        f"training stopped: {nonfinite_in_row} non-finite losses in a row at step {step}; "
                        f"last good checkpoint: {rundir.latest_checkpoint(run_dir) or 'none'} "
                        "(lower optim.lr or check the data)"
                    )

            # -- now and then: checkpoint, plot, preview.
            if step % lcfg.checkpoint_every == 0 and step < tcfg.max_steps:
                checkpoint_and_draw()
            if task.preview is not None and is_main and step % lcfg.preview_every == 0 and step < tcfg.max_steps:
                task.preview(eval_model(), step, run_dir)

    seconds = time.perf_counter() - started
    export_path = None
    if not preempted:
        if saved_step != step:
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
        is_main_process=is_main,
    )


def max_grad_norm(cfg: OptimConfig) -> float:
    """Max gradient norm for clipping; infinity when clipping is off (norm still measured)."""
    return cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
