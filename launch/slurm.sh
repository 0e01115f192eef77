#!/usr/bin/env bash
#SBATCH --job-name=ddm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Train on several GPU nodes under SLURM: one process per node, each using all of its node's GPUs.
#
#   sbatch launch/slurm.sh [--dry-run] [extra ddm.main flags...]     (submit from the repository root)
#   sbatch --nodes=4 launch/slurm.sh --config.train.batch_size=512
#
# Edit: the #SBATCH lines above (nodes, GPUs per node, time; keep one task per node) and the block below.
# Does: takes the first node of $SLURM_JOB_NODELIST (scontrol show hostnames) as the coordinator and
# starts `python -m ddm.main` on every node with one srun, passing --coordinator_address=<first node>:PORT,
# --num_processes=$SLURM_NTASKS and --process_id=$SLURM_PROCID (each task's own).
# WORKDIR must be on a file system every node sees: all processes take part in each checkpoint and read
# it back on resume. Submit the same job again to resume.
# --dry-run prints the srun command, then the command each process runs, instead of running them.
set -euo pipefail

# ---- edit here ---------------------------------------------------------------------------------
CONFIG="${CONFIG:-configs/cifar10_cosine.py}"            # experiment config
WORKDIR="${WORKDIR:-runs/$(basename "${CONFIG}" .py)}"   # on a shared file system; resumed from
PYTHON="${PYTHON:-python}"                               # the environment's python, e.g. ~/venvs/ddm/bin/python
PORT="${PORT:-$(( 61440 + ${SLURM_JOB_ID:-0} % 4096 ))}" # coordinator port on the first node (per job, like JAX)
# ------------------------------------------------------------------------------------------------

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

: "${SLURM_JOB_NODELIST:?is not set: run this inside a SLURM allocation (sbatch launch/slurm.sh)}"
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"  # sbatch runs a copy of this script; srun inherits this directory
mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
num_processes="${SLURM_NTASKS:-${#nodes[@]}}"
if (( num_processes != ${#nodes[@]} )); then
  echo "SLURM_NTASKS=${num_processes} on ${#nodes[@]} nodes: this script runs one process per node;" \
       "use #SBATCH --ntasks-per-node=1" >&2
  exit 1
fi

cmd=("${PYTHON}" -m ddm.main "--config=${CONFIG}" "--workdir=${WORKDIR}"
     "--coordinator_address=${nodes[0]}:${PORT}" "--num_processes=${num_processes}" "$@")
# One srun starts a task per node; each task's shell fills in its own SLURM_PROCID.
srun_cmd=(srun "--ntasks=${num_processes}" --ntasks-per-node=1 --kill-on-bad-exit=1
          bash -c "exec $(printf '%q ' "${cmd[@]}")--process_id=\"\${SLURM_PROCID}\"")
if (( dry_run )); then
  printf '%q ' "${srun_cmd[@]}"
  printf '\n'
  for i in "${!nodes[@]}"; do
    printf '# process %d on %s: ' "${i}" "${nodes[i]}"
    printf '%q ' "${cmd[@]}" "--process_id=${i}"
    printf '\n'
  done
else
  exec "${srun_cmd[@]}"
fi
