"""CPU before / after of ddm's host-memory settings (ddm/xla_cpu.py, part 2: computations on the
calling thread, glibc's malloc without large mappings or trimming), with the PyTorch peer under each.

    python benchmarks/cpu_host_ab.py [--config cifar10_linear] [--batch 8] [--k 4]
                                     [--steps train,sample] [--rounds 2] [--calls 4] [--skip_torch]

The settings are made once per process, before JAX's CPU backend starts, so each arm runs in a
process of its own, one after another, for --rounds rounds:
  before          ddm's XLA:CPU flag alone (ddm before this change): async dispatch, glibc's defaults
  after           ddm as it is (``import ddm``)
  diffusers       the peer (common.TorchTrainCall / sampling_step.TorchRunner) under glibc's defaults
  diffusers+host  the peer in a process with ddm's settings made, as in variant_ab.py's shared process
Each process compiles (ddm), warms up with two calls (the second is the first to find the last
call's outputs still alive: with ddm's settings it faults in the heap's high-water mark, and none
after it), then times --calls calls one by one, and
reports per step: the median time, and from getrusage the minor page faults and the system CPU
time. The train call is K=--k unrolled steps (experiment.train on CPU); the sampling step is one
jitted DDIM-50 step. Ratios are of the medians over all calls of all rounds, with the median of
the per-round ratios after them.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from statistics import median

ARMS = ("before", "after", "diffusers", "diffusers+host")


def child(args):
    """One arm's process: make its settings, build its call, time it, print one JSON line."""
    if args.child in ("before", "diffusers"):
        os.environ["DDM_XLA_CPU_DEFAULTS"] = "0"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common  # imports ddm, which makes the settings unless DDM_XLA_CPU_DEFAULTS=0
    from ddm import xla_cpu

    if args.child == "before":  # the flag alone was ddm's setting before (no JAX backend has started yet)
        import jaxlib

        os.environ["XLA_FLAGS"] = xla_cpu.cpu_flags_wanted(os.environ.get("XLA_FLAGS", ""), jaxlib.__version__)
    per_call = args.k if args.step == "train" else 1
    if args.child.startswith("diffusers"):
        import torch

        torch.set_num_threads(os.cpu_count())
        if args.step == "train":
            call = common.TorchTrainCall(args.config, "float32", args.batch, args.k)
        else:
            from sampling_step import TorchRunner

            from ddm import experiment

            config, model, diffusion, image_shape = common.build(args.config)
            config.sample.method, config.sample.steps = "ddim", 50
            call = TorchRunner(model, experiment.build_sampling_diffusion(config, diffusion), image_shape,
                               args.batch, "float32")
    else:
        call = (common.TrainCall(args.config, "float32", args.batch, args.k) if args.step == "train"
                else common.SampleCall(args.config, "float32", args.batch, method="ddim", steps=50)).ready()
    call()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) / per_call)
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = args.calls * per_call
    import jax

    print(json.dumps({"times": times, "faults": (after.ru_minflt - before.ru_minflt) / steps,
                      "sys_ms": 1e3 * (after.ru_stime - before.ru_stime) / steps,
                      "async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch"),
                      "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(),
                      "machine": common.machine_line()}))


def run_child(args, arm, step):
    command = [sys.executable, os.path.abspath(__file__), "--child", arm, "--step", step, "--config", args.config,
               "--batch", str(args.batch), "--k", str(args.k), "--calls", str(args.calls)]
    env = {key: value for key, value in os.environ.items() if key != "DDM_XLA_CPU_DEFAULTS"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{arm} {step}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio_text(results, slow, fast):
    """``slow``'s median time over ``fast``'s, then the median of the per-round ratios."""
    overall = median(sum(results[slow], [])) / median(sum(results[fast], []))
    rounds = median([median(s) / median(f) for s, f in zip(results[slow], results[fast])])
    return f"{overall:.3f}x ({rounds:.3f}x)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", default="train,sample")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--child", choices=ARMS)
    parser.add_argument("--step", choices=("train", "sample"))
    args = parser.parse_args()
    if args.child:
        return child(args)
    arms = ARMS[:2] if args.skip_torch else ARMS
    for step in args.steps.split(","):
        results = {arm: [] for arm in arms}
        extra = {arm: [] for arm in arms}
        for round_index in range(args.rounds):
            for arm in arms:
                out = run_child(args, arm, step)
                if round_index == 0 and arm == arms[0]:
                    print(out["machine"])
                results[arm].append(out["times"])
                extra[arm].append(out)
        per_call = f"K={args.k} steps per call" if step == "train" else "one DDIM-50 step per call"
        print(f"\n{args.config} {step} step, batch {args.batch}, float32, {per_call}, "
              f"{args.rounds} rounds of {args.calls} calls per arm")
        print(f"{'arm':<15} | {'s/step':>7} | {'faults/step':>11} | {'sys ms/step':>11} | async | per-round medians")
        for arm in arms:
            outs = extra[arm]
            print(f"{arm:<15} | {median(sum(results[arm], [])):>7.3f} | {median([o['faults'] for o in outs]):>11.0f} | "
                  f"{median([o['sys_ms'] for o in outs]):>11.1f} | {str(outs[0]['async_dispatch']):>5} | "
                  + " ".join(f"{median(t):.3f}" for t in results[arm]))
        print(f"speed-up after / before: {ratio_text(results, 'before', 'after')}")
        if not args.skip_torch:
            print(f"peer under ddm's settings / under glibc's defaults: {ratio_text(results, 'diffusers', 'diffusers+host')}")
            print(f"ddm / diffusers, each with its own defaults: before {ratio_text(results, 'diffusers', 'before')}, "
                  f"after {ratio_text(results, 'diffusers', 'after')}; both under ddm's settings "
                  f"{ratio_text(results, 'diffusers+host', 'after')}")


if __name__ == "__main__":
    main()
