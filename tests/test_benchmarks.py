"""The GPU benchmark refuses clearly without a GPU, and its code runs on tiny CPU shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gpu_benchmark_exits_2_without_a_gpu():
    done = run()
    assert done.returncode == 2
    assert "no CUDA GPU found" in done.stderr and "Traceback" not in done.stderr


def test_gpu_benchmark_reports_positive_rates_on_tiny_cpu_shapes():
    done = run("--allow-cpu", "--tiny")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for what in ("VAE train", "denoiser train", "DDIM-50 sampling"):
        row = next(line for line in lines if line.startswith(what))
        rate = float(row[len(what):].split()[0])
        assert rate > 0
    assert "GFLOP forward+backward" in done.stdout


def quality_budget_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import quality_budget
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return quality_budget


def ratio_counting(monkeypatch):
    """quality_budget with `update_time_ratio` replaced by one that records whom it timed,
    the list of those names, and the baseline and defaults configurations."""
    q = quality_budget_module()
    timed: list[str] = []
    monkeypatch.setattr(q, "update_time_ratio", lambda conf, ref: timed.append(conf.name) or (0.5, 0.25))
    return q, timed, q.Configuration("baseline", "baseline"), q.Configuration("defaults", "defaults",
                                                                             relative_to="baseline")


def test_quality_budget_measures_a_speed_ratio_once_per_speed_settings(tmp_path, monkeypatch):
    q, timed, base, defaults = ratio_counting(monkeypatch)
    same_speed = q.Configuration("beta", "defaults", vae_set=("loss.beta_final=3e-4",), relative_to="baseline")
    other_speed = q.Configuration("b8", "defaults", vae_set=("train.batch_size=8",), relative_to="baseline")
    assert q.cached_ratio(defaults, base, tmp_path) == (0.5, 0.25)
    assert q.cached_ratio(same_speed, base, tmp_path) == (0.5, 0.25)  # β does not change an update's cost
    assert timed == ["defaults"]
    q.cached_ratio(other_speed, base, tmp_path)
    assert timed == ["defaults", "b8"]
    per_tensor = q.Configuration("loop", "defaults", den_set=("optim.fused=false",), relative_to="baseline")
    q.cached_ratio(per_tensor, base, tmp_path)  # the optimiser's kernel sets an update's cost too
    assert timed == ["defaults", "b8", "loop"]
    init = q.Configuration("ls", "defaults", den_set=("model.layer_scale_init=0.5",), relative_to="baseline")
    q.cached_ratio(init, base, tmp_path)  # an initial value: the same operations, so no new timing
    self_cond = q.Configuration("sc", "defaults", den_set=("model.self_condition=true",), relative_to="baseline")
    q.cached_ratio(self_cond, base, tmp_path)  # a first pass on half of the updates costs time
    assert timed == ["defaults", "b8", "loop", "sc"]
    heavier = q.Configuration("w1", "defaults", vae_set=("loss.structural_weight=1.0",), relative_to="baseline")
    q.cached_ratio(heavier, base, tmp_path)  # the SSIM term's weight does not change its cost
    assert timed == ["defaults", "b8", "loop", "sc"]
    for name, setting in (("ms", "loss.structural=ms-ssim"), ("off", "loss.structural_weight=0")):
        q.cached_ratio(q.Configuration(name, "defaults", vae_set=(setting,), relative_to="baseline"), base, tmp_path)
    assert timed == ["defaults", "b8", "loop", "sc", "ms", "off"]  # another structural term, or none, costs otherwise
    # an option that is off stays out of the key, so ratios cached before it existed still apply
    den = q.stage_configs(defaults, (1.0, 1.0), tmp_path, 0)[1]
    assert "self_condition" not in q.speed_settings(den)["model"]
    assert q.speed_settings(q.stage_configs(self_cond, (1.0, 1.0), tmp_path, 0)[1])["model"]["self_condition"] is True


def test_quality_budget_splits_a_budget_by_the_calibration():
    q = quality_budget_module()
    cal = q.Calibration(vae_update=0.1, vae_fixed=5.0, den_update=0.2, den_fixed=5.0, vae_steps=1000, den_steps=500)
    vae_factor, den_factor = cal.factors(300.0, None)  # 290 s of training: f·(1000·0.1 + 500·0.2) = 290
    assert vae_factor == den_factor == pytest.approx(290 / 200)
    vae_factor, den_factor = cal.factors(300.0, 0.6)  # the VAE gets 60 % of the 290 s
    assert vae_factor * 1000 * 0.1 == pytest.approx(0.6 * 290)
    assert den_factor * 500 * 0.2 == pytest.approx(0.4 * 290)


def test_quality_budget_keys_a_ratio_by_what_auto_resolves_to(tmp_path, monkeypatch):
    """Spelling out what `auto` means on this CPU is the same speed pair; a CPU where
    `auto` means bf16 for the VAE makes `mixed_precision = "no"` a different one."""
    from ldm_cli.training import speed

    q, timed, base, defaults = ratio_counting(monkeypatch)
    float32 = q.Configuration("fp32", "defaults", vae_set=("train.mixed_precision='no'",), relative_to="baseline")
    monkeypatch.setattr(speed, "has_native_bf16", lambda device: False)
    q.cached_ratio(defaults, base, tmp_path)
    q.cached_ratio(float32, base, tmp_path)
    assert timed == ["defaults"]
    monkeypatch.setattr(speed, "has_native_bf16", lambda device: True)
    q.cached_ratio(defaults, base, tmp_path)
    q.cached_ratio(float32, base, tmp_path)
    assert timed == ["defaults", "defaults"]  # auto now means bf16 for the VAE: a new pair; "no" is the old one
