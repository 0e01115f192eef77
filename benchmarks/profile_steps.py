"""Where the time goes in the train step and the sampling step: a jax.profiler trace, summarised
per XLA op / fusion, each annotated with what it computes (from the optimised HLO).

    python benchmarks/profile_steps.py [--config cifar10_linear] [--batch 8] [--calls 2]
                                       [--steps train,sample] [--top 15] [--dtype float32]
                                       [--trace_dir /tmp/ddm_profile] [--ch N]
                                       [--variants ddm,nearest_upsample,scan] [--k K]

Each step is compiled (as in benchmarks/flops.py: the pmapped train step with K=1, and one
sampling step of the config's sampler), warmed up, then called --calls times inside
``jax.profiler.trace(trace_dir, create_perfetto_trace=True)``. The perfetto trace's complete
events are summed per name; the XLA op events (fusions, convolutions, custom calls...) are ranked
by their share of the summed op time. On CPU, ops of one call may run concurrently on the thread
pool, so shares are of summed op time, not of wall time. Each op's line says which HLO ops are in
it (convolution, dot, reduce, ...) and the shape of its result. The trace directory can be opened
in Perfetto (ui.perfetto.dev) or TensorBoard's profile plugin; ops.json next to it has every op's
time and description, and hlo.txt the optimised HLO (``gpu_hlo.py --hlo hlo.txt --times ops.json``
puts each kernel's measured time next to its bytes). --variants names ddm as it is ('ddm') and any
of common.VARIANTS (e.g. 'nearest_upsample', 'wgrad_taps'; see variant_ab.py), for a before/after
in one run. --k K profiles
the train call of K steps (experiment.train's steps_per_call; unrolled on CPU); --variants scan
profiles it with the K steps in a lax.scan, the form CPU runs had before make_multi_step unrolled
them (K >= 2):

    python benchmarks/profile_steps.py --config digits --batch 64 --steps train --k 2 --variants scan,ddm
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402

# Host-side / runtime events that are not XLA ops.
NOT_OPS = re.compile(r"^(\$|Thunk|PjitFunction|CommonPjRt|ParseArguments|PjRt|ExecuteHelper|TfrtCpu|"
                     r"XlaModule|Execute|pmap|jit_|py|Transfer|BufferFromPyval|.*::)")
INTERESTING = ("convolution", "dot", "reduce", "reduce-window", "transpose", "concatenate", "pad", "exponential",
               "divide", "rsqrt", "select", "broadcast", "copy", "dynamic-slice", "dynamic-update-slice", "gather",
               "scatter", "rng-bit-generator", "sort", "custom-call", "while", "all-reduce")


def hlo_summaries(hlo_text: str) -> dict:
    """{instruction name: 'ops inside; result shape'} for the top-level instructions of the
    optimised HLO (fusions are described by the ops in their fused computation)."""
    computations, current, body = {}, None, []
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if header:
            current, body = header.group(1), []
            continue
        if current is not None:
            if line.strip() == "}":
                computations[current] = body
                current = None
            else:
                body.append(line)
    summaries = {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?)\s+([\w\-]+)\(", line)
            if not m:
                continue
            name, shape, opcode = m.groups()
            ops = [opcode]
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if called and called.group(1) in computations:
                inner = collections.Counter()
                for inner_line in computations[called.group(1)]:
                    im = re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\S+\s+([\w\-]+)\(", inner_line)
                    if im and im.group(1) in INTERESTING:
                        inner[im.group(1)] += 1
                ops = [f"{k}x{v}" if v > 1 else k for k, v in inner.most_common(5)] or [opcode]
            summaries[name] = f"{' '.join(ops)}; -> {shape.split('{')[0]}"
    return summaries


def trace_ops(trace_dir: str):
    """({event name: total microseconds}, where the events came from) of the newest perfetto trace
    under trace_dir. On CPU: every complete event that is an XLA op. On a GPU or TPU only the
    device's own timeline counts (the host's launch calls would add the same work twice): its "XLA
    Ops" line where the trace has one (named like the HLO instructions), else all of its streams."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    metadata = [e for e in events if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")]
    devices = {e["pid"] for e in metadata
               if e["name"] == "process_name" and re.search(r"/device:(GPU|TPU)", e["args"]["name"])}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in metadata
               if e["name"] == "thread_name" and e["pid"] in devices}
    xla_ops = {key for key, name in threads.items() if name == "XLA Ops"}
    if xla_ops:
        counted, source = lambda e: (e.get("pid"), e.get("tid")) in xla_ops, "the device's 'XLA Ops' line"
    elif devices:
        counted = lambda e: e.get("pid") in devices
        source = "the device's lines: " + ", ".join(sorted(threads.values()))
    else:
        counted, source = lambda e: True, "every complete event that is an XLA op"
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not NOT_OPS.match(e.get("name", "")) and counted(e):
            totals[e["name"]] += float(e.get("dur", 0.0))
    return totals, source


