"""ddm's implementation choices against the alternatives it replaced, in whole train and sampling
steps, on whatever device JAX has, in one run; with MFU from the hand count and each compiled call's
peak memory, per batch size, and optionally the PyTorch peer.

    python benchmarks/variant_ab.py [--config cifar10_linear] [--dtype bfloat16]
                                    [--steps train,sample,sample_scan] [--batches 128] [--k 4]
                                    [--scan_steps 50] [--calls 8] [--arms ddm,flax_group_norm]
                                    [--peer] [--ch 0] [--num_heads 0] [--hlo_out DIR]

Arms (common.VARIANTS), each compiled once and timed in interleaved rounds (median per call):
  ddm               ddm as it is
  flax_group_norm   flax's nn.GroupNorm (moments over each (H, W, C / G) block, autodiff gradient)
                    in place of ddm.unet.GroupNorm (moments over (H, W) first, closed-form gradient)
  nearest_upsample  the upsampling convs as 3x3 convs over the upsampled image, in place of
                    ddm.unet.upsample_conv's four 2x2 sub-pixel convs over the input
  wgrad_taps        kernel gradients as per-tap matmuls on CPU (measured and not adopted)
  winograd_2d       the stride-1 3x3 convs of at most 16x16 as 2-D Winograd F(2x2, 3x3) on CPU
                    (common.winograd_f2x2_conv3x3; measured and not adopted)
  direct_convs      every conv as XLA's direct convolution, in place of ddm.unet's Winograd F(4, 3)
                    along W (ddm.unet.winograd_conv3x3) for the float32 stride-1 3x3 convs on CPU
                    (its forward and input gradient; the kernel gradient is XLA's in both arms)
  threefry_dropout  flax's nn.Dropout (jax.random.bernoulli's threefry bits per element) in place of
                    ddm.unet.Dropout (masks hashed from the element index under a per-mask seed)
  einsum_heads      attention with the heads as an einsum axis, in place of
                    ddm.unet.multi_head_attention's heads in the batch axis (--num_heads 4 to see heads)
  optax_clip        optax.clip_by_global_norm (a select and a divide per element, materialised) in
                    place of ddm.train.clip_by_global_norm (one scalar multiply, fused into Adam)
  dense_4d          dense layers on (B, H, W, C) as lax.dot_general's 4-D contraction, in place of
                    ddm.unet._matmul_last_axis's one 2-D matmul (whose kernel gradient reads dy in place)
  concat_skip       the up path's NIN shortcuts as one matmul of the input and the skip connection
                    concatenated, in place of ddm.unet.NinShortcut's matmul per part (which spares XLA
                    writing the concatenation out)
  flat_norm         the gradients' global norm (clip and grad_norm metric) as one reduction over all
                    the gradients concatenated, in place of ddm.train.global_norm's (the small leaves
                    concatenated, a reduction per larger leaf): 42 fewer kernels per step of an H100's
                    train call, 0.37 GB more; not adopted
  flat_optimizer    the clip and Adam on the gradients concatenated into one vector (optax.flatten),
                    the metric's norm one reduction too: a GPU candidate (309 fewer kernels per step,
                    0.48 GB more; 1.14x slower on 2 CPU cores), not adopted
  leaf_norms        the global norm as optax.tree.norm's reduction per leaf, in place of
                    ddm.train.global_norm's one reduction for all the small leaves concatenated
  folded_norm_grads GroupNorm's scale and bias gradients as XLA folds them, a second reduction of the
                    whole tensors, on every device; ddm.unet._scale_bias_grads folds them on CPU only
  reduced_group_sums GroupNorm's group sums as reductions on every device, and its scale and bias
                    gradients as two reductions, in place of ddm.unet._group_sums' adds of strided
                    slices on GPUs and _stacked_batch_sums' one reduction (199 kernels more per step
                    of an H100's train call by gpu_hlo.py, the same bytes)
  rng_per_dropout   each dropout layer drawing its seed from flax's 'dropout' rng (a threefry fold_in
                    and draw per layer), in place of ddm.unet.Dropout hashing the U-Net's one seed
                    with its block's name (64 kernels more per step of an H100's train call)
  cudnn_attention   cuDNN's fused attention (model.attention='cudnn') in place of the default XLA
                    products and softmax: NVIDIA GPUs and bfloat16 only (1.01 GB and 41 kernels less
                    per step of an H100's train call by gpu_hlo.py)
Ablations (common.ABLATIONS): ddm with one piece taken out, not the same model; ddm's time minus
the ablation's is what that piece costs in the whole step, printed per step and as a share of ddm's
(on 2 CPU cores a profile's per-op times are no such measure: the trace timed a kernel transpose at
10 ms that takes 0.14 ms alone):
  without_attention   the attention blocks return their input
  without_group_norm  the GroupNorms are their affine part alone (x * scale + bias)
  without_swish       the swish activations are the identity
  without_dropout     no dropout in training
  without_ema         the train step leaves the EMA parameters as they are
--arms ddm alone gives MFU and memory against batch size. --peer adds diffusers' UNet2DModel in
PyTorch (common.TorchTrainCall, sampling_step.TorchRunner) on the same device. Steps:
  train        the train call of K steps (unrolled and not donated on CPU, as experiment.train)
  sample       one DDIM-50 step, jitted on its own (the U-Net forward and the update)
  sample_scan  a whole DDIM sampler call of --scan_steps steps (common.SampleScanCall: one lax.scan,
               as ddm samples; XLA computes what does not change between steps, such as the
               sub-pixel kernels, once per call); the peer runs its step --scan_steps times
Rates are steps per second in every case; each ratio is of the median call times, followed by the
median over rounds of the ratio within a round (less moved by load that comes and goes). MFU counts
the FLOPs ddm's arm computes (common.hand_flops), so an arm that computes more (nearest_upsample)
shows its rate in ddm's FLOPs.
--hlo_out writes each arm's optimised HLO.
--xla_options NAME=JSON (repeatable) adds an arm NAME: ddm as it is, compiled with those XLA compile
options (``Lowered.compile(compiler_options=...)``), e.g.
    --xla_options 'no_cmd_buffer={"xla_gpu_enable_command_buffer": ""}'
An option that XLA rejects (unknown name, bad value) is printed and its arm left out.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def model_overrides(args):
    return {name: value for name, value in (("ch", args.ch), ("num_heads", args.num_heads)) if value}


def ddm_call(step, arm, args, batch, compiler_options=None):
    """ddm's call for ``step`` with ``arm``'s variant, traced, compiled and given its inputs inside the
    variant's block (an ablation can change the parameters' tree), warmed up by one call."""
    overrides = model_overrides(args)
    with common.VARIANTS[arm]():
        if step == "train":
            call = common.TrainCall(args.config, args.dtype, batch, args.k, **overrides)
        elif step == "sample_scan":
            call = common.SampleScanCall(args.config, args.dtype, batch, args.scan_steps, **overrides)
        else:
            call = common.SampleCall(args.config, args.dtype, batch, method="ddim", steps=50, **overrides)
        return call.ready(compiler_options)


def peer_call(step, args, batch, ours):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # as TorchTrainCall chooses
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    if step == "train":
        return common.TorchTrainCall(args.config, args.dtype, batch, args.k, **model_overrides(args))
    from sampling_step import TorchRunner

    runner = TorchRunner(ours.model, ours.diffusion, ours.image_shape, batch, args.dtype, device=device)
    if step == "sample_scan":
        return lambda: [runner() for _ in range(args.scan_steps)]
    return runner


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="bfloat16")
    parser.add_argument("--steps", default="train", help="comma-separated: train, sample, sample_scan")
    parser.add_argument("--batches", default="128")
    parser.add_argument("--k", type=int, default=4, help="train steps per call")
    parser.add_argument("--scan_steps", type=int, default=50, help="DDIM steps per sample_scan call")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--ch", type=int, default=0, help="override model.ch (quick tries)")
    parser.add_argument("--num_heads", type=int, default=0, help="override model.num_heads")
    parser.add_argument("--arms", default="ddm,flax_group_norm", help=f"from {', '.join(common.VARIANTS)}")
    parser.add_argument("--peer", action="store_true", help="add diffusers in PyTorch")
    parser.add_argument("--hlo_out", default="")
    parser.add_argument("--xla_options", action="append", default=[], metavar="NAME=JSON",
                        help="an arm NAME: ddm compiled with these XLA compile options (a JSON object)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [arm for arm in arms if arm not in common.VARIANTS]
    if unknown or not arms or arms[0] != "ddm":
        parser.error(f"--arms: {args.arms!r} must start with ddm and name only {', '.join(common.VARIANTS)}")
    try:
        options = parse_xla_options(args.xla_options, arms)
    except ValueError as e:
        parser.error(f"--xla_options: {e}")
    steps = args.steps.split(",")
    if set(steps) - {"train", "sample", "sample_scan"}:
        parser.error(f"--steps: {args.steps!r} may name only train, sample and sample_scan")
    print(common.machine_line(), flush=True)
    for step in steps:
        per_call = {"train": args.k, "sample_scan": args.scan_steps}.get(step, 1)  # steps per timed call
        for batch in map(int, args.batches.split(",")):
            runners, names = [], []
            for arm, compiler_options in [(arm, None) for arm in arms] + list(options.items()):
                try:
                    call = ddm_call(step, arm if compiler_options is None else "ddm", args, batch, compiler_options)
                except Exception as e:  # noqa: BLE001 - XLA's error for an option it does not take
                    if compiler_options is None:
                        raise
                    print(f"  left out {arm}: XLA did not compile with {compiler_options}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
                    continue
                runners.append(call)
                names.append(arm)
                if args.hlo_out:
                    os.makedirs(args.hlo_out, exist_ok=True)
                    with open(os.path.join(args.hlo_out, f"{step}_{arm}_{args.dtype}_b{batch}.hlo.txt"), "w") as f:
                        f.write(call.compiled.as_text())
                print(f"  compiled {step} {arm} at batch {batch} in {call.compile_s:.0f} s", flush=True)
            ours = len(names)
            if args.peer:
                runners.append(peer_call(step, args, batch, runners[0]))
                names.append("diffusers")
            times = common.interleaved(runners, args.calls)
            rates = [per_call / common.median(t) for t in times]
            flops = common.hand_flops(runners[0].model, runners[0].image_shape, batch)
            flops = flops["train"] if step == "train" else flops["forward"]  # per step
            for i, (name, rate) in enumerate(zip(names, rates)):
                peak = common.peak_bytes(runners[i].compiled).get("peak") if i < ours else None
                print(f"{args.config} {step} {args.dtype} batch {batch:>4} | {name:<16} | {rate:8.3f} steps/s | "
                      f"{flops * rate / 1e12:7.3f} TFLOP/s | MFU {common.mfu_text(flops * rate, args.dtype)} | "
                      f"peak {peak / 2 ** 30 if peak else float('nan'):.2f} GiB", flush=True)
            per_round = lambda j: common.median([b / a for a, b in zip(times[0], times[j])])
            print(f"{step} batch {batch}: " + ", ".join(
                f"ddm / {name} = {rates[0] / rate:.3f}x (median of per-round ratios {per_round(j):.3f}x)"
                for j, (name, rate) in enumerate(zip(names[1:], rates[1:]), start=1)), flush=True)
            for line in ablation_lines(names[:ours], times[:ours], per_call):
                print(line, flush=True)


def ablation_lines(names, times, per_call: int) -> list:
    """For each ablation arm (common.ABLATIONS) after ddm (names[0]): what the piece it removes costs,
    ddm's median time per step minus the arm's, in ms and as a share of ddm's, and the median over
    rounds of that difference within a round. ``times``: seconds per call, per arm and round."""
    ms = lambda seconds: seconds / per_call * 1e3
    ddm_ms = ms(common.median(times[0]))
    lines = []
    for name, arm_times in zip(names[1:], times[1:]):
        if name in common.ABLATIONS:
            cost = ddm_ms - ms(common.median(arm_times))
            per_round = common.median([ms(a - b) for a, b in zip(times[0], arm_times)])
            lines.append(f"  {name}: the piece costs {cost:.1f} ms per step ({cost / ddm_ms:.1%} of ddm's "
                         f"{ddm_ms:.1f} ms; per-round median {per_round:.1f} ms)")
    return lines


def parse_xla_options(specs, arms) -> dict:
    """{arm name: XLA compile options} from 'NAME=JSON' specs (ValueError naming the bad spec)."""
    parsed = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"{spec!r} is not NAME=JSON, e.g. 'no_cmd_buffer={{\"xla_gpu_enable_command_buffer\": \"\"}}'")
        if name in arms or name in parsed:
            raise ValueError(f"{spec!r}: the arm name {name!r} is taken; choose another")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec!r}: the options are not JSON ({e})") from None
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{spec!r}: the options must be a non-empty JSON object of option: value")
        parsed[name] = value
    return parsed


if __name__ == "__main__":
    main()
