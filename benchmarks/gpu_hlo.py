"""ddm's train call (or sampling step) as XLA:GPU compiles it for an H100, on a machine without a GPU:
the optimised program's kernels, what each reads and writes, and the step time no schedule of those
kernels can beat.

    python benchmarks/gpu_hlo.py [--config cifar10_linear] [--dtype bfloat16] [--batch 128] [--k 4]
                                 [--arms ddm,optax_clip] [--donate 1] [--hlo_out DIR] [--top 15]
                                 [--xla_options 'NAME={"xla_gpu_...": true}']
    python benchmarks/gpu_hlo.py --step sample --batch 2000 [--arms ...]   # one DDIM-50 sampling step
    python benchmarks/gpu_hlo.py --largest_batch [--dtype bfloat16]   # the largest batch that fits
    python benchmarks/gpu_hlo.py --hlo FILE [FILE ...]     # a census of HLO already written
    python benchmarks/gpu_hlo.py --hlo hlo.txt --times ops.json   # with profile_steps.py's kernel times

The compile needs JAX's CUDA plugin and CUDA's libraries, not a GPU or its driver:
``pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"`` (into
a virtual environment of its own if this one must stay CPU-only), then run with
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (the plugin's version check calls the missing driver). The
device is a compile-only one (``jax.experimental.topologies``) described by ``H100_SXM``'s published
figures. Without a GPU XLA cannot autotune, so each convolution and matmul gets its default
algorithm; the fusions, layouts and copies, which this script counts, do not depend on that.

The census (``census``) reads the optimised HLO's entry computation: each instruction that is not a
parameter, tuple, bitcast or constant is a kernel. Its bytes are its output plus its operands, an
operand of a fusion counted at the part of it that the fusion computes with (``_parameter_reads``:
XLA fuses an update of a whole flattened vector with the slices its consumers take); a while loop's
body (the K steps of a call) counts once per iteration. Kernels are grouped by kind (cuDNN convolution
forward / input gradient / kernel gradient, gemm, reduction or loop fusion, transpose, copy) and by
where in the program they come from (the op_name XLA keeps: the U-Net's forward
``jvp(UNet)`` or backward ``transpose(jvp(UNet))`` by layer, or the rest of the step: loss, clipping,
Adam, EMA). ``lower_bound_s`` is every kernel's bytes at the memory bandwidth, the convolutions'
and gemms' at the hand count's FLOPs at the bf16 (or fp32) peak where that takes longer: the kernels
run one after another on one stream, so the step takes at least that long whatever each kernel's
efficiency, and MFU is at most the hand count over it. Launches are not in it: the census gives the
number of kernels, and how many of them move under 1 MB, whose time is mostly their launch.
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# NVIDIA H100 SXM5 80GB's published figures (NVIDIA's H100 datasheet and the Hopper tuning guide),
# in the fields of XLA's GpuTargetConfigProto that its GPU compiler reads.
H100_SXM = {
    "name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0), "core_count": 132, "fpus_per_core": 128,
    "clock_rate_ghz": 1.98, "memory_bandwidth": 3.35e12, "l2_cache_size": 50 * 2 ** 20,
    "device_memory_size": 84942979072, "shared_memory_per_core": 228 * 1024,  # memory: as the H100 reports it
    "shared_memory_per_block_optin": 227 * 1024, "cudnn_version": (9, 8, 0),
    "peak_flops": {"bfloat16": 989e12, "float32": 494.5e12},  # dense tensor cores; float32 as TF32
}

# JAX's allocator on a GPU takes this share of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION's default).
JAX_MEMORY_FRACTION = 0.75

# Kernels that do the matmul FLOPs, the hand count's (common.hand_flops): their time is bounded by
# FLOPs; every other kernel's by bytes. (XLA:CPU's HLO, which the census also reads, has them as
# plain convolution and dot instructions.)
MATMUL_KINDS = ("conv forward", "conv input gradient", "conv kernel gradient", "gemm", "fused attention",
                "convolution", "dot")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_NO_KERNEL = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "partition-id", "replica-id",
              "after-all", "opt-barrier"}
_SLICING = {"slice", "dynamic-slice"}
_CUSTOM_CALLS = {"__cudnn$convForward": "conv forward", "__cudnn$convBiasActivationForward": "conv forward",
                 "__cudnn$convBackwardInput": "conv input gradient",
                 "__cudnn$convBackwardFilter": "conv kernel gradient", "__cublas$gemm": "gemm",
                 "__cublas$lt$matmul": "gemm", "__cudnn$fmhaSoftmax": "fused attention",
                 "__cudnn$fmhaSoftmaxBackward": "fused attention"}
_INSTRUCTION = re.compile(r"(ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")


def target_config(spec: dict = H100_SXM) -> str:
    """XLA's GpuTargetConfigProto, as text, for a GPU of ``spec`` (``H100_SXM``'s keys)."""
    major, minor = spec["compute_capability"]
    dnn = spec["cudnn_version"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {spec['shared_memory_per_core']} threads_per_core_limit: 2048
  core_count: {spec['core_count']} fpus_per_core: {spec['fpus_per_core']}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(spec['memory_bandwidth'])} l2_cache_size: {spec['l2_cache_size']}
  clock_rate_ghz: {spec['clock_rate_ghz']} device_memory_size: {spec['device_memory_size']}
  shared_memory_per_block_optin: {spec['shared_memory_per_block_optin']}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}
device_description_str: "{spec['name']}"
"""