def profile(call, label, trace_dir, calls, top):
    """Trace ``calls`` calls of ``call`` (compiled, with its inputs: ``materialize`` run) and print
    where the time goes."""
    compiled = call.compiled
    call()  # warm-up
    summaries = hlo_summaries(compiled.as_text())
    summaries.update({name.replace(".", "_"): what for name, what in summaries.items()})  # GPU kernel names
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            call()
    wall = (time.perf_counter() - start) / calls
    totals, source = trace_ops(trace_dir)
    op_total = sum(totals.values())
    print(f"\n{label}: {wall * 1e3:.1f} ms per call (wall, inside the trace, the tracer's own work included); "
          f"XLA op time summed over threads {op_total / 1e3 / calls:.1f} ms per call; {len(totals)} distinct ops; "
          f"counted: {source}")
    if jax.default_backend() == "cpu":
        # XLA:CPU's own (Eigen) convolutions run without trace events of their own; YNNPACK's do.
        print(f"not traced as ops (wall - summed op time; on CPU mostly XLA's own convolutions): "
              f"{max(wall - op_total / 1e6 / calls, 0.0) * 1e3:.1f} ms per call")
    print(f"{'share':>6} | {'ms/call':>8} | {'op':<34} | what")
    for name, us in totals.most_common(top):
        what = summaries.get(name, summaries.get(name.split(":")[0], ""))
        print(f"{100 * us / op_total:>5.1f}% | {us / 1e3 / calls:>8.1f} | {name:<34} | {what}")
    kinds = collections.Counter()
    for name, us in totals.items():
        kinds[op_kind(name, summaries.get(name, ""))] += us
    print("by kind (share, ms per call): " + ", ".join(f"{k} {100 * v / op_total:.1f}% {v / 1e3 / calls:.1f} ms"
                                                      for k, v in kinds.most_common()))
    with open(os.path.join(trace_dir, "ops.json"), "w") as f:
        json.dump({"calls": calls, "wall_s_per_call": wall,
                   "ops": {n: [us, summaries.get(n, "")] for n, us in totals.items()}}, f)
    with open(os.path.join(trace_dir, "hlo.txt"), "w") as f:  # for gpu_hlo.py --hlo hlo.txt --times ops.json
        f.write(compiled.as_text())
    return totals, summaries


def op_kind(name: str, what: str) -> str:
    """A coarse class of an op from its name (cuDNN's and cuBLAS's GPU kernels) or its HLO summary."""
    if re.search(r"wgrad", name):
        return "convolution (kernel gradient)"
    if re.search(r"fprop|dgrad", name):
        return "convolution (forward / input gradient)"
    if re.search(r"nvjet|gemm|cublas", name):
        return "dot"
    if "convolution" in what:
        # kernel gradients come out as (C_in, kh, kw, C_out) (or HWIO inside a while loop), kh = kw = 3
        # or 1 here; activations are (B, H, W, C) with H, W >= 4
        if re.search(r"-> \w+\[(\d+,[13],[13],\d+|[13],[13],\d+,\d+)\]", what):
            return "convolution (kernel gradient)"
        return "convolution (forward / input gradient)"
    if "dot" in what:
        return "dot"
    if "reduce" in what:
        return "reduce (norms, softmax sums)"
    return "elementwise / other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--steps", default="train,sample")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--trace_dir", default="/tmp/ddm_profile")
    parser.add_argument("--ch", type=int, default=0, help="override model.ch (quick tries)")
    parser.add_argument("--variants", default="ddm",
                        help=f"comma-separated, from {', '.join(common.VARIANTS)} and 'scan' (the K train steps "
                             "in a lax.scan even on CPU)")
    parser.add_argument("--k", type=int, default=1, help="train steps per call")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if "scan" in variants and args.k < 2:
        parser.error("--variants scan needs --k 2 or more (a K=1 call has no scan)")
    if set(variants) - set(common.VARIANTS) - {"scan"}:
        parser.error(f"--variants: {args.variants!r} may name only {', '.join(common.VARIANTS)} and scan")
    overrides = {"ch": args.ch} if args.ch else {}
    print(common.machine_line())
    for step in args.steps.split(","):
        for variant in variants:
            with common.VARIANTS.get(variant, common.VARIANTS["ddm"])():
                if step == "train":
                    call = common.TrainCall(args.config, args.dtype, args.batch, args.k,
                                            devices=jax.local_devices()[:1],
                                            unroll=False if variant == "scan" else None, **overrides)
                else:
                    call = common.SampleCall(args.config, args.dtype, args.batch, **overrides)
                call.compile()
                call.materialize()  # inside the block: an ablation can change the parameters' tree
            k = f", K={args.k} steps per call" if step == "train" and args.k > 1 else ""
            profile(call, f"{args.config} {step} step, batch {args.batch}, {args.dtype}{k}, {variant}",
                    os.path.join(args.trace_dir, step, variant), args.calls, args.top)


if __name__ == "__main__":
    main()
