"""Speed settings: bf16 autocast, channels-last memory, TF32 matmuls, torch.compile.

Each is `auto`, `on` or `off` in `[train]`; `auto` turns it on where it was measured to
help (`benchmarks/cpu_speed.py`, `benchmarks/README.md`):

- On a CUDA GPU: all four (bf16 where the GPU supports it).
- On a CPU: channels-last for the denoiser, whose update it made 14 % faster on a 2-core
  AVX512 CPU (2 % on a 2-core AVX2 CPU). The VAE keeps contiguous (NCHW) memory: in
  float32, channels-last made its update 2 % faster on the AVX512 CPU and 17 % slower on
  the AVX2 one. On a CPU that runs bf16 natively (AVX512-BF16 or AMX) the VAE trains in
  bf16: its update took 0.67 of the float32 time, while bf16 with channels-last took 1.16,
  and the denoiser gained nothing from bf16 (1.03–1.07). At the same wall clock the bf16
  VAE reconstructed better (recon FD 8.2 against 9.5 at a 5-minute budget, two runs each).
  Without native bf16, autocast emulates it: 9.4× slower on the AVX2 CPU. compile made
  the denoiser slower, and TF32 does not exist.

bf16 covers the network's forward only (`accelerator.prepare` wraps it in autocast and
returns float32 outputs); the loss is computed in float32 outside autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm_cli.common.device import has_native_bf16
from ldm_cli.config import TrainConfig

# The models whose training `auto` runs in bf16 on a CPU with native bf16, and those it runs
# in channels-last memory on any CPU (see above).
CPU_BF16_MODELS = frozenset({"vae"})
CPU_CHANNELS_LAST_MODELS = frozenset({"denoiser"})


@dataclass(frozen=True)
class SpeedSettings:
    bf16: bool
    channels_last: bool
    tf32: bool
    compile: bool


def _choose(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def resolve_speed(cfg: TrainConfig, on_cuda: bool, model: str, cpu_bf16: bool | None = None) -> SpeedSettings:
    """What `auto` means for training `model` ("vae" or "denoiser") here (see the module
    docstring). `cpu_bf16`: whether the CPU runs bf16 natively (detected when None)."""
    cpu_bf16_model = not on_cuda and model in CPU_BF16_MODELS
    if on_cuda:
        bf16_auto = torch.cuda.is_bf16_supported()
    else:
        bf16_auto = cpu_bf16_model and (has_native_bf16("cpu") if cpu_bf16 is None else cpu_bf16)
    precision = cfg.mixed_precision
    bf16 = precision == "bf16" or (precision == "auto" and bf16_auto)
    return SpeedSettings(
        bf16=bf16,
        channels_last=_choose(cfg.channels_last, on_cuda or model in CPU_CHANNELS_LAST_MODELS),
        tf32=_choose(cfg.tf32, on_cuda),
        compile=_choose(cfg.compile, on_cuda),
    )


def apply_speed_settings(settings: SpeedSettings) -> None:
    """Set the process-wide TF32 switches (matmuls and cuDNN convolutions)."""
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
    torch.backends.cudnn.benchmark = torch.cuda.is_available() and (settings.channels_last or settings.compile)
