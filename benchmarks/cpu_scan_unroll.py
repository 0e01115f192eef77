"""CPU: the K-step train call with the K steps in a lax.scan (while loop) or unrolled, with XLA's own
kernel-gradient convolutions (ddm.unet as it is) or per-tap matmuls (common.kernel_grad_by_taps):
per-step time and compile time.

    python benchmarks/cpu_scan_unroll.py [--config digits] [--batch 64] [--k 5] [--rounds 5]

experiment.train unrolls the K steps on CPU because XLA:CPU's weight-gradient convolutions are
~10x slower inside a while loop (ddm/train.py, make_multi_step). This measures whether that still
holds once the kernel gradients are matmuls: if the scan is as fast, CPU runs could keep the loop
and compile K times less code. Variants are timed in interleaved rounds (median per step).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import contextlib  # noqa: E402

import jax  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="scan+taps,unroll+taps,scan+xla_conv,unroll+xla_conv")
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    runners, names = [], []
    for variant in args.variants.split(","):
        loop, conv = variant.split("+")
        with common.kernel_grad_by_taps() if conv == "taps" else contextlib.nullcontext():
            call = common.TrainCall(args.config, "float32", args.batch, args.k, devices=jax.local_devices()[:1],
                                    unroll=loop == "unroll")
        call.ready()
        print(f"{variant}: compile {call.compile_s:.1f} s", flush=True)
        runners.append(call)
        names.append(variant)
    times = common.interleaved(runners, args.rounds)
    print(f"\n{args.config}, batch {args.batch}, K={args.k} steps per call, {args.rounds} interleaved rounds")
    print(f"{'variant':<20} | {'ms/step (median)':>16} | {'compile s':>9}")
    for name, t, call in zip(names, times, runners):
        print(f"{name:<20} | {1e3 * common.median(t) / args.k:>16.1f} | {call.compile_s:>9.1f}")


if __name__ == "__main__":
    main()
