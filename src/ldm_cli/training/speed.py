"""Speed settings for CUDA: bf16 autocast, channels-last memory, TF32 matmuls, torch.compile.

Each is `auto`, `on` or `off` in `[train]`; `auto` turns it on where it helps — on a CUDA
GPU (bf16 where the GPU supports it) — and off on the CPU, where bf16 autocast and
compilation make small models slower and TF32 does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm_cli.config import TrainConfig


@dataclass(frozen=True)
class SpeedSettings:
    bf16: bool
    channels_last: bool
    tf32: bool
    compile: bool


def _choose(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def resolve_speed(cfg: TrainConfig, on_cuda: bool) -> SpeedSettings:
    """What `auto` means here: on for a CUDA GPU, off for the CPU."""
    bf16_ok = on_cuda and torch.cuda.is_bf16_supported()
    precision = cfg.mixed_precision
    return SpeedSettings(
        bf16=precision == "bf16" or (precision == "auto" and bf16_ok),
        channels_last=_choose(cfg.channels_last, on_cuda),
        tf32=_choose(cfg.tf32, on_cuda),
        compile=_choose(cfg.compile, on_cuda),
    )


def apply_speed_settings(settings: SpeedSettings) -> None:
    """Set the process-wide TF32 switches (matmuls and cuDNN convolutions)."""
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
    torch.backends.cudnn.benchmark = settings.channels_last or settings.compile
