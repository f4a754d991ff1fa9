"""Two CPU processes (a real gloo group) train one model: through `accelerate launch` and `torchrun`.

Each launch costs ~10 s of start-up on two cores, so the runs are tiny and shared: one
2-process VAE run, resumed once with torchrun, and one 2-process denoiser run.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_denoiser_overrides, tiny_vae_overrides
from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.training import rundir
from ldm_cli.training.state import weights_digest
from ldm_cli.training.vae_task import train_vae

LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch() -> list[str]:
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def torchrun() -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def launch_env(cache: Path, home: Path) -> dict[str, str]:
    """The test's image cache, one thread per process, no user accelerate config, unwrapped lines,
    no GPUs (the group under test is the gloo CPU one, also on a machine with one GPU)."""
    return {**os.environ, "LDM_CACHE_DIR": str(cache), "HF_HOME": str(home), "OMP_NUM_THREADS": "1",
            "COLUMNS": "400", "CUDA_VISIBLE_DEVICES": ""}


def run_ldm(launcher: list[str], args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *launcher, "-m", "ldm_cli", *args], env=env, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def as_set_args(overrides: list[str]) -> list[str]:
    return [arg for value in overrides for arg in ("--set", value)]


def metric_steps(run: Path) -> list[int]:
    with open(run / rundir.METRICS_CSV, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def assert_ranks_agree(folder: Path, world: int) -> None:
    """Every rank wrote its record, the world size is right, all hold state.pt's weights."""
    state = torch.load(folder / rundir.STATE_FILE, map_location="cpu", weights_only=True)
    records = [torch.load(folder / f"rng-{rank}.pt", map_location="cpu", weights_only=True) for rank in range(world)]
    assert not (folder / f"rng-{world}.pt").exists()
    assert [r["process_index"] for r in records] == list(range(world))
    assert {r["world_size"] for r in records} == {world}
    assert {r["step"] for r in records} == {int(state["step"])}
    assert {r["model_sha256"] for r in records} == {weights_digest(state["model"])}, "ranks hold different weights"
    ema = weights_digest(state["ema"]["shadow"]) if state.get("ema") else None
    assert {r["ema_sha256"] for r in records} == {ema}
    if world > 1:
        assert not torch.equal(records[0]["cpu"], records[1]["cpu"]), "each rank has its own random stream"


def assert_one_set_of_outputs(run: Path, proc: subprocess.CompletedProcess, export: str, steps: int,
                              previews: list[int], extra: set[str] = frozenset()) -> None:
    assert metric_steps(run) == list(range(1, steps + 1)), "the main process alone writes one row per update"
    assert {p.name for p in run.iterdir()} == {"config.toml", "metrics.csv", "metrics.png", "checkpoints",
                                               "previews", export, *extra}
    assert sorted(p.name for p in (run / "previews").iterdir()) == [f"step-{s:08d}.png" for s in previews]
    assert not list((run / rundir.CHECKPOINTS).glob(".tmp-*"))
    assert proc.stdout.count("exported") == 1
    assert "different weights" not in proc.stderr


@pytest.fixture(scope="module")
def two_process_vae(tmp_path_factory, _private_cache):
    """A 2-process `accelerate launch` VAE run of 8 updates, checkpoints at 4 and 8."""
    run = tmp_path_factory.mktemp("dist") / "vae"
    env = launch_env(_private_cache, tmp_path_factory.mktemp("hf-home"))
    sets = tiny_vae_overrides(run, steps=8) + ["logging.checkpoint_every=4"]
    proc = run_ldm(accelerate_launch(), ["train-vae", *as_set_args(sets)], env)
    return run, proc, env


def test_two_processes_split_the_batch_and_agree_on_one_vae(two_process_vae):
    run, proc, _ = two_process_vae
    assert "2 process(es) × 8 × 1 accumulation" in proc.stderr, "global batch 16 split over two ranks"
    assert ", 2 process(es))" in proc.stdout
    assert [step for step, _ in rundir.complete_checkpoints(run)] == [4, 8]
    for _, folder in rundir.complete_checkpoints(run):
        assert_ranks_agree(folder, world=2)
    assert_one_set_of_outputs(run, proc, "vae.safetensors", 8, previews=[8])


