#!/usr/bin/env bash
# Run one `ldm` training command on this node, under SLURM, with preemption handling.
#
#   slurm/train.sh train-vae --config configs/vae.toml --data /data/ffhq --out runs/ffhq-vae
#
# Called by slurm/train.sbatch (one node) and, through srun once per node, by
# slurm/train-multinode.sbatch. It
#   - starts the trainer processes of this node: one `python -m ldm_cli` when the whole
#     job has one process, else `accelerate launch` with one process per GPU (or
#     LDM_PROCS_PER_NODE CPU processes, which form a gloo group);
#   - passes --auto-resume, so a requeued job continues from its newest checkpoint
#     (so do not pass --resume or --overwrite yourself);
#   - on SIGUSR1 or SIGTERM (SLURM's warning before the time limit, or preemption)
#     sends SIGTERM to the trainer processes themselves, which finish their update,
#     save a checkpoint on every rank and exit with 75; waits for that; and requeues
#     the job (`scontrol requeue`, from node 0 only) unless the run had just finished.
#
# Why the trainers and not the launcher: `accelerate launch --multi_gpu` runs
# torchelastic, which starts every worker in a session of its own (a signal to the
# launcher's process group never reaches them) and, when the launcher itself is
# signalled, gives its workers 30 s before SIGKILL — too little to save a large
# checkpoint. Left alone, the launcher simply waits for its workers to exit.
#
# Environment (set by SLURM, or by hand for a dry run):
#   SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST
#   LDM_MACHINE_RANK   this node's rank (default SLURM_NODEID)
#   LDM_MAIN_ADDR      head node (default: first of `scontrol show hostnames`)
#   LDM_MAIN_PORT      rendezvous port (default 29500 + SLURM_JOB_ID % 1000)
#   LDM_PROCS_PER_NODE processes per node (default: GPUs of this job on this node, else 1)
#   LDM_PYTHON         python that has ldm installed (default: python3)
# Exit status: 0 when the run finished, or when it saved and the job was requeued;
# otherwise the trainer's (or launcher's) status.
set -uo pipefail

EXIT_PREEMPTED=75  # what `ldm train-*` exits with after saving on a signal

if [[ $# -lt 1 ]]; then
    echo "usage: slurm/train.sh train-vae|train-denoiser [ldm options...]" >&2
    exit 2
fi
for arg in "$@"; do
    case "$arg" in
        --resume|--overwrite|--auto-resume)
            echo "slurm/train.sh: do not pass $arg; the script resumes a run by itself (--auto-resume)" >&2
            exit 2 ;;
    esac
done
: "${SLURM_JOB_ID:?slurm/train.sh runs inside a SLURM job (SLURM_JOB_ID is not set)}"

# GPUs this job may use on this node: SLURM's count, else CUDA_VISIBLE_DEVICES, else nvidia-smi.
gpus_here() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set and empty: no GPUs
        local ids
        IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    else
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    fi
}

python=${LDM_PYTHON:-python3}
nnodes=${SLURM_NNODES:-1}
machine_rank=${LDM_MACHINE_RANK:-${SLURM_NODEID:-0}}
main_port=${LDM_MAIN_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
if [[ -z "${LDM_MAIN_ADDR:-}" ]]; then
    LDM_MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
fi
gpus=$(gpus_here)
procs_per_node=${LDM_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
total=$(( nnodes * procs_per_node ))

if (( total == 1 )); then
    # One process: no launcher in between, so the trainer's exit status comes through.
    cmd=("$python" -m ldm_cli "$@" --auto-resume)
else
    # torch.distributed; on CPU nodes ldm forms a gloo group itself.
    cmd=("$python" -m accelerate.commands.launch --multi_gpu
         --num_machines "$nnodes" --machine_rank "$machine_rank"
         --main_process_ip "$LDM_MAIN_ADDR" --main_process_port "$main_port"
         --num_processes "$total" --mixed_precision no --dynamo_backend no
         -m ldm_cli "$@" --auto-resume)
fi

echo "ldm slurm: job $SLURM_JOB_ID node $machine_rank/$nnodes, $procs_per_node process(es) here, $total in all, head $LDM_MAIN_ADDR:$main_port"

launcher=0      # pid of the command above
stop_wanted=0   # a stop signal arrived
told=" "        # trainer pids already sent SIGTERM

# The processes that train: the command itself, or the launcher's children.
trainer_pids() {
    if (( total == 1 )); then
        echo "$launcher"
    else
        pgrep -P "$launcher" 2>/dev/null || true
    fi
}

# Send SIGTERM, once, to every trainer process that exists now.
tell_trainers() {
    local pid
    for pid in $(trainer_pids); do
        if [[ "$told" != *" $pid "* ]] && kill -TERM "$pid" 2>/dev/null; then
            told+="$pid "
        fi
    done
}

on_stop_signal() {
    stop_wanted=1
    echo "ldm slurm: $1 received; asking the trainer(s) to save a checkpoint and stop"
    (( launcher > 0 )) && tell_trainers
}
trap 'on_stop_signal SIGUSR1' USR1
trap 'on_stop_signal SIGTERM' TERM

"${cmd[@]}" &
launcher=$!

# `wait` returns early when a trapped signal arrives. After a stop signal, keep telling
# trainers that start late (a signal during start-up), once a second, until all exit.
wait "$launcher"
status=$?
if (( stop_wanted )); then
    while kill -0 "$launcher" 2>/dev/null; do
        tell_trainers
        sleep 1
    done
    wait "$launcher"
    last=$?
    (( last != 127 )) && status=$last  # 127: the first wait had already collected it
fi
# A trainer outliving its launcher (killed by someone else) still gets to finish saving.
for pid in $told; do
    while kill -0 "$pid" 2>/dev/null; do sleep 1; done
done

# Under a launcher a trainer's 75 arrives as a launcher failure: after our own stop
# request, any failure status means "stopped"; status 0 means the run had finished.
if (( status == EXIT_PREEMPTED || (stop_wanted && status != 0) )); then
    if (( machine_rank == 0 )); then
        echo "ldm slurm: checkpoint saved; requeueing job $SLURM_JOB_ID"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "ldm slurm: scontrol requeue failed; resubmit the job to continue (it resumes by itself)" >&2
            exit "$EXIT_PREEMPTED"
        fi
    fi
    exit 0
fi
exit "$status"
