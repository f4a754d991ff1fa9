"""The memory estimate of a training step: measured saved activations against a closed
form, and a step that would not fit refused before any update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_vae_overrides
from ldm_cli.common.device import default_device
from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.errors import UsageError
from ldm_cli.training import memory
from ldm_cli.training.vae_task import train_vae


def test_saved_activations_of_an_mlp_match_the_closed_form():
    torch.manual_seed(0)
    width, hidden = 64, 512
    model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
    x = torch.randn(1, width)
    # Linear 1 keeps its input (64 floats), ReLU its output (512), Linear 2 its input —
    # the same ReLU output storage — and no weight counts: 4 × (64 + 512) bytes.
    saved = memory.saved_tensor_bytes(model, lambda: model(x).pow(2).sum())
    assert saved == 4 * (width + hidden) + 4 * width  # + the output kept by pow's backward


def test_the_estimate_scales_with_the_examples_and_leaves_the_random_streams_alone():
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 1))
    before = torch.get_rng_state()
    estimate = memory.estimate_step(model, lambda: model(torch.randn(1, 8)).sum(), examples=10)
    assert torch.equal(torch.get_rng_state(), before), "the estimate must not change what a run draws"
    params = sum(p.numel() for p in model.parameters())
    assert estimate.model_states == memory.STATE_COPIES * 4 * params
    assert estimate.total == int(memory.OVERHEAD * estimate.activations_per_example * 10) + estimate.model_states


def test_a_step_that_would_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 10_000)
    run = tmp_path / "run"
    device = default_device().type  # where the run trains
    with pytest.raises(UsageError, match=rf"one training step needs about .* but only 9.8 KiB is available on {device}; "
                                         r"use fewer examples per step .*configs/quickstart/vae.toml"):
        train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, 2)))
    assert not run.exists()


def test_a_gpu_sized_config_warns_on_a_cpu(caplog):
    step = memory.StepMemory(activations_per_example=1 << 20, examples=4, model_states=1 << 20)
    with caplog.at_level("WARNING", logger="ldm"):
        memory.check_step_fits(step, torch.device("cpu"), 128, "configs/quickstart/vae.toml")
    assert "looks made for GPUs (128 px images" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm"):
        memory.check_step_fits(step, torch.device("cpu"), 32, "configs/quickstart/vae.toml")
    assert "GPUs" not in caplog.text
