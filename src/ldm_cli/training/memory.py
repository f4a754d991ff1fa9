"""Will one training step fit in memory? An estimate before the first step.

    step ≈ activations + model states
    activations = (bytes autograd keeps for the backward pass of ONE example) × examples per micro-step
    model states = parameters × (weights + gradients + 2 AdamW moments + EMA) × 4 bytes

The activations are measured, not guessed: the task's loss runs once on one example
while `torch.autograd.graph.saved_tensors_hooks` adds up every tensor the backward pass
would keep (each storage counted once). The random streams are put back afterwards,
so the estimate changes nothing a run computes. A step estimated above the memory
available (free RAM on the CPU, free GPU memory on CUDA) is refused with the numbers
and what to change; a config clearly made for GPUs gets a warning on a CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ldm_cli.common.files import format_bytes
from ldm_cli.errors import UsageError

logger = logging.getLogger("ldm")

STATE_COPIES = 5  # weights, gradients, two AdamW moments, the EMA
OVERHEAD = 1.25  # temporaries the backward pass allocates beyond what is saved
GPU_RESOLUTION = 128  # images this large train on GPUs; CPUs take the quickstart configs
GPU_STEP_BYTES = 4 << 30  # a step this large, too


@dataclass(frozen=True)
class StepMemory:
    activations_per_example: int
    examples: int  # per process and micro-step
    model_states: int

    @property
    def total(self) -> int:
        return int(OVERHEAD * self.activations_per_example * self.examples) + self.model_states


def saved_tensor_bytes(model: nn.Module, run_loss: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward pass of `run_loss()`: each storage once, and
    not the model's own weights (they are there once, whatever the batch)."""
    weights = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in weights:
            seen[key] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_loss()
    return sum(seen.values())


def with_random_state_kept(fn: Callable[[], int]) -> int:
    """Run `fn` and put every random stream back as it was."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return fn()
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def estimate_step(model: nn.Module, loss_of_one: Callable[[], torch.Tensor], examples: int) -> StepMemory:
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = with_random_state_kept(lambda: saved_tensor_bytes(model, loss_of_one))
    return StepMemory(activations, examples, STATE_COPIES * parameters)


def available_memory(device: torch.device) -> int:
    """Bytes a step can use now: free GPU memory, or the RAM the system can give."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_step_fits(memory: StepMemory, device: torch.device, resolution: int, quickstart: str) -> None:
    """Refuse (exit 2) a step that would not fit; warn on a CPU about a GPU-sized config."""
    available = available_memory(device)
    needed = memory.total
    detail = (f"about {format_bytes(needed)} (activations {format_bytes(memory.activations_per_example)} per "
              f"example × {memory.examples} per step, weights and optimizer {format_bytes(memory.model_states)})")
    if needed > available:
        raise UsageError(
            f"one training step needs {detail}, but only {format_bytes(available)} is available on {device.type}; "
            "use fewer examples per step (train.batch_size, or train.grad_accum_steps to keep the batch), "
            f"or the quickstart config ({quickstart})"
        )
    if device.type == "cpu" and (resolution >= GPU_RESOLUTION or needed > GPU_STEP_BYTES):
        logger.warning(f"this config looks made for GPUs ({resolution} px images, one step needs {detail}); "
                       f"on a CPU it will be very slow: {quickstart} trains in minutes")
