#!/usr/bin/env bash
# Run one `ldm` training command on this node, under SLURM, with preemption handling.
#
#   slurm/train.sh train-vae --config configs/vae.toml --data /data/ffhq --out runs/ffhq-vae
#
# Called by slurm/train.sbatch (one node) and, through srun once per node, by
# slurm/train-multinode.sbatch. It
#   - launches the processes of this node with `accelerate launch` (one per GPU, or
#     LDM_PROCS_PER_NODE CPU processes when the node has no GPU);
#   - passes --auto-resume, so a requeued job continues from its newest checkpoint;
#   - on SIGUSR1 or SIGTERM (SLURM's warning before the time limit, or preemption)
#     tells the trainer to finish its step and save a checkpoint on every rank, waits
#     for it, and requeues the job (`scontrol requeue`).
#
# Environment (set by SLURM, or by hand for a dry run):
#   SLURM_JOB_ID, SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST
#   LDM_MACHINE_RANK   this node's rank (default SLURM_NODEID)
#   LDM_MAIN_ADDR      head node (default: first of `scontrol show hostnames`)
#   LDM_MAIN_PORT      rendezvous port (default 29500 + SLURM_JOB_ID % 1000)
#   LDM_PROCS_PER_NODE processes per node (default: number of GPUs, or 1 without GPUs)
#   LDM_PYTHON         python that has ldm installed (default: python3)
set -uo pipefail

EXIT_PREEMPTED=75  # what `ldm train-*` exits with after saving on a signal

if [[ $# -lt 1 ]]; then
    echo "usage: slurm/train.sh train-vae|train-denoiser [ldm options...]" >&2
    exit 2
fi
: "${SLURM_JOB_ID:?slurm/train.sh runs inside a SLURM job (SLURM_JOB_ID is not set)}"

python=${LDM_PYTHON:-python3}
nnodes=${SLURM_NNODES:-1}
machine_rank=${LDM_MACHINE_RANK:-${SLURM_NODEID:-0}}
main_port=${LDM_MAIN_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
if [[ -z "${LDM_MAIN_ADDR:-}" ]]; then
    LDM_MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
procs_per_node=${LDM_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
total=$(( nnodes * procs_per_node ))

launch=("$python" -m accelerate.commands.launch
        --num_machines "$nnodes" --machine_rank "$machine_rank"
        --main_process_ip "$LDM_MAIN_ADDR" --main_process_port "$main_port"
        --num_processes "$total" --mixed_precision no --dynamo_backend no)
if (( total > 1 )); then
    launch+=(--multi_gpu)  # torch.distributed; ldm forms a gloo group itself on CPU nodes
fi
launch+=(-m ldm_cli "$@" --auto-resume)

echo "ldm slurm: job $SLURM_JOB_ID node $machine_rank/$nnodes, $procs_per_node process(es) here, $total in all, head $LDM_MAIN_ADDR:$main_port"

# The launcher and its workers get their own process group, so that one signal
# reaches every process of this node.
warned=0
child=0
forward_signal() {
    warned=1
    echo "ldm slurm: signal received; asking the trainer to checkpoint and stop"
    (( child > 0 )) && kill -TERM -- "-$child" 2>/dev/null
}
trap forward_signal USR1 TERM

setsid "${launch[@]}" &
child=$!
status=0
while true; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break  # wait was interrupted by a trapped signal
done
# A launcher can exit before its workers have finished saving: wait for the group.
while pgrep -g "$child" >/dev/null 2>&1; do
    sleep 1
done

if (( warned == 1 || status == EXIT_PREEMPTED )); then
    if (( machine_rank == 0 )); then
        echo "ldm slurm: checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
exit "$status"
