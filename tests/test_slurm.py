"""slurm/ scripts on a faked SLURM: complete runs, SIGUSR1 → checkpoint + requeue → exact resume.

`scontrol` (and, for the multi-node script, `srun`) are small fakes first on PATH; the
trainers are real, on CPU, with 1 or 2 processes per "node".
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_vae_overrides
from ldm_cli.training import rundir

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
JOB_ID = "4242"
STEPS = 40
RUN_TIMEOUT_S = 240

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$SCONTROL_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; fi
"""

# srun --ntasks-per-node=1 on SLURM_NNODES "nodes", all on this machine; like the real
# srun it forwards SIGUSR1/SIGTERM to its tasks and fails when a task fails.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do
        wait "$pid"; code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    (( code != 0 )) && status=$code
done
exit $status
"""


def free_port(low: int = 29500, high: int = 30500) -> int:
    """A free TCP port in [low, high) (the range the sbatch scripts derive ports from)."""
    for port in range(low + os.getpid() % 400, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def fake_slurm(tmp: Path, procs_per_node: int, nodes: int = 1) -> dict[str, str]:
    """Environment of a fake SLURM job: fake scontrol/srun first on PATH, CPU trainers."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU trainers on a GPU machine too
    return {
        **env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SCONTROL_LOG": str(tmp / "scontrol.log"),
        "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": str(nodes), "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_SUBMIT_DIR": str(REPO), "LDM_PYTHON": sys.executable, "LDM_PROCS_PER_NODE": str(procs_per_node),
        "LDM_MAIN_PORT": str(free_port()), "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1", "COLUMNS": "400",
    }


def ldm_args(run: Path) -> list[str]:
    sets = tiny_vae_overrides(run, steps=STEPS) + ["logging.log_every=1000"]
    return ["train-vae", *[arg for value in sets for arg in ("--set", value)]]


def start(script: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a slurm/ script in a session of its own, its output in `log`."""
    with log.open("a") as out:
        return subprocess.Popen(["bash", str(SLURM / script), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{proc.args} did not finish:\n{log.read_text()[-4000:]}")


def run_to_end(script: str, args: list[str], env: dict[str, str], log: Path) -> int:
    return finish(start(script, args, env, log), log)


def metric_steps(run: Path) -> list[int]:
    if not (run / rundir.METRICS_CSV).is_file():
        return []
    with open(run / rundir.METRICS_CSV, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def wait_for_steps(run: Path, count: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll metrics.csv until `count` updates are logged (the trainer is past start-up)."""
    deadline = time.monotonic() + timeout
    while len(metric_steps(run)) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"training did not reach {count} steps:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def requeues(env: dict[str, str]) -> list[str]:
    log = Path(env["SCONTROL_LOG"])
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.exists() else []


def final_state(run: Path) -> dict:
    return torch.load(rundir.latest_checkpoint(run) / rundir.STATE_FILE, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part, get in (("model", lambda s: s["model"]), ("ema", lambda s: s["ema"]["shadow"])):
        for key, value in get(a).items():
            torch.testing.assert_close(get(b)[key], value, rtol=0, atol=1e-6, msg=lambda m: f"{part}.{key}: {m}")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("script", ["train.sh", "train.sbatch", "train-multinode.sbatch"])
def test_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_train_sh_refuses_resume_flags(tmp_path):
    env = fake_slurm(tmp_path, 1)
    proc = subprocess.run(["bash", str(SLURM / "train.sh"), "train-vae", "--resume"], env=env, capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "resumes a run by itself" in proc.stderr


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def finished_run(request, tmp_path_factory):
    """train.sh run to the end, uninterrupted, with 1 or 2 processes: (procs, run, log, env)."""
    procs = request.param
    tmp = tmp_path_factory.mktemp(f"slurm-{procs}")
    env, run, log = fake_slurm(tmp, procs), tmp / "run", tmp / "train.log"
    code = run_to_end("train.sh", ldm_args(run), env, log)
    assert code == 0, log.read_text()[-4000:]
    return procs, run, log, env


def test_train_sh_runs_to_the_end(finished_run):
    procs, run, log, env = finished_run
    text = log.read_text()
    assert f"{procs} process(es) here, {procs} in all" in text
    assert f"({procs} process(es) × {16 // procs} × 1 accumulation)" in text
    assert metric_steps(run) == list(range(1, STEPS + 1))
    assert (run / "vae.safetensors").is_file()
    assert requeues(env) == [], "a finished run is not requeued"
    records = [torch.load(rundir.latest_checkpoint(run) / f"rng-{r}.pt", weights_only=True) for r in range(procs)]
    assert {r["world_size"] for r in records} == {procs}


def test_sigusr1_checkpoints_requeues_and_resumes_exactly(finished_run, tmp_path):
    procs, reference, _, _ = finished_run
    env, run, log = fake_slurm(tmp_path, procs), tmp_path / "run", tmp_path / "train.log"

    job = start("train.sh", ldm_args(run), env, log)
    wait_for_steps(run, 3, job, log)
    job.send_signal(signal.SIGUSR1)  # SLURM's B:USR1 goes to the batch script alone
    assert finish(job, log) == 0, log.read_text()[-4000:]
    assert requeues(env) == [f"requeue {JOB_ID}"]
    reached = metric_steps(run)[-1]
    assert 3 <= reached < STEPS, "stopped early, after the step it was in"
    assert final_state(run)["step"] == reached, "a complete checkpoint at the step it reached"
    assert not list((run / rundir.CHECKPOINTS).glob(".tmp-*"))
    assert not (run / "vae.safetensors").exists()

    assert run_to_end("train.sh", ldm_args(run), env, log) == 0, log.read_text()[-4000:]
    assert "resuming" in log.read_text()
    assert requeues(env) == [f"requeue {JOB_ID}"], "the resumed run finished: no second requeue"
    assert metric_steps(run) == list(range(1, STEPS + 1))
    assert (run / "vae.safetensors").is_file()
    assert_same_weights(final_state(reference), final_state(run))


def test_multinode_sbatch_stops_both_nodes_and_requeues_once(tmp_path):
    """Two fake nodes (1 process each) through train-multinode.sbatch and a fake srun."""
    env, run, log = fake_slurm(tmp_path, 1, nodes=2), tmp_path / "run", tmp_path / "job.log"
    env["LDM_MAIN_PORT"] = ""  # the sbatch script derives it from the job id, as on a cluster
    env["SLURM_JOB_ID"] = str(100_000 + free_port() - 29500)
    job = start("train-multinode.sbatch", ldm_args(run), env, log)
    wait_for_steps(run, 3, job, log)
    job.send_signal(signal.SIGUSR1)
    assert finish(job, log) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "node 0/2" in text and "node 1/2" in text, "each node expanded its own SLURM_NODEID"
    assert "(2 process(es) × 8 × 1 accumulation)" in text
    assert requeues(env) == [f"requeue {env['SLURM_JOB_ID']}"], "node 0 alone requeues"
    folder = rundir.latest_checkpoint(run)
    assert final_state(run)["step"] == metric_steps(run)[-1] < STEPS
    records = [torch.load(folder / f"rng-{r}.pt", weights_only=True) for r in range(2)]
    assert [r["process_index"] for r in records] == [0, 1]
    assert records[0]["model_sha256"] == records[1]["model_sha256"]
