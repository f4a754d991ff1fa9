"""Where inference runs, and in which precision.

`default_device`: the first CUDA GPU when there is one, else the CPU. `resolve_precision`:
what `--precision auto` means on a device — bfloat16 model calls where the hardware runs
them natively (CUDA GPUs that support bf16; CPUs with AVX512-BF16 or AMX-BF16, where
`benchmarks/cpu_speed.py` measured DDIM sampling 1.9× faster), float32 elsewhere, where
bf16 would be emulated and slower. `model_in_precision`: a model that computes in that
precision and takes and returns float32, for samplers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from ldm_cli.errors import LdmError, UsageError

PRECISIONS = ("auto", "fp32", "bf16")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 matmuls and convolutions run natively on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16": `precision` itself, or for "auto" bf16 where `device` runs it natively."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    return precision


def model_autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bfloat16 autocast for model calls when `precision` is "bf16"; a no-op for "fp32"."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def is_self_conditioned(model: Callable[..., Tensor]) -> bool:
    """Whether `model` takes a z0 estimate as a third input (`UNet` with `self_condition`, or a
    wrapper of one that says so; docs/MATH.md, §3)."""
    return bool(getattr(model, "self_conditioned", False))


class InferenceModel:
    """A network prepared for sampling: it computes in `precision` (compiled or not) and
    takes and returns the dtype of z. `model_in_precision` makes one."""

    def __init__(self, call: Callable[..., Tensor], precision: str, self_conditioned: bool | None = None) -> None:
        """``self_conditioned``: whether `call` takes a z0 estimate (None: as `call` itself says)."""
        self_conditioned = is_self_conditioned(call) if self_conditioned is None else self_conditioned
        self.call, self.precision, self.self_conditioned = call, precision, self_conditioned

    def __call__(self, z: Tensor, t: Tensor, *estimate: Tensor) -> Tensor:
        return self.call(z, t, *estimate)


def model_in_precision(model: Callable[..., Tensor], precision: str, compile: bool = False) -> Callable[..., Tensor]:
    """`model` as a function (z, t[, z0 estimate]) → output that computes in `precision` and returns the dtype of z.

    For "bf16" a network (an `nn.Module`) is copied once with bfloat16 weights, so every call
    runs natively in bf16 and nothing is cast per call: autocast instead casts the weights
    at every call and runs LayerNorm in float32, casting activations back and forth
    (`benchmarks/cpu_speed.py`, section 4). Other callables (closed-form oracles) run under
    autocast. For "fp32", `model` itself.

    `compile` also compiles the copy with torch.compile, its weights frozen into the graph
    as constants (inductor's `freezing`): about 1.7× faster calls of the quickstart model on
    a CPU, after a one-time compilation of about 10 s, and again for each new batch size
    (`benchmarks/sampling_speed.py`). A model already prepared for `precision` is returned
    as it is.
    """
    if isinstance(model, InferenceModel) and model.precision == precision:
        return model
    self_conditioned = is_self_conditioned(model)
    if not isinstance(model, nn.Module):
        if compile:
            raise UsageError("only a network (torch.nn.Module) can be compiled for sampling")
        if precision != "bf16":
            return model
        return InferenceModel(_under_autocast(model), precision, self_conditioned)
    if precision != "bf16" and not compile:
        return model
    module = copy.deepcopy(getattr(model, "_orig_mod", model)).eval()  # a compiled wrapper cannot be copied
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    network = module.to(dtype)
    if compile:
        network = _compiled_frozen(network)

    def call(z: Tensor, t: Tensor, *estimate: Tensor) -> Tensor:
        return network(z.to(dtype), t, *(e.to(dtype) for e in estimate)).to(z.dtype)
    return InferenceModel(call, precision, self_conditioned)


def _under_autocast(model: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def call(z: Tensor, t: Tensor, *estimate: Tensor) -> Tensor:
        with model_autocast(z.device, "bf16"):
            return model(z, t, *estimate).to(z.dtype)
    return call


def _compiled_frozen(network: nn.Module) -> Callable[..., Tensor]:
    """torch.compile with inductor's `freezing` on at every call, so that recompilations (a
    new batch size) freeze the weights too; `options={"freezing": True}` does not reach it."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(network)

    def call(z: Tensor, t: Tensor, *estimate: Tensor) -> Tensor:
        with torch.inference_mode():  # always inference tensors, as at the first call: no recompilation
            z, t, estimate = z.clone(), t.clone(), tuple(e.clone() for e in estimate)
        try:
            with inductor_config.patch(freezing=True):
                return compiled(z, t, *estimate)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler for inductor on a CPU
            reason = (str(error.inner_exception).strip().splitlines() or [type(error.inner_exception).__name__])[0]
            raise LdmError(f"--compile: torch.compile could not compile the network ({reason}); "
                           "sample without --compile") from error
    return call
