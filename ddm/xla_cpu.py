"""The XLA:CPU setting ddm makes before JAX starts its CPU backend (``import ddm`` runs it, so import
ddm before the first JAX computation of the process; later it has no effect).

XLA:CPU in jaxlib 0.10 hands convolutions and dots to YNNPACK by default. On the DDPM U-Net's layers
(batch 8, 2 cores) YNNPACK's convolutions are up to 1.8x slower forward and 2.3x slower for the
kernel gradient than XLA's own, and its dots 1.15x to 1.35x slower than XLA's on the shapes of the
U-Net's projections and shortcuts ((2048, 256) x (256, 256): 1.38 against 1.19 ms; (8192, 128) x
(128, 384): 4.45 against 3.32 ms; a 256^3 dot is 0.28 against 0.30 ms),
while YNNPACK's reductions are fast (a reduction over (B, H, W) 6x faster than XLA's). ``reduce``
keeps YNNPACK for reductions only: against XLA's defaults the DDPM CIFAR-10 train step runs 1.58x and
the sampling step 1.23x faster (``benchmarks/cpu_ynn_ab.py``); against ``individual_dot,reduce``
(YNNPACK's dots too) the sampling step runs 1.03x faster and the train step 1.01x. Accelerator
backends ignore the flag.

The flag is experimental and XLA aborts the process on a flag it does not know, so it is added only
on the jaxlib versions it was measured on, never over a value the user set in ``XLA_FLAGS``, and
not when ``DDM_XLA_CPU_DEFAULTS=0``.
"""
import importlib.metadata
import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "reduce"
MEASURED_JAXLIB = ("0.10.",)  # version prefixes the flag and its values were measured on


def compiler_options() -> dict:
    """ddm's flag as the per-compile option it stands for (``Lowered.compile(compiler_options=...)``)."""
    return {YNN_FLAG.lstrip("-"): ",".join(f"LIBRARY_FUSION_TYPE_{t.upper()}" for t in YNN_FUSION_TYPES.split(","))}


def cpu_flags_wanted(xla_flags: str, jaxlib_version: str, enabled: str = "1") -> str:
    """``xla_flags`` with ddm's XLA:CPU flag appended, where it applies (see the module docstring)."""
    if enabled == "0" or YNN_FLAG in xla_flags or not jaxlib_version.startswith(MEASURED_JAXLIB):
        return xla_flags
    return f"{xla_flags} {YNN_FLAG}={YNN_FUSION_TYPES}".strip()


def apply() -> None:
    """Set ``XLA_FLAGS`` for this process (before JAX's CPU backend starts)."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = cpu_flags_wanted(os.environ.get("XLA_FLAGS", ""), version,
                                               os.environ.get("DDM_XLA_CPU_DEFAULTS", "1"))
