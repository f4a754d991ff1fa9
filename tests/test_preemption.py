"""Stopping and resuming: SIGTERM → checkpoint + exit 75 → exact resume; damaged
checkpoints are skipped; non-finite losses are skipped, counted, and stop the run."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from conftest import tiny_vae_overrides
from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.errors import CheckpointError, LdmError
from ldm_cli.training import rundir
from ldm_cli.training.loop import EXIT_PREEMPTED, TrainTask, train
from ldm_cli.training.state import load_checkpoint

TIMEOUT_S = 180


def metric_rows(run: Path) -> list[dict]:
    if not (run / rundir.METRICS_CSV).is_file():
        return []
    with open(run / rundir.METRICS_CSV, newline="") as f:
        return list(csv.DictReader(f))


def state_at(run: Path, step: int | None = None) -> dict:
    folder = rundir.latest_checkpoint(run) if step is None else rundir.checkpoint_dir(run, step)
    return torch.load(folder / rundir.STATE_FILE, map_location="cpu", weights_only=True)


def weights(state: dict) -> dict[str, torch.Tensor]:
    """Model and EMA tensors of a training state, under one namespace."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    if state.get("ema"):
        out.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    return out


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


# --------------------------------------------------------------------------- SIGTERM, exit 75, exact resume


def ldm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldm_cli", *args]


def test_sigterm_saves_exits_75_and_resume_is_exact(tmp_path):
    """All three runs through the CLI (same packaged base config, same one thread each), on the
    CPU: a GPU's kernels are not deterministic, so bitwise equality is a CPU promise."""
    steps = 40
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def sets(run: Path) -> list[str]:
        return [arg for value in tiny_vae_overrides(run, steps) for arg in ("--set", value)]

    reference = tmp_path / "straight"
    straight = subprocess.run(ldm("train-vae", *sets(reference)), env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run, log = tmp_path / "stopped", tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(ldm("train-vae", *sets(run)), env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while len(metric_rows(run)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT_S) == EXIT_PREEMPTED, log.read_text()[-3000:]

    reached = int(metric_rows(run)[-1]["step"])
    assert 3 <= reached < steps
    assert f"stopped by SIGTERM at step {reached}" in log.read_text()
    assert state_at(run)["step"] == reached, "saved a checkpoint at the step it reached"
    assert not (run / "vae.safetensors").exists()

    resumed = subprocess.run(ldm("train-vae", "--out", str(run), "--resume"), env=env, capture_output=True,
                             text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {reached}" in resumed.stderr
    assert [int(r["step"]) for r in metric_rows(run)] == list(range(1, steps + 1))
    assert_same_weights(state_at(reference), state_at(run))
    assert [r["loss"] for r in metric_rows(run)] == [r["loss"] for r in metric_rows(reference)]


# --------------------------------------------------------------------------- a toy task for the loop itself


class ToyRunConfig(VAERunConfig):
    """A run config whose export is `toy.safetensors`; only .train, .optim, .logging and
    .output matter to `train()`."""

    task_name: ClassVar[str] = "toy"


def toy_config(run: Path, steps: int, *extra: str) -> ToyRunConfig:
    return load_config(ToyRunConfig, None, [
        f"output.dir='{run}'", f"train.max_steps={steps}", "train.batch_size=8", "train.ema_decay=0.5",
        "optim.warmup_steps=1", "optim.lr=0.05", "logging.checkpoint_every=1", "logging.keep_checkpoints=100",
        *extra,
    ])


def toy_task(bad_steps=(), poison_at=None, on_build=None):
    """nn.Linear regression on 64 fixed examples; the loss is NaN at the updates in `bad_steps`,
    and at update `poison_at` the weights turn infinite behind the optimizer's back."""

    def build(accelerator) -> TrainTask:
        if on_build is not None:
            on_build()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=gen)
        data = torch.cat([x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])], dim=1)

        def loss(model: nn.Module, batch: torch.Tensor, step: int):
            value = F.mse_loss(model(batch[:, :4]), batch[:, 4:])
            if step == poison_at:
                with torch.no_grad():
                    next(model.parameters()).fill_(math.inf)
            return (value * math.nan if step in bad_steps else value), {}

        def export(model: nn.Module, path: Path) -> None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

        return TrainTask(name="toy", model=nn.Linear(4, 1), num_examples=64, get_batch=lambda i: data[i],
                         loss=loss, export=export)

    return build


def train_toy(run: Path, steps: int, *extra: str, resume: bool = False, **task_kw):
    return train(toy_task(**task_kw), toy_config(run, steps, *extra), resume=resume)


