#!/usr/bin/env bash
# One accelerator session of the performance checks, each stage started only if the time it needs
# is left, its log written as it runs (for a device lease where one call is all there is):
#
#     [STAGES=name,name] bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S=500]
#
#   candidates     benchmarks/variant_ab.py --k 4: what gpu_hlo.py found without a GPU, against ddm in
#                  experiment.train's call of 4 steps (per step, against ddm on 2026-11-28): the forms
#                  ddm replaced without a GPU to time them, reduced_group_sums (before
#                  ddm.unet._group_sums' adds and _stacked_batch_sums: 199 kernels more), leaf_norms
#                  (before ddm.train.global_norm: 239 kernels more) and folded_norm_grads (before
#                  ddm.unet._scale_bias_grads: 119 kernels and 0.69 GB more), and flat_optimizer (clip
#                  and Adam on one flat vector: 262 kernels fewer, 0.48 GB more). (concat_skip, before
#                  ddm.unet.NinShortcut, has 6 kernels fewer and 0.92 GB more, and rng_per_dropout,
#                  before ddm.unet.Dropout's one seed, 64 kernels more and the same bytes:
#                  `--arms ddm,concat_skip,rng_per_dropout` when there is time.)
#   attention_check benchmarks/attention_check.py: cuDNN's fused attention against ddm's XLA attention
#                  on this GPU, outputs and gradients for DDPM's and IDDPM's attention shapes and the
#                  whole U-Nets, within bfloat16's precision (never run on a GPU before; under SMOKE,
#                  XLA stands in for cuDNN)
#   attention      benchmarks/variant_ab.py --arms ddm,cudnn_attention: cuDNN's fused attention
#                  (model.attention='cudnn'; 1.01 GB and 41 kernels less per train step by gpu_hlo.py)
#                  against XLA's products and softmax, in the call of 4 train steps and the DDIM-50
#                  sampler call (under SMOKE, ddm alone: a CPU has no cuDNN)
#   profile        benchmarks/profile_steps.py: the bf16 batch-128 train step's top device ops and
#                  the device's summed op time per step (the wall time inside the trace includes the
#                  tracer's own work: 530 ms a call against 21 ms of kernels on an H100); its trace,
#                  ops.json and the optimised HLO (hlo.txt) go to OUT_DIR/profile, for
#                  `gpu_hlo.py --hlo hlo.txt --times ops.json`: each kernel's measured time against its
#                  bytes, which calibrates gpu_hlo.py's census (the cost of a GB and of a kernel)
#   calibrate      benchmarks/gpu_hlo.py --hlo hlo.txt --times ops.json on that profile (no compile)
#   gpu_check      benchmarks/gpu_check.py --peer: batch-128 train steps/s (each call waited for
#                  and back to back) and MFU, fp32 / bf16, 50-step DDIM throughput, peak memory,
#                  diffusers' UNet2DModel on the same GPU
#   iddpm          the same check for IDDPM's U-Net (--config cifar10_cosine), bf16 only
#   ablations      benchmarks/variant_ab.py's without_* arms: what attention, GroupNorm, swish,
#                  dropout and the EMA update each cost in the bf16 batch-128 train step (K=1)
#   largest_batch  benchmarks/scaling.py: the largest bf16 train batch whose compiled peak fits
#                  the device's allocator limit (compiles only, at most 5)
#   xla            benchmarks/variant_ab.py --xla_options: XLA:GPU compile options on the same step
#
# STAGES picks stages by name (default: all, in the order above, which is what they are worth: the
# headline figures of gpu_check were measured on an H100 already, 2026-11-28).
# SMOKE=1 runs the same stages on a tiny U-Net (ch 32, batch 4; gpu_check --smoke): a CPU check of
# the script itself.
# On an H100 (jax 0.11.2, 2026-11-28) gpu_check took 255 s (its peer ran out of memory in the same
# process then, and now runs in one of its own, 31 s more), profile 54 s, and variant_ab's arms 27 to
# 35 s per compile of the K=1 train call. Each stage's start threshold below is that time, or an
# estimate from it where the stage has not run on a GPU yet: candidates (five compiles of the K=4 call,
# 59 s in gpu_check's), attention_check (small compiles), attention (two of them, two sampler
# compiles), iddpm (one dtype of gpu_check's two, a larger U-Net), the ablations (six compiles) and
# largest_batch (five). All of them need more than one device call's 10 minutes: give
# BUDGET_S as what the lease leaves, and STAGES for a second call.
# (The CPU-motivated arms, dense_4d, threefry_dropout, optax_clip and nearest_upsample, were run on
# that H100 and are in benchmarks/PERFORMANCE.md: `variant_ab.py --arms ddm,dense_4d,... --dtype bfloat16 --k 1`.)
# OUT_DIR gets summary.txt (each stage's exit status and the time it ended) and one log per stage.
# Compiles are shared between stages through JAX's persistent cache (the K=1 train call of the
# ablations, profile and xla stages is the same program).
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S]}
budget=${2:-500}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ddm_jax_cache}
start=$SECONDS
batch=128 small=() smoke=() memory=(--memory_gib 0) attention_arms=ddm,cudnn_attention
if [[ ${SMOKE:-0} == 1 ]]; then
  batch=4 small=(--ch 32) smoke=(--smoke) memory=(--memory_gib 0.25) attention_arms=ddm
