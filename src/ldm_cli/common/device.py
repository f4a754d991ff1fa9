"""Where inference runs, and in which precision.

`default_device`: the first CUDA GPU when there is one, else the CPU. `resolve_precision`:
what `--precision auto` means on a device — bfloat16 model calls where the hardware runs
them natively (CUDA GPUs that support bf16; CPUs with AVX512-BF16 or AMX-BF16, where
`benchmarks/cpu_speed.py` measured DDIM sampling 1.9× faster), float32 elsewhere, where
bf16 would be emulated and slower.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from ldm_cli.errors import UsageError

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