def assert_same_state(a: dict, b: dict) -> None:
    assert_same_weights(a, b, atol=0)
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), f"optimizer {key}.{name}"


# --------------------------------------------------------------------------- damaged checkpoints


def test_a_save_killed_midway_is_ignored(tmp_path):
    run = tmp_path / "run"
    train_toy(run, 6, "logging.checkpoint_every=2")
    root = run / rundir.CHECKPOINTS
    (root / ".tmp-step-00000008").mkdir()  # killed while writing
    (root / ".tmp-step-00000008" / "rng-0.pt").write_bytes(b"partial")
    (root / "step-00000010").mkdir()  # renamed without its state.pt (not our writer, but be safe)
    (root / "step-00000010" / "rng-0.pt").write_bytes(b"partial")

    result = train_toy(run, 10, "logging.checkpoint_every=2", resume=True)
    assert result.steps_done == 4 and result.final_step == 10, "resumed from step 6, the newest complete one"
    assert [int(r["step"]) for r in metric_rows(run)] == list(range(1, 11))
    assert not (root / ".tmp-step-00000008").exists(), "stale temporary folders are cleaned up"
    assert_same_state(state_at(_straight_toy(tmp_path, 10, "logging.checkpoint_every=2")), state_at(run))


def _straight_toy(tmp_path: Path, steps: int, *extra: str) -> Path:
    run = tmp_path / f"straight-{steps}"
    train_toy(run, steps, *extra)
    return run


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train_toy(run, 6)
    newest = rundir.checkpoint_dir(run, 6) / rundir.STATE_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated on disk
    capsys.readouterr()

    result = train_toy(run, 8, resume=True)
    err = capsys.readouterr().err
    assert "step-00000006" in err and "does not load" in err, err
    assert "from step 5" in err
    assert result.steps_done == 3 and result.final_step == 8
    assert_same_state(state_at(_straight_toy(tmp_path, 8)), state_at(run))


def test_resume_with_no_loadable_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    train_toy(run, 2)
    for _, folder in rundir.complete_checkpoints(run):
        (folder / rundir.STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint under .* loads"):
        train_toy(run, 4, resume=True)


# --------------------------------------------------------------------------- stop requests


def test_a_stop_during_start_up_saves_before_the_first_update(tmp_path):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    result = train_toy(run, 5, on_build=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert result.preempted and result.final_step == 0 and result.steps_done == 0
    assert state_at(run)["step"] == 0
    assert signal.getsignal(signal.SIGTERM) == before, "the handler is put back"
    result = train_toy(run, 5, resume=True)
    assert result.final_step == 5 and not result.preempted
    assert_same_state(state_at(_straight_toy(tmp_path, 5)), state_at(run))


# --------------------------------------------------------------------------- non-finite losses


def test_isolated_nonfinite_updates_are_skipped_and_counted(tmp_path):
    run = tmp_path / "run"
    result = train_toy(run, 10, bad_steps={3, 7})
    assert result.skipped_nonfinite == 2 and result.final_step == 10 and not result.preempted
    for bad in (3, 7):  # the update after `bad` updates is the skipped one
        assert_same_state(state_at(run, bad), state_at(run, bad + 1))
    assert not torch.equal(state_at(run, 5)["model"]["weight"], state_at(run, 4)["model"]["weight"])
    rows = metric_rows(run)
    assert [math.isnan(float(r["loss"])) for r in rows] == [i in (4, 8) for i in range(1, 11)]
    assert all(torch.isfinite(v).all() for v in weights(state_at(run)).values())
    assert (run / "toy.safetensors").is_file()


def test_nonfinite_losses_in_a_row_stop_the_run_naming_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LdmError) as info:
        train_toy(run, 20, "logging.max_nonfinite_in_row=3", "logging.checkpoint_every=2",
                  bad_steps=set(range(5, 20)))
    message = str(info.value)
    assert "3 non-finite losses in a row at step 8" in message
    named = re.search(r"last good checkpoint: (\S+)", message).group(1)
    assert Path(named) == rundir.latest_checkpoint(run) == rundir.checkpoint_dir(run, 6)
    state, record = load_checkpoint(Path(named), 0)
    assert state["step"] == 6 and record["world_size"] == 1
    assert all(torch.isfinite(v).all() for v in weights(state).values())
    assert not (run / "toy.safetensors").exists()


def test_weights_that_overflow_are_never_saved(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LdmError, match="weights are not finite at step 2; they were not saved; last good "
                                       r"checkpoint: .*step-00000001"):
        train_toy(run, 4, poison_at=1)
    assert [step for step, _ in rundir.complete_checkpoints(run)] == [1]
