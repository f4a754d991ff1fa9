"""Resumable training state: the checkpoints under RUN/checkpoints/ (docs/ARCHITECTURE.md,
"Resumable state").

    checkpoints/step-00000500/state.pt   model, optimiser, lr schedule, EMA, step counters
    checkpoints/step-00000500/rng-{r}.pt  process r's RNG streams, rank, world size, and
                                          SHA-256 digests of its weights

Every process calls `save_checkpoint` together. The folder is written under a temporary
name and renamed into place once complete (`ldm_cli.common.files.atomic_write`), so a
save killed midway leaves the previous checkpoints whole and is ignored by `--resume`,
which takes the newest checkpoint that loads. Resumable state is written with
`torch.save` and read back with `torch.load(weights_only=True)`: never unpickled.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ldm_cli.common.files import atomic_write, require_free_space
from ldm_cli.errors import CheckpointError, DiskFullError, LdmError, UsageError
from ldm_cli.models.ema import EMA
from ldm_cli.models.state_dicts import tensor_mismatches
from ldm_cli.training import rundir
from ldm_cli.training.distributed import all_processes_agree, on_main_for_all
from ldm_cli.training.optim import load_optimizer_state

logger = logging.getLogger("ldm")


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
        "identity": state.get("identity"),
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
    `.tmp-step-XXXXXXXX` (one name for all processes) and renamed into place by the main
    process only once complete.
    """
    is_main = accelerator.is_main_process
    needed = tensor_bytes(state) + accelerator.num_processes * tensor_bytes(rng_state()) + (1 << 20)
    check_space_everywhere(accelerator, run_dir / rundir.CHECKPOINTS, needed)
    with atomic_write(rundir.checkpoint_dir(run_dir, step), shared=True, owner=is_main) as tmp:
        if is_main:
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        record = process_record(accelerator, step, state)
        torch.save(record, tmp / f"rng-{accelerator.process_index}.pt")
        check_ranks_agree(accelerator, record)
        accelerator.wait_for_everyone()
        if is_main:
            torch.save(state, tmp / rundir.STATE_FILE)
    if is_main:
        rundir.prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()


def tensor_bytes(value: object) -> int:
    """Bytes of every tensor in a nested state (what `torch.save` will write, roughly)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def check_space_everywhere(accelerator: Accelerator, folder: Path, needed: int) -> None:
    """Refuse a checkpoint that would not fit, on every process together (the main one
    looks), so no process is left waiting for a save that failed."""
    on_main_for_all(accelerator, lambda: require_free_space(folder, needed, "a checkpoint"),
                    DiskFullError(f"a checkpoint does not fit in '{folder}' (see the main process)"))


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
    if accelerator.is_main_process:
        logger.warning(f"--resume with another process count: {saved_world or '?'} → {accelerator.num_processes}; "
                       "random streams are reseeded (the data order stays exact, flips and noise do not)")


def check_identity(folder: Path, saved: dict[str, str] | None, current: dict[str, str]) -> None:
    """Refuse to resume a model on something it was not trained on (another VAE file)."""
    for key, value in current.items():
        before = (saved or {}).get(key)
        if before is not None and before != value:
            raise UsageError(
                f"--resume: checkpoint {folder} was trained with {key} {before[:16]}…, this run has "
                f"{value[:16]}…; resuming would mix two runs (start a new one with another --out or --overwrite)"
            )


def check_newest_identity(run_dir: Path, rank: int, identity: dict[str, str]) -> None:
    """`check_identity` against the newest checkpoint's small per-process record, before
    anything is built or written."""
    folder = rundir.latest_checkpoint(run_dir)
    record_file = folder / f"rng-{rank}.pt" if folder is not None else None
    if identity and record_file is not None and record_file.is_file():
        try:
            record = torch.load(record_file, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 — a damaged record: resume_state falls back and checks again
            return
        check_identity(folder, record.get("identity"), identity)


def resume_state(
    run_dir: Path, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None, seed: int, identity: dict[str, str],
) -> tuple[int, int]:
    """Load the newest checkpoint that loads into the run's objects; returns (step, nonfinite_total)."""
    folder, state, record = load_newest_checkpoint(run_dir, accelerator.process_index)
    step = int(state["step"])
    if not all_processes_agree(accelerator, step):
        raise LdmError(f"--resume: the processes found different checkpoints in '{run_dir}' "
                       "(is the run directory on a file system every node sees?)")
    check_identity(folder, state.get("identity"), identity)
    mismatch = tensor_mismatches(state["model"], model.state_dict())
    if mismatch:
        raise CheckpointError(f"--resume: checkpoint {folder} does not fit this model: {'; '.join(mismatch)}")
    try:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"--resume: checkpoint {folder} does not fit this model and config: {first}") from None
    restore_process_rng(record, accelerator, seed, step)
    logger.info(f"resuming {run_dir} from step {step} ({folder.name})")
    return step, int(state["nonfinite_total"])
