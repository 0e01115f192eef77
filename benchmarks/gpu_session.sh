#!/usr/bin/env bash
# One accelerator session of the performance checks, each stage started only if the time it needs
# is left, its log written as it runs (for a device lease where one call is all there is):
#
#     bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S=500]
#
#   gpu_check  benchmarks/gpu_check.py --peer: batch-128 train steps/s and MFU, fp32 / bf16,
#              50-step DDIM throughput, peak memory, diffusers' UNet2DModel on the same GPU
#   profile    benchmarks/profile_steps.py: the bf16 batch-128 train step's top device ops and
#              the device's summed op time per step (the wall time inside the trace includes the
#              tracer's own work: 530 ms a call against 21 ms of kernels on an H100)
#   arms       benchmarks/variant_ab.py: the CPU-motivated choices against what they replaced,
#              on the GPU (bf16 batch-128 train step, K=1)
#   xla        benchmarks/variant_ab.py --xla_options: XLA:GPU compile options on the same step
#
# SMOKE=1 runs the same stages on a tiny U-Net (ch 32, batch 4; gpu_check --smoke): a CPU check of
# the script itself.
# On an H100 (jax 0.11.2, 2026-11-28) the stages took 255 s (gpu_check; its peer ran out of memory
# in the same process then, and now runs in one of its own, 31 s more), 54 s (profile) and 192 s
# (arms: five compiles of 27 to 35 s, the ddm arm's 4 s from the cache): each stage's start
# threshold below is that time. All four need about 10 minutes, one device call's limit, so give
# BUDGET_S as what the lease leaves; the stages run in order of what they are worth.
# OUT_DIR gets summary.txt (each stage's exit status and the time it ended) and one log per stage.
# Compiles are shared between stages through JAX's persistent cache (the K=1 train call of the
# profile, arms and xla stages is the same program).
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S]}
budget=${2:-500}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ddm_jax_cache}
start=$SECONDS
batch=128 small=() smoke=()
if [[ ${SMOKE:-0} == 1 ]]; then batch=4 small=(--ch 32) smoke=(--smoke); fi

stage() {  # stage NAME SECONDS_NEEDED COMMAND...
  local name=$1 need=$2 left
  shift 2
  left=$((budget - (SECONDS - start)))
  if ((left < need)); then
    echo "skipped $name: $left s left of $budget, it needs about $need" | tee -a "$out/summary.txt"
    return
  fi
  echo "== $name ($left s left)"
  timeout "$left" "$@" 2>&1 | tee "$out/$name.log"
  echo "$name: exit ${PIPESTATUS[0]} at $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
} | tee "$out/summary.txt"

stage gpu_check 290 "$py" "$here/gpu_check.py" --peer --train_calls 6 --out "$out/gpu_check.json" "${smoke[@]}"
stage profile 60 "$py" "$here/profile_steps.py" --steps train --batch $batch --dtype bfloat16 --calls 3 --top 25 \
  --trace_dir /tmp/ddm_profile "${small[@]}"
stage arms 200 "$py" "$here/variant_ab.py" --dtype bfloat16 --steps train --batches $batch --k 1 --calls 10 \
  --arms ddm,dense_4d,threefry_dropout,optax_clip,nearest_upsample "${small[@]}"
stage xla 150 "$py" "$here/variant_ab.py" --dtype bfloat16 --steps train --batches $batch --k 1 --calls 10 --arms ddm "${small[@]}" \
  --xla_options 'no_command_buffer={"xla_gpu_enable_command_buffer": ""}' \
  --xla_options 'no_triton_gemm={"xla_gpu_enable_triton_gemm": false}' \
  --xla_options 'cudnn_gemm_fusion={"xla_gpu_cudnn_gemm_fusion_level": 2}'
echo "total $((SECONDS - start)) s" | tee -a "$out/summary.txt"
