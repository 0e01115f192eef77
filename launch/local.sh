#!/usr/bin/env bash
# Train (or sample) on one machine with all its local accelerators, in one process.
#
#   launch/local.sh [--dry-run] [extra ddm.main flags...]     e.g. launch/local.sh --mode=sample
#
# Edit: CONFIG and WORKDIR in the block below (or set them in the environment).
# Does: runs `python -m ddm.main --config=CONFIG --workdir=WORKDIR [flags]` from the repository root.
# JAX uses every local GPU/TPU; the run resumes from the newest checkpoint in WORKDIR.
# --dry-run prints the command instead of running it.
set -euo pipefail

# ---- edit here ---------------------------------------------------------------------------------
CONFIG="${CONFIG:-configs/cifar10_cosine.py}"           # experiment config
WORKDIR="${WORKDIR:-runs/$(basename "${CONFIG}" .py)}"  # checkpoints, logs, samples; resumed from
# ------------------------------------------------------------------------------------------------

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

cd "$(dirname "$0")/.."
cmd=(python -m ddm.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
if (( dry_run )); then
  printf '%q ' "${cmd[@]}"
  printf '\n'
else
  exec "${cmd[@]}"
fi
