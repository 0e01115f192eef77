"""Tables: float32 vs bfloat16, 1 vs 2 devices, peak memory per config, and the largest batch that
fits a memory budget (bisection on memory_analysis, nothing run).

    python benchmarks/scaling.py [--configs cifar10_linear,cifar10_cosine] [--batch 8]
                                 [--dtypes float32,bfloat16] [--devices 1,2] [--rounds 3]
                                 [--memory_gib 16 (0: the device's)] [--no_time] [--no_bisect] [--ch N]
                                 [--steps train,sample] [--bisect_step train|sample]

Speed table: for each config, dtype and device count, the train step (the pmapped K=1 step,
global batch --batch split over the devices) and one sampling step (config's sampler; jit on one
device, pmap with broadcast parameters on several) are compiled,
warmed up and timed (median of --rounds calls); with its peak memory per device from the compiled
executable's memory_analysis(): arguments + outputs + temporaries - donated (aliased) buffers.
A device count other than this process's runs in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU (CPU "devices" then share the same
cores, so 2 devices measure pmap's overhead, not a speed-up); on accelerators a count above the
real devices is skipped.

Bisection table: per config and dtype, the largest global train batch whose per-device
memory_analysis peak fits --memory_gib: peaks at two batches give a linear estimate, then
bisection between a batch that fits and one that does not, compiling only (each probe is a
compile, no run), to a granularity of 8 (or the device count), at most --max_compiles compiles.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402


def measure(config, dtype_name, batch, num_devices, rounds, timing, overrides, steps=("train", "sample")):
    """Rows for the train and/or the sampling step of one (config, dtype, devices)."""
    rows = []
    devices = jax.local_devices()[:num_devices]
    for kind in steps:
        if kind == "train":
            call = common.TrainCall(config, dtype_name, batch, 1, devices=devices, **overrides)
        else:
            call = common.SampleCall(config, dtype_name, batch, devices=devices, **overrides)
        compiled = call.compile()
        row = {"config": config, "dtype": dtype_name, "devices": num_devices, "step": kind, "batch": batch,
               "memory": common.peak_bytes(compiled), "compile_s": call.compile_s}
        if timing:
            call.materialize()
            call()
            row["seconds"] = common.median(common.interleaved([call], rounds)[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def largest_batch(config, dtype_name, memory_bytes, overrides, max_compiles, granularity=8, step="train",
                  device=None):
    """(largest batch of `step` known to fit, smallest known not to (None if none), probes
    [(batch, peak bytes)]) on one device (``device``, default the first local one; the train step
    compiles for a compile-only one too); the two differ by the granularity unless max_compiles
    stopped the bisection first."""
    probes = {}

    def peak(b):
        if b not in probes:
            if step == "train":
                devices = [device or jax.local_devices()[0]]
                call = common.TrainCall(config, dtype_name, b, 1, devices=devices, **overrides)
            else:
                call = common.SampleCall(config, dtype_name, b, **overrides)
            probes[b] = common.peak_bytes(call.compile())["peak"]
            print(f"  probe batch {b}: peak {probes[b] / 2 ** 30:.2f} GiB", flush=True)
        return probes[b]

    b0, b1 = granularity, 4 * granularity
    p0, p1 = peak(b0), peak(b1)
    if p0 > memory_bytes:
        return 0, b0, sorted(probes.items())
    slope = max((p1 - p0) / (b1 - b0), 1.0)
    estimate = int(b0 + (memory_bytes - p0) / slope) // granularity * granularity
    lo, hi = (b1, None) if p1 <= memory_bytes else (b0, b1)
    # bracket around the linear estimate, then bisect on multiples of the granularity
    if hi is None:
        guess = max(estimate, lo + granularity)
        if peak(guess) <= memory_bytes:
            lo = guess
            hi = guess + max(granularity, guess // 16 // granularity * granularity)
            while peak(hi) <= memory_bytes and len(probes) < max_compiles:
                lo, hi = hi, 2 * hi
        else:
            hi = guess
    while hi - lo > granularity and len(probes) < max_compiles:
        mid = (lo + hi) // 2 // granularity * granularity
        if peak(mid) <= memory_bytes:
            lo = mid
        else:
            hi = mid
    return lo, hi, sorted(probes.items())


def child(args, num_devices):
    """Run this script for one device count in a child process; its JSON rows."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}").strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--configs", args.configs, "--batch", str(args.batch),
           "--dtypes", args.dtypes, "--devices", str(num_devices), "--rounds", str(args.rounds), "--no_bisect",
           "--steps", args.steps,
           "--child"] + (["--no_time"] if args.no_time else []) + (["--ch", str(args.ch)] if args.ch else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def device_memory_bytes(device) -> int:
    """What ``device``'s allocator may hand out (``memory_stats()['bytes_limit']``: on a GPU, JAX's
    preallocated fraction of its memory); ValueError where the device reports no limit (CPU)."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(f"{device.device_kind} reports no memory limit (memory_stats: {sorted(stats) or None}); "
                         f"give the budget in GiB instead")
    return int(stats["bytes_limit"])


def gib(n):
    return f"{n / 2 ** 30:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="cifar10_linear,cifar10_cosine")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory_gib", type=float, default=16.0,
                        help="the bisection's budget; 0: what the device's allocator may hand out (its bytes_limit)")
    parser.add_argument("--max_compiles", type=int, default=7)
    parser.add_argument("--no_time", action="store_true")
    parser.add_argument("--no_bisect", action="store_true")
    parser.add_argument("--steps", default="train,sample", help="which steps the speed table has")
    parser.add_argument("--bisect_step", choices=("train", "sample"), default="train")
    parser.add_argument("--ch", type=int, default=0, help="override model.ch (quick tries)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {"ch": args.ch} if args.ch else {}
    timing = not args.no_time
    budget = None
    if not args.no_bisect and not args.child:
        try:
            budget = args.memory_gib * 2 ** 30 or device_memory_bytes(jax.local_devices()[0])
        except ValueError as e:
            parser.error(f"--memory_gib 0: {e}")
    if not args.child:
        print(common.machine_line())

    rows = []
    for n in (int(v) for v in args.devices.split(",")):
        if n == jax.local_device_count() or (args.child and n <= jax.local_device_count()):
            for config in args.configs.split(","):
                for dtype_name in args.dtypes.split(","):
                    rows += measure(config, dtype_name, args.batch, n, args.rounds, timing, overrides,
                                    args.steps.split(","))
        elif jax.default_backend() == "cpu" and not args.child:
            rows += child(args, n)
        elif n < jax.local_device_count():
            for config in args.configs.split(","):
                for dtype_name in args.dtypes.split(","):
                    rows += measure(config, dtype_name, args.batch, n, args.rounds, timing, overrides,
                                    args.steps.split(","))
        else:
            print(f"skipping {n} devices: {jax.local_device_count()} present")
    if args.child:
        return

    print(f"\n{'config':<15} | {'dtype':<8} | {'dev':>3} | {'step':<6} | {'batch':>5} | {'peak GiB/dev':>12} | "
          f"{'args':>7} | {'temp':>7}" + (f" | {'s/call':>7} | {'images/s':>8}" if timing else ""))
    for r in rows:
        m = r["memory"]
        line = (f"{r['config']:<15} | {r['dtype']:<8} | {r['devices']:>3} | {r['step']:<6} | {r['batch']:>5} | "
                f"{gib(m.get('peak', 0)):>12} | {gib(m.get('argument', 0)):>7} | {gib(m.get('temp', 0)):>7}")
        if timing:
            line += f" | {r['seconds']:>7.2f} | {r['batch'] / r['seconds']:>8.2f}"
        print(line)
    if timing:
        print("images/s: train = batch / step time; sample = batch / one-step time (one U-Net forward each).")
        for config in args.configs.split(","):
            for step in args.steps.split(","):
                sel = {(r["dtype"], r["devices"]): r["seconds"] for r in rows if r["config"] == config
                       and r["step"] == step}
                base = sel.get(("float32", 1))
                if base:
                    print(f"{config} {step}: time relative to float32 x1 device: "
                          + ", ".join(f"{d} x{n} {s / base:.2f}" for (d, n), s in sorted(sel.items())))

    if not args.no_bisect:
        print(f"\nlargest {args.bisect_step} batch (one device) whose memory_analysis peak fits "
              f"{budget / 2 ** 30:g} GiB:")
        for config in args.configs.split(","):
            for dtype_name in args.dtypes.split(","):
                best, above, probes = largest_batch(config, dtype_name, budget, overrides, args.max_compiles,
                                                    step=args.bisect_step)
                converged = above is not None and above - best <= 8
                print(f"{config:<15} | {dtype_name:<8} | largest batch {best:>6}"
                      + ("" if converged else f" (not converged: {above} does not fit; --max_compiles reached)")
                      + " | probes (batch: GiB) "
                      + ", ".join(f"{b}: {p / 2 ** 30:.2f}" for b, p in probes), flush=True)


if __name__ == "__main__":
    main()
