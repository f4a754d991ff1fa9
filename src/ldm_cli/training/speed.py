"""Speed settings: bf16 autocast, channels-last memory, TF32 matmuls, torch.compile.

Each is `auto`, `on` or `off` in `[train]`; `auto` turns it on where it was measured to
help (`benchmarks/cpu_speed.py`, `benchmarks/README.md`):

- channels-last: everywhere. On a 2-core CPU it made a quickstart denoiser update 14 %
  faster (VAE 2 %); on a GPU it is what tensor-core convolutions want.
- bf16 autocast, TF32, compile: on a CUDA GPU (bf16 where the GPU supports it). On the
  CPU, a bf16 VAE update took 0.65 of the baseline's update time against 0.53 in float32
  with channels-last, compile made the denoiser slower, and TF32 does not exist.

bf16 covers the network's forward only (`accelerator.prepare` wraps it in autocast and
returns float32 outputs); the loss is computed in float32 outside autocast.
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
    """What `auto` means here (see the module docstring)."""
    bf16_ok = on_cuda and torch.cuda.is_bf16_supported()
    precision = cfg.mixed_precision
    return SpeedSettings(
        bf16=precision == "bf16" or (precision == "auto" and bf16_ok),
        channels_last=_choose(cfg.channels_last, True),
        tf32=_choose(cfg.tf32, on_cuda),
        compile=_choose(cfg.compile, on_cuda),
    )


def apply_speed_settings(settings: SpeedSettings) -> None:
    """Set the process-wide TF32 switches (matmuls and cuDNN convolutions)."""
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
    torch.backends.cudnn.benchmark = torch.cuda.is_available() and (settings.channels_last or settings.compile)
