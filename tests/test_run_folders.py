"""Run folders are never lost or wedged: a failed resume changes nothing, a start that
never reached a checkpoint is started over, one trainer at a time, Ctrl-C saves, and a
full disk is one line with the previous checkpoint intact."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_denoiser_overrides, tiny_vae_overrides
from ldm_cli.cli import app
from ldm_cli.config import VAERunConfig, load_config
from ldm_cli.errors import CheckpointError, DiskFullError, UsageError
from ldm_cli.training import rundir
from ldm_cli.training.vae_task import train_vae

runner = CliRunner()
TIMEOUT_S = 180


def ldm(*args):
    return runner.invoke(app, [str(a) for a in args])


def sets(values):
    return [arg for value in values for arg in ("--set", value)]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ldm: error:")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def vae_run(out: Path, steps: int = 10, *extra: str) -> VAERunConfig:
    return load_config(VAERunConfig, None, tiny_vae_overrides(out, steps) + list(extra))


@pytest.fixture
def finished_vae_run(tmp_path) -> Path:
    run = tmp_path / "run"
    train_vae(vae_run(run, 10))
    return run


# --------------------------------------------------------------------------- a resume that cannot start


@pytest.mark.parametrize("change", ["model.base_channels=16", "model.latent_channels=3"])
def test_a_resume_with_another_model_is_refused_and_changes_nothing(finished_vae_run, change):
    before = snapshot(finished_vae_run)
    result = ldm("train-vae", "--out", finished_vae_run, "--resume", "--max-steps", 20, "--set", change)
    assert result.exit_code == 2, result.output
    key = change.split("=")[0]
    assert len(error_lines(result)) == 1 and key in error_lines(result)[0], result.stderr
    assert snapshot(finished_vae_run) == before, "a refused resume must not write into the run"
    again = ldm("train-vae", "--out", finished_vae_run, "--resume", "--max-steps", 12)
    assert again.exit_code == 0, again.output


def test_a_resume_with_settings_that_break_exactness_warns_naming_them(finished_vae_run, capsys):
    cfg = vae_run(finished_vae_run, 14, "optim.lr=1e-3", "train.batch_size=8")
    result = train_vae(cfg, resume=True)
    assert result.final_step == 14
    err = capsys.readouterr().err
    assert "--resume with changed settings" in err and "optim.lr" in err and "train.batch_size" in err
    assert "train.max_steps" not in err, "running longer is what resume is for"


def test_a_checkpoint_of_another_shape_names_the_first_tensors_that_differ(finished_vae_run):
    state_file = rundir.latest_checkpoint(finished_vae_run) / rundir.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 1)
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=rf"does not fit this model: {name} has shape \(3, 1\) in the file"):
        train_vae(vae_run(finished_vae_run, 12), resume=True)


def test_a_denoiser_resumed_on_another_vae_is_refused(tmp_path, trained_vae):
    run = tmp_path / "den"
    from ldm_cli.config import DenoiserRunConfig
    from ldm_cli.training.denoiser_task import train_denoiser

    train_denoiser(load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(run, trained_vae, 4)))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-vae.safetensors"  # the same weights in another file: its digest differs
    with safe_open(str(trained_vae), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(trained_vae)), str(other), metadata={**metadata, "note": '"a copy"'})
    before = snapshot(run)
    with pytest.raises(UsageError, match="vae_sha256"):
        train_denoiser(load_config(DenoiserRunConfig, None, tiny_denoiser_overrides(run, other, 8)), resume=True)
    assert snapshot(run) == before


# --------------------------------------------------------------------------- a start that never checkpointed


def test_a_start_that_failed_before_its_first_checkpoint_is_started_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text("# left by a start that failed\n")
    (run / rundir.METRICS_CSV).write_text("step,loss\n1,0.5\n")
    result = train_vae(vae_run(run, 4))
    assert result.final_step == 4
    assert "never saved a checkpoint" in capsys.readouterr().err
    with open(run / rundir.METRICS_CSV) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_resume_of_a_start_that_never_checkpointed_starts_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text("# left by a start that was stopped\n")
    assert train_vae(vae_run(run, 3), resume=True).final_step == 3


def test_a_config_that_fails_to_start_writes_nothing(tmp_path):
    run = tmp_path / "run"
    result = ldm("train-vae", *sets(tiny_vae_overrides(run, 3)), "--data", tmp_path / "no-such-folder")
    assert result.exit_code == 2
    assert not run.exists(), "a run that cannot start leaves no folder behind"


# --------------------------------------------------------------------------- one trainer per folder


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        (run / rundir.LOCK_FILE).write_text(f'{{"pid": {holder.pid}, "host": "{os.uname().nodename}", '
                                            f'"started": {time.time()}}}')
        result = ldm("train-vae", *sets(tiny_vae_overrides(run, 3)), "--overwrite")
        assert result.exit_code == 2, result.output
        assert f"another trainer is using it (pid {holder.pid}" in error_lines(result)[0]
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_at_the_end(tmp_path, capsys):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.mkdir()
    (run / rundir.LOCK_FILE).write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "started": 0}}')
    assert train_vae(vae_run(run, 2)).final_step == 2
    assert "stale lock" in capsys.readouterr().err
    assert not (run / rundir.LOCK_FILE).exists()


def test_two_trainers_started_together_leave_one_clean_run(tmp_path):
    """The race the lock exists for: both --overwrite into one folder at once."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "ldm_cli", "train-vae", *sets(tiny_vae_overrides(run, 30)), "--overwrite"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=TIMEOUT_S), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 2]), outcomes  # the second either waited its turn or was refused
    for code, err in outcomes:
        assert "Traceback" not in err, err
        if code == 2:
            assert "another trainer is using it" in err
    with open(run / rundir.METRICS_CSV) as f:
        assert f.read().count("step,") == 1, "one header: the runs never wrote at once"