def test_torchrun_resumes_the_two_process_run(two_process_vae, tmp_path):
    source, _, env = two_process_vae
    run = tmp_path / "vae"
    shutil.copytree(source, run)
    proc = run_ldm(torchrun(), ["train-vae", "--out", str(run), "--resume", "--max-steps", "12"], env)
    assert "resuming" in proc.stderr and "from step 8" in proc.stderr
    assert ", 2 process(es))" in proc.stdout and "4 updates" in proc.stdout
    assert [step for step, _ in rundir.complete_checkpoints(run)] == [8, 12]
    assert_ranks_agree(rundir.checkpoint_dir(run, 12), world=2)
    assert_one_set_of_outputs(run, proc, "vae.safetensors", 12, previews=[8, 10, 12])


def test_two_processes_split_the_batch_and_agree_on_one_denoiser(trained_vae, tmp_path, _private_cache):
    run = tmp_path / "den"
    env = launch_env(_private_cache, tmp_path / "hf-home")
    sets = tiny_denoiser_overrides(run, trained_vae, steps=6) + ["logging.checkpoint_every=3"]
    proc = run_ldm(accelerate_launch(), ["train-denoiser", *as_set_args(sets)], env)
    assert "2 process(es) × 8 × 1 accumulation" in proc.stderr
    assert ", 2 process(es))" in proc.stdout
    assert [step for step, _ in rundir.complete_checkpoints(run)] == [3, 6]
    for _, folder in rundir.complete_checkpoints(run):
        assert_ranks_agree(folder, world=2)
    assert_one_set_of_outputs(run, proc, "denoiser.safetensors", 6, previews=[6], extra={rundir.LATENT_CACHE})


def test_single_process_checkpoint_holds_its_own_rank_record(tmp_path):
    run = tmp_path / "run"
    train_vae(load_config(VAERunConfig, None, tiny_vae_overrides(run, steps=2)))
    assert_ranks_agree(rundir.latest_checkpoint(run), world=1)


def test_weights_digest_sees_every_bit():
    weights = {"b": torch.zeros(3), "a": torch.arange(4, dtype=torch.bfloat16)}
    same = {"a": weights["a"].clone(), "b": weights["b"].clone()}
    assert weights_digest(weights) == weights_digest(same), "key order does not matter"
    flipped = {**same, "b": torch.tensor([0.0, -0.0, 0.0])}
    assert weights_digest(weights) != weights_digest(flipped), "-0.0 differs from 0.0 bitwise"
    assert weights_digest(None) is None


DESYNC_SCRIPT = '''
import sys
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.training.loop import TrainTask, train

run = Path(sys.argv[1])


def build(accelerator):
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = torch.cat([x, x.sum(1, keepdim=True)], 1)

    def loss(model, batch, step):
        if step == 2 and accelerator.process_index == 1:  # rank 1 drifts away behind DDP's back
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        return F.mse_loss(model(batch[:, :4]), batch[:, 4:]), {}

    return TrainTask(name="toy", model=nn.Linear(4, 1), num_examples=64, get_batch=lambda i: data[i], loss=loss,
                     export=lambda model, path: path.write_text("ok"))


class ToyRunConfig(VAERunConfig):
    task_name: ClassVar[str] = "toy"


config = load_config(ToyRunConfig, None, [f"output.dir='{run}'", "train.max_steps=4", "train.batch_size=8",
                                          "logging.checkpoint_every=2"])
train(build, config)
'''


def test_ranks_that_drift_apart_are_reported(tmp_path):
    script, run = tmp_path / "desync.py", tmp_path / "run"
    script.write_text(DESYNC_SCRIPT)
    proc = subprocess.run([sys.executable, *accelerate_launch(), str(script), str(run)], capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, env=launch_env(tmp_path / "cache", tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_ranks_agree(rundir.checkpoint_dir(run, 2), world=2)
    assert "step 2: processes hold different weights" not in proc.stderr
    assert "step 4: processes hold different weights (rank 0: " in proc.stderr
    records = [torch.load(rundir.checkpoint_dir(run, 4) / f"rng-{r}.pt", weights_only=True) for r in range(2)]
    assert records[0]["model_sha256"] != records[1]["model_sha256"]
