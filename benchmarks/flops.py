"""FLOPs per train step and per sampling step of the CIFAR-10 U-Nets, from XLA's cost analysis,
checked against a hand count, and the MFU achieved.

    python benchmarks/flops.py [--configs cifar10_linear,cifar10_cosine] [--batch B]
                               [--dtype float32|bfloat16] [--rounds 3] [--no_time] [--lowered]
                               [--ch N]   # smaller U-Net, for a quick try

For each config: ddm's train step (experiment.train's pmapped step, K=1 per call: forward,
backward, clipping, Adam, EMA) and one sampling step (the config's sampler: one U-Net forward +
the DDPM/DDIM update) are compiled at --batch (default: 8 on CPU, the config's 128 elsewhere) and
XLA's cost analysis (``compiled.cost_analysis()['flops']``; ``--lowered`` uses the unoptimised
``lowered.cost_analysis()``, which needs no compile) gives FLOPs per call. The hand count
(benchmarks/common.py ``hand_flops``) walks the U-Net's structure from the config and counts
2 * MACs of the convolutions (taps in the padding excluded, as XLA does), dense layers and the two
attention matmuls; train = 3 x forward - conv_in's forward. XLA's count also includes elementwise
work (norms, activations, softmax, Adam), so it is expected a few % above the hand count.

MFU = achieved FLOP/s (XLA FLOPs per call / median call time) / device peak. The peak is the
vendor's dense number from common.PEAK_TFLOPS for known accelerators (bf16, or fp32 / TF32 for
float32), and on CPU a measured peak: the best float32 (bfloat16) 1024/2048 square matmul in jax on
this machine. Which one is used is printed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402


def analyse(call, lowered_only: bool):
    if lowered_only:
        cost = call.lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0)) * (len(call.devices) if hasattr(call, "devices") else 1)
    flops = common.cost_flops(call.compile())
    return flops * (len(call.devices) if hasattr(call, "devices") else 1)


def main():
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="cifar10_linear,cifar10_cosine")
    parser.add_argument("--batch", type=int, default=8 if on_cpu else 128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls of each step (median)")
    parser.add_argument("--no_time", action="store_true", help="FLOP counts only, no timing / MFU")
    parser.add_argument("--lowered", action="store_true", help="cost analysis of the unoptimised HLO (no compile)")
    parser.add_argument("--ch", type=int, default=0, help="override model.ch (quick tries)")
    args = parser.parse_args()
    overrides = {"ch": args.ch} if args.ch else {}
    timing = not args.no_time and not args.lowered

    print(common.machine_line())
    rows = []
    for name in args.configs.split(","):
        train_call = common.TrainCall(name, args.dtype, args.batch, 1, devices=jax.local_devices()[:1], **overrides)
        sample_call = common.SampleCall(name, args.dtype, args.batch, **overrides)
        model, image_shape = train_call.model, train_call.image_shape
        hand = common.hand_flops(model, image_shape, args.batch)
        num_params = common.count_params(jax.eval_shape(lambda: common.random_params(model, image_shape)))
        config_batch = train_call.config.train.batch_size
        print(f"\n{name}: {num_params:,} parameters, {image_shape}, train batch in the config {config_batch}; "
              f"{sample_call.method} {sample_call.steps} steps; hand MACs per image: "
              + ", ".join(f"{k} {v / args.batch / 1e9:.3f} G" for k, v in hand["macs"].items()))
        for kind, call, hand_value in (("train step", train_call, hand["train"]),
                                       ("sampling step", sample_call, hand["forward"])):
            xla = analyse(call, args.lowered)
            row = {"config": name, "kind": kind, "batch": args.batch, "xla": xla, "hand": hand_value,
                   "per_image": xla / args.batch, "at_config_batch": xla / args.batch * config_batch}
            if timing:
                call.materialize()
                call()  # warm-up
                seconds = common.median(common.interleaved([call], args.rounds)[0])
                row["seconds"] = seconds
                row["achieved"] = xla / seconds
            rows.append(row)
            print(f"  {kind}: XLA {xla / 1e9:.2f} GFLOP at batch {args.batch}, hand {hand_value / 1e9:.2f}, "
                  f"XLA / hand {xla / hand_value:.3f}" + (f"; {row['seconds']:.2f} s per call" if timing else ""),
                  flush=True)

    peak, source = common.device_peak(args.dtype) if timing else (None, "")
    print(f"\n{'config':<15} | {'step':<13} | {'batch':>5} | {'XLA GFLOP':>10} | {'hand GFLOP':>10} | "
          f"{'XLA/hand':>8} | {'GFLOP/image':>11} | {'GFLOP @128':>10}"
          + (f" | {'s/call':>7} | {'GFLOP/s':>8} | {'MFU':>6}" if timing else ""))
    for r in rows:
        line = (f"{r['config']:<15} | {r['kind']:<13} | {r['batch']:>5} | {r['xla'] / 1e9:>10.2f} | "
                f"{r['hand'] / 1e9:>10.2f} | {r['xla'] / r['hand']:>8.3f} | {r['per_image'] / 1e9:>11.2f} | "
                f"{r['at_config_batch'] / 1e9:>10.1f}")
        if timing:
            mfu = f"{100 * r['achieved'] / peak:.1f}%" if peak else "n/a"
            line += f" | {r['seconds']:>7.2f} | {r['achieved'] / 1e9:>8.1f} | {mfu:>6}"
        print(line)
    print("GFLOP @128: XLA's count scaled linearly to a batch of 128 (the configs' train batch).")
    if timing:
        print(f"MFU peak ({args.dtype}): {source}" if peak else f"MFU: {source}")


if __name__ == "__main__":
    main()
