#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts): the same command on every worker. JAX finds the
# other workers itself: ddm.main calls jax.distributed.initialize(), which reads the pod from the TPU
# metadata server when JAX's TPU build (libtpu) is installed.
#
#   launch/tpu_pod.sh [--dry-run] [extra ddm.main flags...]     (run from your machine, in this checkout)
#
# Edit: the block below (TPU, ZONE, CONFIG, WORKDIR). Needs gcloud, logged in and with the project set
# (gcloud config set project ...), and an existing TPU VM whose software version has Python >= 3.10.
# Does:
#   1. copies setup.py, ddm/ and configs/ of this checkout to ~/REMOTE_DIR on every worker,
#   2. installs them there (pip install -e .) with "jax[tpu]" (JAX plus libtpu, from PyPI; for an old JAX add
#      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html),
#   3. starts `python3 -m ddm.main --config=CONFIG --workdir=WORKDIR [flags]` on all workers at once and
#      streams their output (Ctrl-C stops gcloud, but may leave the workers' processes running).
# WORKDIR must be a path every worker sees (an NFS/Filestore mount, or a bucket mounted with gcsfuse): all
# workers take part in each checkpoint and read it back on resume. Run it again to resume.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

# ---- edit here ---------------------------------------------------------------------------------
TPU="${TPU:-my-tpu-pod}"                                           # TPU VM name
ZONE="${ZONE:-us-central2-b}"                                      # its zone
CONFIG="${CONFIG:-configs/cifar10_cosine.py}"                      # experiment config
WORKDIR="${WORKDIR:-/mnt/shared/runs/$(basename "${CONFIG}" .py)}" # seen by every worker; resumed from
REMOTE_DIR="${REMOTE_DIR:-ddm}"                                    # the code, relative to the workers' home
# ------------------------------------------------------------------------------------------------

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

cd "$(dirname "$0")/.."
run() {  # run a command, or with --dry-run print it
  if (( dry_run )); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}
quoted() {  # words as one command line for the workers' shell
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}
tpu_vm=(gcloud compute tpus tpu-vm)
on_all=("--zone=${ZONE}" --worker=all)
in_dir="cd $(quoted "${REMOTE_DIR}") && "
run "${tpu_vm[@]}" ssh "${TPU}" "${on_all[@]}" "--command=$(quoted mkdir -p "${REMOTE_DIR}")"
run "${tpu_vm[@]}" scp --recurse setup.py ddm configs "${TPU}:${REMOTE_DIR}/" "${on_all[@]}"
run "${tpu_vm[@]}" ssh "${TPU}" "${on_all[@]}" "--command=${in_dir}$(quoted python3 -m pip install -e . "jax[tpu]")"
run "${tpu_vm[@]}" ssh "${TPU}" "${on_all[@]}" \
    "--command=${in_dir}$(quoted python3 -m ddm.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")"