# --------------------------------------------------------------------------- Ctrl-C


def metric_count(run: Path) -> int:
    try:
        with open(run / rundir.METRICS_CSV) as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


@contextmanager
def sigint_handler(handler) -> Iterator[None]:
    """SIGINT handled by `handler` inside the block, whatever this test process inherited: a
    shell starts background jobs (a CI script's `cmd &`) with SIGINT ignored, and the trainer
    rightly keeps an inherited SIG_IGN, as nohup'd jobs expect. A child started inside the
    block with a Python handler set gets SIGINT's default action (exec resets handlers)."""
    inherited = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, inherited)


def start_training(run: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "ldm_cli", "train-vae", *sets(tiny_vae_overrides(run, 400)),
            "--set", "logging.checkpoint_every=1000"]
    with log.open("w") as out, sigint_handler(signal.default_int_handler):  # Ctrl-C as in a terminal
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while metric_count(run) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return proc


def test_a_first_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start_training(run, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=TIMEOUT_S) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text
    saved = rundir.latest_checkpoint(run)
    assert saved is not None, text
    assert f"resume with: ldm train-vae --out {run} --resume" in text
    assert not (run / rundir.LOCK_FILE).exists()


def test_a_second_ctrl_c_stops_at_once():
    from ldm_cli.training.distributed import StopFlag

    with sigint_handler(signal.default_int_handler):  # as in a terminal (see above)
        with StopFlag() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.signal == "SIGINT", "the first Ctrl-C asks the loop to save and stop"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored():
    """A trainer started with SIGINT ignored (nohup, `cmd &` in a script) keeps ignoring it."""
    from ldm_cli.training.distributed import StopFlag

    with sigint_handler(signal.SIG_IGN), StopFlag() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert stop.signal is None


def test_two_quick_ctrl_c_end_in_one_line_and_exit_130_whenever_the_second_lands(tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start_training(run, log)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=TIMEOUT_S) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "stopped at once" in text or "resume with" in text, text
    assert not (run / rundir.LOCK_FILE).exists()


# --------------------------------------------------------------------------- full disk


def test_a_checkpoint_that_would_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    import ldm_cli.common.files as files

    run = tmp_path / "run"
    train_vae(vae_run(run, 4, "logging.checkpoint_every=2"))
    before = rundir.latest_checkpoint(run)
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskFullError, match=r"a checkpoint needs about .* but only 1000 bytes is free"):
        train_vae(vae_run(run, 8, "logging.checkpoint_every=2"), resume=True)
    assert rundir.latest_checkpoint(run) == before and (before / rundir.STATE_FILE).is_file()
    assert not list((run / rundir.CHECKPOINTS).glob(".tmp-*"))


def can_mount_tmpfs() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@pytest.fixture
def tiny_disk(tmp_path):
    reason = can_mount_tmpfs()
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_disk_that_fills_up_during_training_is_one_line_and_keeps_the_last_checkpoint(tiny_disk):
    run = tiny_disk / "run"
    result = ldm("train-vae", *sets(tiny_vae_overrides(run, 200)), "--set", "logging.checkpoint_every=1",
                 "--set", "logging.keep_checkpoints=50", "--set", "logging.preview_every=1000")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = error_lines(result)
    assert str(tiny_disk) in line and ("free" in line or "space" in line), line
    newest = rundir.latest_checkpoint(run)
    assert newest is not None and (newest / rundir.STATE_FILE).is_file()
    torch.load(newest / rundir.STATE_FILE, weights_only=True)  # whole, loadable
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
