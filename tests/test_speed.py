"""What `auto` speed settings resolve to, on a CPU and (pretended) on a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from ldm_cli.config import TrainConfig
from ldm_cli.training.speed import SpeedSettings, resolve_speed


def test_auto_speed_settings_on_cpu_are_channels_last_only():
    assert resolve_speed(TrainConfig(), on_cuda=False) == SpeedSettings(False, True, False, False)


def test_auto_speed_settings_are_on_on_cuda_with_bf16_only_if_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_speed(TrainConfig(), on_cuda=True) == SpeedSettings(True, True, True, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_speed(TrainConfig(), on_cuda=True).bf16 is False


@pytest.mark.parametrize("value, expected", [("on", True), ("off", False)])
def test_explicit_on_off_and_bf16_override_the_device_default(value, expected):
    cfg = TrainConfig(channels_last=value, tf32=value, compile=value)
    settings = resolve_speed(cfg, on_cuda=not expected)
    assert (settings.channels_last, settings.tf32, settings.compile) == (expected,) * 3
    assert resolve_speed(TrainConfig(mixed_precision="bf16"), on_cuda=False).bf16 is True
