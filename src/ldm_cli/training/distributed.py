"""Several processes, one model: the accelerator, each process's share of the batch,
and the small collectives the loop uses to decide alike on every process.

`train.batch_size` is the GLOBAL batch of one update; each process draws
batch_size / (world_size × grad_accum_steps) examples per micro-step (`BatchOrder`),
so a config trains the same way on one CPU or eight GPUs. A stop signal (SIGTERM,
SIGUSR1) sets `StopFlag`; the loop saves and leaves when any process was signalled.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from ldm_cli.config import TrainConfig
from ldm_cli.errors import ConfigError, LdmError, UsageError
from ldm_cli.training.speed import SpeedSettings, apply_speed_settings, resolve_speed

logger = logging.getLogger("ldm")


def make_accelerator(cfg: TrainConfig, model: str, report_to: list[str] = (), run_dir: Path | None = None,
                     ) -> tuple[Accelerator, SpeedSettings]:
    """An Accelerator on CUDA when present, else a real (gloo) CPU process group, with
    the speed settings (`ldm_cli.training.speed`) that `auto` resolves to for training
    `model` ("vae" or "denoiser") on this machine, and the experiment trackers of
    `report_to` (files under RUN/tracking/)."""
    AcceleratorState._reset_state(reset_partial_state=False)  # allow several runs per process
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        check_one_gpu_per_process()
    speed = resolve_speed(cfg, on_cuda, model)
    apply_speed_settings(speed)
    precision = "bf16" if speed.bf16 else ("no" if cfg.mixed_precision == "auto" else cfg.mixed_precision)
    tracking = {"log_with": list(report_to), "project_dir": run_dir / "tracking"} if report_to and run_dir else {}
    accelerator = Accelerator(cpu=not on_cuda, mixed_precision=precision,
                              dynamo_backend="inductor" if speed.compile else "no", **tracking)
    return accelerator, speed


def check_one_gpu_per_process() -> None:
    """Refuse more processes on this node than it has GPUs: two ranks on one GPU stop NCCL
    with a traceback from every process, after the launcher has started them all."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise UsageError(
            f"{processes} processes on this node but {gpus} CUDA GPU(s): start at most {gpus} per node "
            "(accelerate launch --num_processes), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU processes"
        )


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


class StopFlag:
    """Set by SIGTERM or SIGUSR1 (SLURM's warning before the time limit, a preemption) or
    by a first Ctrl-C (SIGINT): the loop finishes the update, saves a checkpoint on every
    process and returns. A second Ctrl-C stops at once (KeyboardInterrupt), unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: str | None = None  # the first stop signal's name
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # a background job (nohup, `&`) was told to ignore Ctrl-C: keep it that way
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            if self.signal == "SIGINT":
                raise KeyboardInterrupt
            logger.warning("Ctrl-C: stopping after this update and saving a checkpoint "
                           "(press Ctrl-C again to stop at once, without saving)")
        self.signal = self.signal or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> str | None:
        """On every process: the stop signal when any process got one (SIGINT first), else
        None (one tiny all-reduce)."""
        if accelerator.num_processes == 1:
            return self.signal
        code = {None: 0.0, "SIGINT": 2.0}.get(self.signal, 1.0)
        agreed = accelerator.reduce(torch.tensor([code], device=accelerator.device), reduction="max").item()
        return {0.0: None, 2.0: "SIGINT"}.get(agreed, self.signal or "SIGTERM")


def all_processes_agree(accelerator: Accelerator, value: int) -> bool:
    """True when `value` is the same on every process (one small all-gather)."""
    if accelerator.num_processes == 1:
        return True
    values = accelerator.gather(torch.tensor([value], device=accelerator.device))
    return bool((values == values[0]).all().item())


def on_main_for_all(accelerator: Accelerator, check: Callable[[], None], elsewhere: LdmError) -> None:
    """Run `check` on the main process and raise on every process when it raises there
    (the main process's own error; `elsewhere` on the others), so no process is left
    waiting at the next barrier for work the main process refused."""
    error: LdmError | None = None
    if accelerator.is_main_process:
        try:
            check()
        except LdmError as err:
            error = err
    if not all_processes_agree(accelerator, 0 if error is None else 1) or error is not None:
        raise error or elsewhere


def weights_are_finite(accelerator: Accelerator, model: nn.Module) -> bool:
    """True when every parameter and buffer is finite on every process."""
    finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                 if isinstance(t, torch.Tensor) and t.is_floating_point())
    if accelerator.num_processes == 1:
        return finite
    bad = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    return accelerator.reduce(bad, reduction="sum").item() == 0


def mean_over_processes(
    accelerator: Accelerator, loss: float, parts: dict[str, float]
) -> tuple[float, dict[str, float]]:
    """The loss and its logged parts averaged over all processes (one small all-reduce)."""
    if accelerator.num_processes == 1:
        return loss, parts
    values = torch.tensor([loss, *parts.values()], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean").tolist()
    return values[0], dict(zip(parts, values[1:]))
