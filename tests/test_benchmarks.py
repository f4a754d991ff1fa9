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
