"""The XLA:CPU settings ddm makes before JAX starts its CPU backend (``import ddm`` runs ``apply``, so
import ddm before the first JAX computation of the process; later they have no effect).

1. YNNPACK for reductions only. XLA:CPU in jaxlib 0.10 hands convolutions and dots to YNNPACK by
default. On the DDPM U-Net's layers (batch 8, 2 cores) YNNPACK's convolutions are up to 1.8x slower
forward and 2.3x slower for the kernel gradient than XLA's own, and its dots 1.15x to 1.35x slower
than XLA's on the shapes of the U-Net's projections and shortcuts ((2048, 256) x (256, 256): 1.38
against 1.19 ms; (8192, 128) x (128, 384): 4.45 against 3.32 ms; a 256^3 dot is 0.28 against 0.30 ms),
while YNNPACK's reductions are fast (a reduction over (B, H, W) 6x faster than XLA's). ``reduce``
keeps YNNPACK for reductions only: against XLA's defaults the DDPM CIFAR-10 train step runs 1.58x and
the sampling step 1.23x faster (``benchmarks/cpu_ynn_ab.py``); against ``individual_dot,reduce``
(YNNPACK's dots too) the sampling step runs 1.03x faster and the train step 1.01x. Accelerator
backends ignore the flag. The flag is experimental and XLA aborts the process on a flag it does not
know, so it is added only on the jaxlib versions it was measured on, and never over a value the user
set in ``XLA_FLAGS``.

2. Host memory that stays mapped, where JAX can only run on XLA:CPU (``cpu_only``). Each call of a
compiled computation allocates its temporary buffer (860 MB for the DDPM CIFAR-10 train call of 4
steps at batch 8) and its outputs, and frees them at its end. glibc's malloc serves blocks above
32 MB with a fresh ``mmap`` and unmaps them on free, so the kernel faults in and zeroes every page
again on every call: 54,000 page faults and about 100 ms of system time per train step, 11% of
it. Two settings keep the memory for the next call:
  - ``jax_cpu_enable_async_dispatch=False``: a computation on one CPU device runs on the calling
    thread, so it allocates in glibc's main arena. XLA's dispatch thread allocates in an arena of
    its own, which serves every block over 64 MB with ``mmap`` whatever mallopt says;
  - ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, -1)``: the main arena neither maps
    large blocks apart nor gives freed memory back to the system.
With both, the train step runs with no page faults and 1.1x faster (``benchmarks/cpu_host_ab.py``).
The cost is that the process keeps its high-water mark of host memory mapped. Computations over
several CPU devices (a pmap over fake devices) still run on XLA's threads. A value the user set in
``JAX_CPU_ENABLE_ASYNC_DISPATCH`` wins.

``DDM_XLA_CPU_DEFAULTS=0`` turns both off.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "reduce"
MEASURED_JAXLIB = ("0.10.",)  # version prefixes the flag and its values were measured on
ASYNC_DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (glibc's malloc.h)
ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin")


def compiler_options() -> dict:
    """ddm's flag as the per-compile option it stands for (``Lowered.compile(compiler_options=...)``)."""
    return {YNN_FLAG.lstrip("-"): ",".join(f"LIBRARY_FUSION_TYPE_{t.upper()}" for t in YNN_FUSION_TYPES.split(","))}


def cpu_flags_wanted(xla_flags: str, jaxlib_version: str, enabled: str = "1") -> str:
    """``xla_flags`` with ddm's XLA:CPU flag appended, where it applies (see the module docstring)."""
    if enabled == "0" or YNN_FLAG in xla_flags or not jaxlib_version.startswith(MEASURED_JAXLIB):
        return xla_flags
    return f"{xla_flags} {YNN_FLAG}={YNN_FUSION_TYPES}".strip()


def cpu_only(environ=os.environ) -> bool:
    """Whether JAX in this process can only run on XLA:CPU: ``JAX_PLATFORMS`` is ``cpu``, or it is
    unset and no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",") == ["cpu"]
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(importlib.util.find_spec(name) for name in ACCELERATOR_MODULES)


def keep_host_memory() -> bool:
    """glibc's malloc without separate mappings for large blocks and without trimming, so what a
    computation frees stays mapped for the next (see the module docstring). Returns whether it was
    set: only on Linux with glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # -1 is SIZE_MAX as glibc's size_t threshold: never trim.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def apply() -> None:
    """Make ddm's settings for this process (before JAX's CPU backend starts)."""
    enabled = os.environ.get("DDM_XLA_CPU_DEFAULTS", "1")
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = cpu_flags_wanted(os.environ.get("XLA_FLAGS", ""), version, enabled)
    if enabled == "0" or not cpu_only():
        return
    if ASYNC_DISPATCH_ENV not in os.environ:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
    keep_host_memory()