fi

stage() {  # stage NAME SECONDS_NEEDED COMMAND...
  local name=$1 need=$2 left
  shift 2
  if [[ -n ${STAGES:-} && ,$STAGES, != *",$name,"* ]]; then
    echo "not chosen: $name (STAGES=$STAGES)" | tee -a "$out/summary.txt"
    return
  fi
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

stage candidates 300 "$py" "$here/variant_ab.py" --dtype bfloat16 --steps train --batches $batch --k 4 --calls 10 \
  --arms ddm,reduced_group_sums,leaf_norms,folded_norm_grads,flat_optimizer "${small[@]}"
stage attention_check 60 "$py" "$here/attention_check.py" "${smoke[@]}"
stage attention 180 "$py" "$here/variant_ab.py" --dtype bfloat16 --steps train,sample_scan --batches $batch --k 4 \
  --calls 10 --arms $attention_arms "${small[@]}"
stage profile 60 "$py" "$here/profile_steps.py" --steps train --batch $batch --dtype bfloat16 --calls 3 --top 25 \
  --trace_dir "$out/profile" "${small[@]}"
stage calibrate 20 "$py" "$here/gpu_hlo.py" --hlo "$out/profile/train/ddm/hlo.txt" --times "$out/profile/train/ddm/ops.json" \
  --top 10
stage gpu_check 290 "$py" "$here/gpu_check.py" --peer --train_calls 6 --out "$out/gpu_check.json" "${smoke[@]}"
stage iddpm 200 "$py" "$here/gpu_check.py" --config cifar10_cosine --dtypes bfloat16 --peer --train_calls 6 \
  --out "$out/gpu_check_iddpm.json" "${smoke[@]}"
stage ablations 200 "$py" "$here/variant_ab.py" --dtype bfloat16 --steps train --batches $batch --k 1 --calls 10 \
  --arms ddm,without_attention,without_group_norm,without_swish,without_dropout,without_ema "${small[@]}"
stage largest_batch 160 "$py" "$here/scaling.py" --configs cifar10_linear --dtypes bfloat16 --devices 1 --steps train \
  --no_time --max_compiles 5 "${memory[@]}" "${small[@]}"
stage xla 150 "$py" "$here/variant_ab.py" --dtype bfloat16 --steps train --batches $batch --k 1 --calls 10 --arms ddm "${small[@]}" \
  --xla_options 'no_command_buffer={"xla_gpu_enable_command_buffer": ""}' \
  --xla_options 'no_triton_gemm={"xla_gpu_enable_triton_gemm": false}' \
  --xla_options 'cudnn_gemm_fusion={"xla_gpu_cudnn_gemm_fusion_level": 2}'
echo "total $((SECONDS - start)) s" | tee -a "$out/summary.txt"
