"""A/B of a candidate CPU kernel-gradient formulation in the train step, with the PyTorch peer in the
same interleaved rounds: ddm as it is (XLA's own weight-gradient convolutions), ddm with
common.kernel_grad_by_taps (one matmul per 3x3 tap on CPU), and diffusers' UNet2DModel.

    python benchmarks/wgrad_ab.py [--config cifar10_linear] [--batch 8] [--rounds 5] [--skip_torch]

All three do the same train step (see benchmarks/train_throughput.py), one step per call (ddm:
experiment.train's pmapped step with K=1). The taps variant is traced inside
``common.kernel_grad_by_taps()``.
Prints the median seconds per step and the ratios.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import contextlib  # noqa: E402

import jax  # noqa: E402


def ddm_call(config, batch, taps):
    with common.kernel_grad_by_taps() if taps else contextlib.nullcontext():
        call = common.TrainCall(config, "float32", batch, 1, devices=jax.local_devices()[:1])
    return call.ready()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()
    print(common.machine_line(), flush=True)
    names = ["ddm (XLA wgrad conv, as in ddm/unet.py)", "ddm with wgrad by taps"]
    runners = [ddm_call(args.config, args.batch, False), ddm_call(args.config, args.batch, True)]
    print(f"compile: XLA wgrad {runners[0].compile_s:.0f} s, taps {runners[1].compile_s:.0f} s", flush=True)
    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count())
        names.append(f"diffusers (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        runners.append(common.TorchTrainCall(args.config, "float32", args.batch, 1))
    times = common.interleaved(runners, args.rounds)
    meds = [common.median(t) for t in times]
    print(f"\n{args.config}, batch {args.batch}, float32, {args.rounds} interleaved rounds, one step per call")
    print(f"{'variant':<45} | {'s/step median':>13} | {'min':>6} | {'steps/s':>7}")
    for name, med, t in zip(names, meds, times):
        print(f"{name:<45} | {med:>13.2f} | {min(t):>6.2f} | {1 / med:>7.3f}")
    print(f"taps / XLA speed-up: {meds[0] / meds[1]:.2f} (per round: "
          + " ".join(f"{a / b:.2f}" for a, b in zip(times[0], times[1])) + ")")
    if len(meds) > 2:
        for i, label in ((0, "(XLA wgrad)"), (1, "(taps)")):
            print(f"ddm {label} / diffusers speed ratio: {meds[2] / meds[i]:.2f} (per round: "
                  + " ".join(f"{c / a:.2f}" for a, c in zip(times[i], times[2])) + ")")


if __name__ == "__main__":
    main()
