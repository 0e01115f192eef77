"""CPU before / after of how the train call hands its state back, with the PyTorch peer, in one run:
the state donated and the gradients averaged by an all-reduce even on one device (before) against
ddm's CPU choice, no donation and no all-reduce over one device (``train.make_multi_step``,
``train.mean_over_devices``).

    python benchmarks/cpu_update_ab.py [--config cifar10_linear] [--batch 8] [--k 2] [--rounds 4]
                                       [--skip_torch]

Arms (each compiled once, then timed in interleaved rounds, median per step):
  before    donate=True, lax.pmean over the one device
  after     ddm as it is
  diffusers the same train step in PyTorch (common.TorchTrainCall)
Each arm's optimised HLO is also searched for what the change removes: copies of the call's
arguments (XLA copies a donated leaf that more than one fusion reads) and all-reduces.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402

from ddm import train  # noqa: E402


def ddm_call(config, batch, k, before):
    saved = train.mean_over_devices
    if before:
        train.mean_over_devices = lambda tree: jax.lax.pmean(tree, train.AXIS)  # read when the step is traced
    try:
        call = common.TrainCall(config, "float32", batch, k, donate=True if before else None)
    finally:
        train.mean_over_devices = saved
    return call.ready()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=2, help="train steps per call (experiment.train's steps_per_call)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()
    print(common.machine_line())
    names, runners = ["before", "after"], [ddm_call(args.config, args.batch, args.k, before) for before in (True, False)]
    for name, call in zip(names, runners):
        text = call.compiled.as_text()
        print(f"{name}: {text.count('copy(%flat_args')} copies of arguments, {text.count(' all-reduce(')} all-reduces, "
              f"peak {common.peak_bytes(call.compiled)['peak'] / 2 ** 30:.3f} GiB, compiled in {call.compile_s:.0f} s")
    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count())
        names.append(f"diffusers (torch {torch.__version__})")
        runners.append(common.TorchTrainCall(args.config, "float32", args.batch, args.k))
    times = common.interleaved(runners, args.rounds)
    meds = [common.median(t) / args.k for t in times]
    print(f"\n{args.config} train step, batch {args.batch}, float32, K={args.k}, {args.rounds} interleaved rounds")
    print(f"{'arm':<28} | {'s/step':>7} | per round")
    for name, med, t in zip(names, meds, times):
        print(f"{name:<28} | {med:>7.3f} | " + " ".join(f"{x / args.k:.2f}" for x in t))
    print(f"speed-up after / before: {meds[0] / meds[1]:.3f}")
    if len(meds) > 2:
        print(f"ddm / diffusers speed ratio: before {meds[2] / meds[0]:.2f}, after {meds[2] / meds[1]:.2f}")


if __name__ == "__main__":
    main()