def compile_only_devices(spec: dict = H100_SXM):
    """One compile-only CUDA device of ``spec``: JAX lowers and XLA compiles for it, nothing runs."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", topology_name=spec["name"],
                                                target_config=target_config(spec), topology="1x1x1")
    except NotImplementedError as e:
        raise SystemExit("gpu_hlo: JAX has no CUDA plugin here (" + str(e) + "). Install it with "
                         "pip install \"jax-cuda12-plugin[with-cuda]==<jax's version>\" and run with "
                         "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1; no GPU is needed.") from e
    return topology.devices


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (an array or a tuple of them)."""
    return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape_text))


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operand_text: str  # what is between the opcode's parentheses
    attributes: str  # what follows them
    root: bool = False

    @property
    def operands(self):
        return re.findall(r"%([\w.\-]+)", self.operand_text)


def _instruction(line: str):
    m = _INSTRUCTION.match(line.strip())
    if not m:
        return None
    root, name, shape, opcode, rest = m.groups()
    depth, end = 1, 0
    while depth and end < len(rest):  # the operand list ends at its matching parenthesis
        depth += {"(": 1, ")": -1}.get(rest[end], 0)
        end += 1
    return Instruction(name, shape, opcode, rest[:end - 1], rest[end:], bool(root))


def parse_module(text: str):
    """(entry instructions, {computation name: its instructions}) of an HLO module's text."""
    computations, current, entry = {}, None, None
    for line in text.splitlines():
        header = re.match(r"(ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(2), [])
            if header.group(1):
                entry = header.group(2)
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            instruction = _instruction(line)
            if instruction:
                current.append(instruction)
    if entry is None:
        raise ValueError("gpu_hlo: no ENTRY computation in this HLO text")
    return computations[entry], computations


def _elements(shape_text: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(shape_text))


def _parameter_reads(computation) -> dict:
    """{parameter number: the fraction of it that a fused ``computation`` reads}.

    The root's output is all computed; each instruction needs of its operands what its users need
    of it (a fraction, summed over the users, at most 1), a slice only its own elements: XLA fuses
    an elementwise update of a whole flattened vector with the slices its consumers take, and
    computes the sliced elements alone."""
    needed = {i.name: 1.0 for i in computation if i.root}
    for i in reversed(computation):
        fraction = min(needed.get(i.name, 0.0), 1.0)
        for position, operand in enumerate(i.operands):
            share = fraction
            if i.opcode in _SLICING and position == 0:
                share = fraction * _elements(i.shape) / max(1, _elements(_shape_of(computation, operand)))
            needed[operand] = needed.get(operand, 0.0) + share
    return {int(i.operand_text): min(needed.get(i.name, 0.0), 1.0) for i in computation if i.opcode == "parameter"}


def _shape_of(computation, name: str) -> str:
    return next(i.shape for i in computation if i.name == name)


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str
    part: str
    bytes: int
    shape: str


def kernel_kind(instruction: Instruction) -> str:
    """What a kernel is: a convolution (cuDNN's, or a fusion around one: forward, input gradient,
    kernel gradient), a gemm (cuBLAS, or a Triton gemm fusion), a reduction ("reduce fusion": XLA's
    input fusions), a transpose, an elementwise "loop fusion", or its opcode (copy, ...)."""
    i = instruction
    if i.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', i.attributes).group(1)
        return _CUSTOM_CALLS.get(target, target)
    if i.opcode != "fusion":
        return i.opcode
    conv = re.search(r"calls=%conv_(fprop|dgrad|wgrad)", i.attributes)  # XLA's experimental conv fusions
    if conv:
        return {"fprop": "conv forward", "dgrad": "conv input gradient", "wgrad": "conv kernel gradient"}[conv.group(1)]
    if re.search(r'"kind":"__triton_(nested_)?gemm', i.attributes) or "gemm_fusion" in i.name:
        return "gemm"
    if "transpose" in i.name:
        return "transpose fusion"
    if '"kind":"__triton"' in i.attributes:
        return "triton fusion"
    kind = re.search(r"kind=(k\w+)", i.attributes).group(1)
    return {"kLoop": "loop fusion", "kInput": "reduce fusion"}.get(kind, f"{kind} fusion")


def program_part(instruction: Instruction) -> str:
    """Where a kernel comes from, by the op_name XLA keeps: "forward <layer>" or "backward <layer>"
    of the U-Net (the innermost module: norm1, conv2, q, Dropout, ...), or "rest <op>" for the rest
    of the step (loss, clipping, Adam, EMA); "rest" alone where XLA kept no name."""
    m = re.search(r'op_name="([^"]*)"', instruction.attributes)
    name = m.group(1) if m else ""
    if "jvp(UNet)" not in name:
        return f"rest {name.rsplit('/', 1)[-1]}".rstrip() if name else "rest"
    where = "backward" if "transpose(jvp(UNet))" in name else "forward"
    scopes = name.split("UNet)", 1)[1].strip("/)").split("/")
    layer = next((s for s in reversed(scopes[:-1]) if not re.match(r"(down|up|mid)_\d", s)), scopes[-1])
    layer = re.sub(r"^jit\((\w+)\)$", r"\1", layer)  # nn.swish is jax.nn.silu, a jitted function
    return where + " " + re.sub(r"_\d+$", "", layer)


def census(text: str) -> list:
    """The kernels of an optimised HLO module's entry computation (see the module docstring), a
    while loop's body counted once per iteration (its known trip count: the K steps of a call)."""
    entry, computations = parse_module(text)
    return _kernels(entry, computations)


def _kernels(computation, computations) -> list:
    sizes = {i.name: array_bytes(i.shape) for i in computation}
    kernels = []
    for i in computation:
        if i.opcode == "while":
            body = re.search(r"body=%([\w.\-]+)", i.attributes).group(1)
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', i.attributes)
            if not trips:
                raise ValueError(f"gpu_hlo: while loop {i.name} has no known trip count")
            kernels += _kernels(computations[body], computations) * int(trips.group(1))
            continue
        if i.opcode in _NO_KERNEL:
            continue
        called = re.search(r"calls=%([\w.\-]+)", i.attributes)
        fractions = _parameter_reads(computations[called.group(1)]) if called and i.opcode == "fusion" else {}
        reads = sum(fractions.get(n, 1.0) * sizes.get(operand, 0) for n, operand in enumerate(i.operands))
        kernels.append(Kernel(i.name, kernel_kind(i), program_part(i), round(reads) + sizes[i.name], i.shape))
    return kernels


def totals(kernels, key) -> dict:
    """{key(kernel): (kernels, bytes)}, largest bytes first."""
    table = collections.defaultdict(lambda: [0, 0])
    for k in kernels:
        table[key(k)][0] += 1
        table[key(k)][1] += k.bytes
    return dict(sorted(((name, tuple(v)) for name, v in table.items()), key=lambda kv: -kv[1][1]))


def lower_bound_s(kernels, matmul_flops: float, peak_flops: float, bandwidth: float) -> float:
    """Seconds a step takes at least: the other kernels' bytes at the memory bandwidth, plus the
    matmul kernels' FLOPs at the peak or their bytes at the bandwidth, whichever takes longer (the
    kernels run one after another on one stream, and each takes at least its FLOPs' time and its
    bytes' time)."""
    matmul = sum(k.bytes for k in kernels if k.kind in MATMUL_KINDS)
    other = sum(k.bytes for k in kernels if k.kind not in MATMUL_KINDS)
    return other / bandwidth + max(matmul_flops / peak_flops, matmul / bandwidth)


def report(kernels, bandwidth: float, top: int = 15, lines=print):
    """Print the census: totals, by kind, by program part (the ``top`` largest) and the ``top`` largest
    kernels (``top`` 0: neither)."""
    total = sum(k.bytes for k in kernels)
    small = [k for k in kernels if k.bytes < 2 ** 20]
    lines(f"{len(kernels)} kernels, {total / 1e9:.2f} GB read and written "
          f"({total / bandwidth * 1e3:.2f} ms at {bandwidth / 1e12:.2f} TB/s); {len(small)} kernels move "
          f"under 1 MB ({sum(k.bytes for k in small) / 1e6:.0f} MB in all)")
    for title, key, shown in (("kind", lambda k: k.kind, None), ("part of the step", lambda k: k.part, top)):
        rows = list(totals(kernels, key).items())[:shown]
        if rows:
            lines(f"  by {title}:{'kernels':>{40 - len(title)}} {'GB':>8} {'ms at BW':>9}")
        for name, (n, b) in rows:
            lines(f"    {name:<36} {n:7d} {b / 1e9:8.3f} {b / bandwidth * 1e3:9.3f}")
    if top:
        lines("  largest kernels:")
        for k in sorted(kernels, key=lambda k: -k.bytes)[:top]:
            lines(f"    {k.bytes / 1e6:8.1f} MB  {k.kind:<20} {k.part:<28} {k.shape[:60]}")


def measured_times(kernels, ops: dict, calls: int) -> dict:
    """{kernel name: measured seconds per call} from profile_steps.py's ops.json ``ops`` ({op name:
    [microseconds over ``calls`` calls, ...]}); a GPU trace names a fusion's kernel with "_" for the
    HLO name's "." (input_reduce_fusion_24 for input_reduce_fusion.24)."""
    times = {}
    for k in kernels:
        for name in (k.name, k.name.replace(".", "_")):
            if name in ops:
                times[k.name] = ops[name][0] / 1e6 / calls
                break
    return times


def fit_kernel_time(kernels, times: dict):
    """(seconds per byte, seconds per kernel, R^2): the least-squares line t = a * bytes + b through
    the measured times of the kernels that are not matmuls (a kernel named twice in the census, a
    while body's, counts once per iteration, its time split evenly)."""
    points = collections.Counter(k.name for k in kernels if k.name in times and k.kind not in MATMUL_KINDS)
    xs = [k.bytes for k in kernels if k.name in points]
    ys = [times[k.name] / points[k.name] for k in kernels if k.name in points]
    if len(set(xs)) < 2:
        raise ValueError(f"gpu_hlo: {len(xs)} measured kernels of {len(set(xs))} sizes; a line needs two sizes")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - a * mx
    residual = sum((y - a * x - b) ** 2 for x, y in zip(xs, ys))
    total = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - residual / total if total else 1.0


def report_times(kernels, times: dict, lines=print):
    """Print the measured time by kind next to the census, and the fitted per-byte and per-kernel
    costs of the kernels that are not matmuls."""
    lines(f"  measured: {len(times)} of {len(set(k.name for k in kernels))} kernels found in the trace, "
          f"{sum(times.values()) * 1e3:.2f} ms per call")
    counts = collections.Counter(k.name for k in kernels)
    by_kind = collections.defaultdict(lambda: [0, 0, 0.0])
    for k in kernels:
        if k.name in times:
            row = by_kind[k.kind]
            row[0] += 1
            row[1] += k.bytes
            row[2] += times[k.name] / counts[k.name]
    lines(f"  {'kind':<24} {'kernels':>8} {'GB':>8} {'ms':>8} {'GB/s':>8} {'us/kernel':>10}")
    for kind, (n, moved, t) in sorted(by_kind.items(), key=lambda kv: -kv[1][2]):
        lines(f"  {kind:<24} {n:8d} {moved / 1e9:8.3f} {t * 1e3:8.3f} {moved / t / 1e9 if t else 0:8.0f} "
              f"{t / n * 1e6:10.2f}")
    a, b, r2 = fit_kernel_time(kernels, times)
    lines(f"  kernels other than matmuls: t = bytes / ({1 / a / 1e12 if a > 0 else float('inf'):.2f} TB/s) "
          f"+ {b * 1e6:.2f} us per kernel (R^2 {r2:.2f})")


@contextlib.contextmanager
def _compute_capability(device):
    """While active, JAX's cuDNN attention takes its compute-capability checks (the head size it
    allows: 256 from Hopper on, 128 before) from ``device``; it asks the default backend, which is
    the CPU when compiling for a compile-only device. (A private JAX function: without it, or
    where its name has changed, nothing is patched.)"""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:
        fused = None
    if fused is None or not hasattr(fused, "check_compute_capability") or not hasattr(device, "compute_capability"):
        yield
        return
    have = tuple(int(x) for x in device.compute_capability.split("."))
    saved = fused.check_compute_capability
    fused.check_compute_capability = lambda capability: have >= tuple(int(x) for x in capability.split("."))
    try:
        yield
    finally:
        fused.check_compute_capability = saved


def step_hlo(args, arm: str, devices, compiler_options=None):
    """(optimised HLO text, the compiled call) of ddm's train call (``common.TrainCall``) or, with
    ``args.step == "sample"``, one DDIM-50 sampling step (``common.SampleCall``) with ``arm`` (a
    common.VARIANTS name; ddm as it is with ``compiler_options``), for ``devices``."""
    import common

    with common.VARIANTS[arm if compiler_options is None else "ddm"](), _compute_capability(devices[0]):
        if args.step == "sample":
            call = common.SampleCall(args.config, args.dtype, args.batch, method="ddim", steps=50, devices=devices[:1])
        else:
            call = common.TrainCall(args.config, args.dtype, args.batch, args.k, devices=devices,
                                    donate=None if args.donate is None else bool(args.donate))
        compiled = call.compile(compiler_options)
    print(f"{arm}: compiled for {devices[0].device_kind} in {call.compile_s:.0f} s")
    return compiled.as_text(), call


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hlo", nargs="+", help="census of these optimised HLO files (no compile)")
    parser.add_argument("--times", help="with one --hlo: profile_steps.py's ops.json of the same program, "
                                        "whose measured kernel times are set against the census")
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--step", default="train", choices=("train", "sample"),
                        help="the train call, or one DDIM-50 sampling step (give --batch, e.g. 2000)")
    parser.add_argument("--k", type=int, default=4, help="train steps per call (experiment.train's default)")
    parser.add_argument("--arms", default="ddm", help="common.VARIANTS, comma-separated")
    parser.add_argument("--donate", type=int, choices=(0, 1), help="donate the state (default: as on a GPU, 1)")
    parser.add_argument("--xla_options", action="append", default=[], metavar="NAME=JSON",
                        help="an arm NAME: ddm compiled with these XLA compile options (as variant_ab.py's)")
    parser.add_argument("--hlo_out", help="write each arm's optimised HLO here")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--largest_batch", action="store_true",
                        help="instead: the largest train batch whose compiled peak fits JAX's default share of the "
                             "GPU's memory (scaling.py's bisection, compiles only)")
    parser.add_argument("--max_compiles", type=int, default=7, help="with --largest_batch")
    args = parser.parse_args()
    spec = H100_SXM
    if args.hlo:
        for path in args.hlo:
            print(f"== {path}")
            kernels = census(open(path).read())
            report(kernels, spec["memory_bandwidth"], args.top)
            if args.times:
                with open(args.times) as f:
                    profile = json.load(f)
                report_times(kernels, measured_times(kernels, profile["ops"], profile["calls"]))
        return

    import common

    from variant_ab import parse_xla_options

    arms = args.arms.split(",")
    if any(arm not in common.VARIANTS for arm in arms):
        parser.error(f"--arms: {args.arms!r} may name only {', '.join(common.VARIANTS)}")
    try:
        options = parse_xla_options(args.xla_options, arms)
    except ValueError as e:
        parser.error(f"--xla_options: {e}")
    devices = compile_only_devices(spec)
    if args.largest_batch:
        import scaling

        budget = JAX_MEMORY_FRACTION * spec["device_memory_size"]
        fits, fails, probes = scaling.largest_batch(args.config, args.dtype, budget, {}, args.max_compiles,
                                                    device=devices[0])
        print(f"largest {args.config} {args.dtype} train batch (one step per call) whose compiled peak fits "
              f"{budget / 2 ** 30:.1f} GiB ({JAX_MEMORY_FRACTION:.0%} of the {spec['name']}'s "
              f"{spec['device_memory_size'] / 2 ** 30:.1f} GiB, JAX's default preallocation): {fits}"
              + (f" ({fails} does not)" if fails else ""))
        return
    rows = []
    per_call = 1 if args.step == "sample" else args.k
    what = "one DDIM-50 sampling step" if args.step == "sample" else f"a call of {args.k} train step(s)"
    for arm in arms + list(options):
        text, call = step_hlo(args, arm, devices, options.get(arm))
        if args.hlo_out:
            os.makedirs(args.hlo_out, exist_ok=True)
            with open(os.path.join(args.hlo_out, f"{args.step}_{arm}.hlo"), "w") as f:
                f.write(text)
        kernels = census(text)
        flops = common.hand_flops(call.model, call.image_shape, args.batch)[
            "forward" if args.step == "sample" else "train"] * per_call
        peak = spec["peak_flops"][args.dtype]
        bound = lower_bound_s(kernels, flops, peak, spec["memory_bandwidth"])
        print(f"== {arm}: {args.config} {args.dtype}, batch {args.batch}, {what}")
        report(kernels, spec["memory_bandwidth"], args.top)
        print(f"  lower bound per step: {bound / per_call * 1e3:.2f} ms ({flops / per_call / 1e9:.0f} GFLOP at "
              f"{peak / 1e12:.0f} TFLOP/s, the rest at {spec['memory_bandwidth'] / 1e12:.2f} TB/s): "
              f"{per_call / bound:.1f} steps/s at most, MFU at most {flops / bound / peak:.1%}")
        rows.append((arm, len(kernels) / per_call, sum(k.bytes < 2 ** 20 for k in kernels) / per_call,
                     sum(k.bytes for k in kernels) / per_call, bound / per_call, flops / bound / peak))
    print(f"\nper step ({args.config} {args.dtype}, batch {args.batch}, {what}), each arm against {rows[0][0]}:")
    print(f"  {'arm':<20} {'kernels':>8} {'< 1 MB':>7} {'GB':>7} {'bound ms':>9} {'MFU <=':>7} | "
          f"{'kernels':>8} {'GB':>7} {'bound ms':>9}")
    for arm, n, small, moved, bound, mfu in rows:
        base = rows[0]
        print(f"  {arm:<20} {n:8.0f} {small:7.0f} {moved / 1e9:7.2f} {bound * 1e3:9.2f} {mfu:7.1%} | "
              f"{n - base[1]:+8.0f} {(moved - base[3]) / 1e9:+7.2f} {(bound - base[4]) * 1e3:+9.2f}")

if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
