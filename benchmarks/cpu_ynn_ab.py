"""CPU before / after of ddm's two CPU speed-ups, with the PyTorch peer, in one run: XLA's default
YNNPACK fusions against ddm's flag (ddm/xla_cpu.py: YNNPACK for reductions only), and flax's GroupNorm
against ddm.unet.GroupNorm (moments over (H, W) first, closed-form gradient).

    python benchmarks/cpu_ynn_ab.py [--config cifar10_linear] [--batch 8] [--steps train,sample]
                                    [--rounds 3] [--skip_torch] [--profile]

Arms (each compiled once, then timed in interleaved rounds, median per step):
  before    XLA's default fusions, flax nn.GroupNorm   (ddm before these changes)
  flag      ddm's XLA:CPU flag, flax nn.GroupNorm
  after     ddm's XLA:CPU flag, ddm GroupNorm          (ddm as it is)
  diffusers the same step in PyTorch (common.TorchTrainCall / sampling_step.TorchRunner)
The process runs with DDM_XLA_CPU_DEFAULTS=0 (XLA's defaults); the flag arms pass ddm's setting as
the compile option it stands for. --profile adds each ddm arm's top XLA ops (profile_steps.py).
The train call is K=2 unrolled steps (experiment.train on CPU); the sampling step is DDIM-50's.
"""
import argparse
import contextlib
import os
import sys

os.environ["DDM_XLA_CPU_DEFAULTS"] = "0"  # before ddm is imported: this process keeps XLA's defaults

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from ddm import xla_cpu  # noqa: E402

DDM_OPTIONS = xla_cpu.compiler_options()  # what ddm's XLA_FLAGS entry sets, per compile
ARMS = (("before", {}, True), ("flag", DDM_OPTIONS, True), ("after", DDM_OPTIONS, False))


def ddm_call(step, config, batch, options, flax_norm):
    with common.flax_group_norm() if flax_norm else contextlib.nullcontext():
        call = (common.TrainCall(config, "float32", batch, 2) if step == "train"
                else common.SampleCall(config, "float32", batch, method="ddim", steps=50))
    return call.ready(options)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", default="train,sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(common.machine_line())
    print(f"ddm's flag: {xla_cpu.YNN_FLAG}={xla_cpu.YNN_FUSION_TYPES} (as compile option {DDM_OPTIONS})")
    for step in args.steps.split(","):
        names = [name for name, _, _ in ARMS]
        runners = [ddm_call(step, args.config, args.batch, options, flax_norm) for _, options, flax_norm in ARMS]
        per_call = 2 if step == "train" else 1  # steps per call
        if not args.skip_torch:
            import torch

            torch.set_num_threads(os.cpu_count())
            names.append(f"diffusers (torch {torch.__version__})")
            if step == "train":
                runners.append(common.TorchTrainCall(args.config, "float32", args.batch, 2))
            else:
                from sampling_step import TorchRunner

                runners.append(TorchRunner(runners[0].model, runners[0].diffusion, runners[0].image_shape,
                                           args.batch, "float32"))
        if args.profile:
            import profile_steps

            for name, call in zip(names[:len(ARMS)], runners):
                profile_steps.profile(call, f"{args.config} {step}, batch {args.batch}: {name}",
                                      f"/tmp/ddm_cpu_ab/{step}/{name}", 1, 10)
        times = common.interleaved(runners, args.rounds)
        meds = [common.median(t) / per_call for t in times]
        print(f"\n{args.config} {step} step, batch {args.batch}, float32, {args.rounds} interleaved rounds")
        print(f"{'arm':<28} | {'s/step':>7} | per round")
        for name, med, t in zip(names, meds, times):
            print(f"{name:<28} | {med:>7.3f} | " + " ".join(f"{x / per_call:.2f}" for x in t))
        print(f"speed-up after / before: {meds[0] / meds[2]:.2f} (flag alone {meds[0] / meds[1]:.2f}, "
              f"GroupNorm on top {meds[1] / meds[2]:.2f})")
        if len(meds) > 3:
            print(f"ddm / diffusers speed ratio: before {meds[3] / meds[0]:.2f}, after {meds[3] / meds[2]:.2f}")


if __name__ == "__main__":
    main()
