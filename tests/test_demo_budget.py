"""`ldm demo --minutes` is wall clock on this machine: timed updates size the training, the
sizing is kept in budget.json for reruns, and the report says how it was chosen."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_demo_overrides
from ldm_cli.commands import demo
from ldm_cli.training.budget import seconds_per_update


def test_the_scale_fills_the_training_share_of_the_minutes():
    # 2/3 · 600 s = s · (1000 · 0.1 s + 500 · 0.2 s)  ⇒  s = 2
    assert demo.sized_scale(10.0, 0.1, 0.2, 1000, 500) == pytest.approx(400 / 200)
    # twice as slow an update, half the updates
    assert demo.sized_scale(10.0, 0.2, 0.4, 1000, 500) == pytest.approx(400 / 400)


def fake_timing(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Replace the timing with fixed seconds per update; returns the models it was asked for."""
    asked = []

    def timed(cfg, device=None, repeats=7):
        asked.append(cfg.task_name)
        return seconds[cfg.task_name]

    monkeypatch.setattr(demo, "seconds_per_update", timed)
    return asked


def test_the_demo_sizes_its_training_from_timed_updates(tmp_path, monkeypatch):
    fake_timing(monkeypatch, {"vae": 0.05, "denoiser": 0.08})
    budget = demo.demo_budget(tmp_path, 10.0)
    vae_cfg = demo.demo_vae_config(tmp_path, budget.scale)
    den_cfg = demo.demo_denoiser_config(tmp_path, budget.scale)
    training = vae_cfg.train.max_steps * 0.05 + den_cfg.train.max_steps * 0.08
    assert training == pytest.approx(demo.TRAINING_SHARE * 600, rel=1e-3)
    assert json.loads((tmp_path / "budget.json").read_text()) == {
        "minutes": 10.0, "scale": budget.scale, "vae_update_seconds": 0.05, "den_update_seconds": 0.08}


def test_a_rerun_with_the_same_minutes_trains_the_same_updates(tmp_path, monkeypatch):
    """An interrupted demo resumes with the sizing it started with, not a new, noisier one."""
    asked = fake_timing(monkeypatch, {"vae": 0.05, "denoiser": 0.08})
    first = demo.demo_budget(tmp_path, 10.0)
    fake_timing(monkeypatch, {"vae": 0.07, "denoiser": 0.09})  # the machine is busier now
    assert demo.demo_budget(tmp_path, 10.0) == first
    assert asked == ["vae", "denoiser"], "measured once"
    other = demo.demo_budget(tmp_path, 5.0)
    assert other.minutes == 5.0 and other.vae_update_seconds == 0.07
    assert demo.read_budget(tmp_path / "budget.json") == other


@pytest.mark.parametrize("content", ["{not json", '{"minutes": 10}', "[1, 2]",
                                     '{"minutes": 10, "scale": "x", "vae_update_seconds": 1, "den_update_seconds": 1}',
                                     '{"minutes": 10, "scale": -1, "vae_update_seconds": 1, "den_update_seconds": 1}'])
def test_an_unreadable_budget_file_is_measured_anew(tmp_path, monkeypatch, content):
    (tmp_path / "budget.json").write_text(content)
    fake_timing(monkeypatch, {"vae": 0.05, "denoiser": 0.08})
    assert demo.demo_budget(tmp_path, 10.0).vae_update_seconds == 0.05


def test_updates_are_timed_for_real_on_this_machine(tmp_path):
    vae, den = tiny_demo_overrides()
    vae_cfg, den_cfg = demo.demo_vae_config(tmp_path, 1.0, vae), demo.demo_denoiser_config(tmp_path, 1.0, den)
    for cfg in (vae_cfg, den_cfg):
        seconds = seconds_per_update(cfg, repeats=3)
        assert math.isfinite(seconds) and 0 < seconds < 10


def test_the_report_says_how_the_budget_was_sized():
    budget = demo.DemoBudget(10.0, 0.9, 0.05, 0.08)
    records = {name: {"minutes": 10.0, "scale": 0.9} for name in demo.TRAINING_STAGES}
    text = demo.sizing_text(records, budget)
    assert "50 ms (VAE) and 80 ms (denoiser)" in text and "scaled by 0.900" in text and "67% of the minutes" in text
    reused = {**records, "train-vae": {"minutes": 5.0, "scale": 0.45}}
    assert demo.sizing_text(reused, budget) == "", "models trained with another budget were not sized by this one"
    assert demo.sizing_text(records, demo.DemoBudget(10.0, 0.9)) == "", "a given scale was not timed"

