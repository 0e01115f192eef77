#!/usr/bin/env bash
# Train (or sample) on one machine with all its local accelerators.
#
#   launch/local.sh [--dry-run] [extra ddm.main flags...]
#
# Edit CONFIG and WORKDIR below (or set them in the environment). JAX uses every local GPU/TPU;
# the run resumes from the newest checkpoint in WORKDIR. --dry-run prints the command only.
set -euo pipefail

CONFIG="${CONFIG:-configs/cifar10_cosine.py}"
WORKDIR="${WORKDIR:-runs/$(basename "${CONFIG}" .py)}"

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
