"""What `auto` speed settings resolve to, on a CPU and (pretended) on a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from ldm_cli.config import TrainConfig
from ldm_cli.training.speed import SpeedSettings, resolve_speed


def test_auto_on_a_cpu_without_native_bf16_is_float32_with_a_channels_last_denoiser_and_an_nchw_vae():
    assert resolve_speed(TrainConfig(), on_cuda=False, model="vae", cpu_bf16=False) == SpeedSettings(
        False, False, False, False)
    assert resolve_speed(TrainConfig(), on_cuda=False, model="denoiser", cpu_bf16=False) == SpeedSettings(
        False, True, False, False)


def test_auto_on_a_cpu_with_native_bf16_trains_the_vae_in_bf16_nchw_and_the_denoiser_in_float32():
    assert resolve_speed(TrainConfig(), on_cuda=False, model="vae", cpu_bf16=True) == SpeedSettings(
        True, False, False, False)
    assert resolve_speed(TrainConfig(), on_cuda=False, model="denoiser", cpu_bf16=True) == SpeedSettings(
        False, True, False, False)


def test_auto_on_a_cpu_detects_native_bf16_when_not_told(monkeypatch):
    from ldm_cli.training import speed

    for native in (True, False):
        monkeypatch.setattr(speed, "has_native_bf16", lambda device, native=native: native)
        assert resolve_speed(TrainConfig(), on_cuda=False, model="vae").bf16 is native


@pytest.mark.parametrize("model", ["vae", "denoiser"])
def test_auto_speed_settings_are_on_on_cuda_with_bf16_only_if_supported(monkeypatch, model):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_speed(TrainConfig(), on_cuda=True, model=model) == SpeedSettings(True, True, True, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_speed(TrainConfig(), on_cuda=True, model=model).bf16 is False


@pytest.mark.parametrize("value, expected", [("on", True), ("off", False)])
def test_explicit_on_off_and_bf16_override_the_device_default(value, expected):
    cfg = TrainConfig(channels_last=value, tf32=value, compile=value)
    for cpu_bf16 in (True, False):
        settings = resolve_speed(cfg, on_cuda=not expected, model="vae", cpu_bf16=cpu_bf16)
        assert (settings.channels_last, settings.tf32, settings.compile) == (expected,) * 3
    assert resolve_speed(TrainConfig(mixed_precision="bf16"), on_cuda=False, model="denoiser", cpu_bf16=False).bf16
    assert not resolve_speed(TrainConfig(mixed_precision="no"), on_cuda=False, model="vae", cpu_bf16=True).bf16
