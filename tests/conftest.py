"""Test setup, before JAX is imported anywhere: two fake CPU devices (for pmap tests), and one
persistent compilation cache for the whole run.

Most of the suite's time is XLA compiling the same tiny train steps and samplers again: each
``experiment.train`` call and each CLI subprocess (the fault tests kill and resume runs) builds new
jitted functions. A cache keyed on the compiled program lets every later build load the first one's
executable (the corrupt-checkpoint test: 119 s without, 69 s with). It is set in the environment,
so the pytest-xdist workers and the CLI subprocesses share it; it lives in a temporary directory
made here and removed at the end of the run, unless JAX_COMPILATION_CACHE_DIR was already set, in
which case that one is used and kept.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the xdist workers inherit the controller's
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddm-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # only the process that made it: the controller, after its workers
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
