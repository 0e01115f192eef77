"""ddm's GroupNorm against flax's nn.GroupNorm in the train step, on whatever device JAX has, in one
run; with MFU from the hand count and the compiled call's peak memory, per batch size.

    python benchmarks/group_norm_ab.py [--config cifar10_linear] [--dtype bfloat16] [--batches 128]
                                       [--k 4] [--calls 8] [--arms ddm,flax] [--hlo_out DIR]

Arms, each compiled once and timed in interleaved rounds (median per call of K steps):
  ddm    ddm.unet.GroupNorm: moments over (H, W) first, closed-form gradient (ddm as it is)
  flax   flax's nn.GroupNorm: moments over each (H, W, C / G) block, autodiff gradient
ddm's norm was chosen on a 2-core CPU (benchmarks/cpu_ynn_ab.py); this script says whether an
accelerator agrees. --hlo_out writes each arm's optimised HLO, to read a profile's fusions against.
"""
import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--dtype", choices=tuple(common.DTYPES), default="bfloat16")
    parser.add_argument("--batches", default="128")
    parser.add_argument("--k", type=int, default=4, help="train steps per call")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--ch", type=int, default=0, help="override model.ch (quick tries)")
    parser.add_argument("--arms", default="ddm,flax", help="ddm alone: MFU and memory against batch size")
    parser.add_argument("--hlo_out", default="")
    args = parser.parse_args()
    overrides = {"ch": args.ch} if args.ch else {}
    print(common.machine_line(), flush=True)
    arms = args.arms.split(",")
    for batch in map(int, args.batches.split(",")):
        runners = []
        for arm in arms:
            with common.flax_group_norm() if arm == "flax" else contextlib.nullcontext():
                call = common.TrainCall(args.config, args.dtype, batch, args.k, **overrides)
            runners.append(call.ready())
            if args.hlo_out:
                os.makedirs(args.hlo_out, exist_ok=True)
                with open(os.path.join(args.hlo_out, f"train_{arm}_{args.dtype}_b{batch}.hlo.txt"), "w") as f:
                    f.write(call.compiled.as_text())
            print(f"  compiled {arm} at batch {batch} in {call.compile_s:.0f} s", flush=True)
        times = common.interleaved(runners, args.calls)
        flops = common.hand_flops(runners[0].model, runners[0].image_shape, batch)["train"]
        rates = [args.k / common.median(t) for t in times]
        for arm, call, rate in zip(arms, runners, rates):
            peak = common.peak_bytes(call.compiled).get("peak")
            print(f"{args.config} {args.dtype} batch {batch:>4} | {arm:<4} | {rate:7.2f} steps/s | "
                  f"{flops * rate / 1e12:6.1f} TFLOP/s | MFU {common.mfu_text(flops * rate, args.dtype)} | "
                  f"peak {peak / 2 ** 30 if peak else float('nan'):.2f} GiB", flush=True)
        if arms == ["ddm", "flax"]:
            print(f"batch {batch}: ddm / flax = {rates[0] / rates[1]:.3f}x", flush=True)


if __name__ == "__main__":
    main()
