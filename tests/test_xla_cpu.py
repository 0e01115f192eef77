"""ddm.xla_cpu: the XLA:CPU settings ddm makes, where they apply, and that they take effect."""
import os
import platform
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from ddm import xla_cpu

FLAG = f"{xla_cpu.YNN_FLAG}={xla_cpu.YNN_FUSION_TYPES}"


def test_compiler_options_name_the_same_fusion_types():
    assert xla_cpu.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def test_flag_is_added_only_where_it_was_measured():
    assert xla_cpu.cpu_flags_wanted("", "0.10.2") == FLAG
    assert xla_cpu.cpu_flags_wanted("--a=1", "0.10.7") == f"--a=1 {FLAG}"
    # never over the user's own value, never on other jaxlib versions, not when switched off
    assert xla_cpu.cpu_flags_wanted(f"{xla_cpu.YNN_FLAG}=", "0.10.2") == f"{xla_cpu.YNN_FLAG}="
    assert xla_cpu.cpu_flags_wanted("--a=1", "0.9.0") == "--a=1"
    assert xla_cpu.cpu_flags_wanted("", "0.11.0") == ""
    assert xla_cpu.cpu_flags_wanted("--a=1", "0.10.2", enabled="0") == "--a=1"


@pytest.mark.skipif(jax.default_backend() != "cpu" or FLAG not in os.environ.get("XLA_FLAGS", ""),
                    reason="ddm's XLA:CPU flag is not set in this process (another jaxlib or backend)")
def test_convolutions_and_dots_leave_ynnpack_and_reductions_stay():
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hlo = jax.jit(conv).lower(jnp.zeros((2, 8, 8, 32)), jnp.zeros((3, 3, 32, 32))).compile().as_text()
    assert "convolution(" in hlo and "__ynn_fusion" not in hlo
    hlo = jax.jit(jnp.dot).lower(jnp.zeros((64, 32)), jnp.zeros((32, 16))).compile().as_text()
    assert "dot(" in hlo and "__ynn_fusion" not in hlo
    hlo = jax.jit(lambda x: jnp.sum(2 * x, axis=(0, 1, 2))).lower(jnp.zeros((2, 8, 8, 32))).compile().as_text()
    assert "__ynn_fusion" in hlo


def test_cpu_only_reads_jax_platforms_then_the_installed_plugins(monkeypatch):
    assert xla_cpu.cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not xla_cpu.cpu_only({"JAX_PLATFORMS": "cuda"})
    assert not xla_cpu.cpu_only({"JAX_PLATFORMS": "cpu,tpu"})
    monkeypatch.setattr(xla_cpu.importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
    assert xla_cpu.cpu_only({})
    monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not xla_cpu.cpu_only({})
    monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(xla_cpu.importlib.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not xla_cpu.cpu_only({})


# A child process: import ddm, then make x = f(x) thirty times, as a train loop makes its state, with
# a jitted f whose output is 128 MB; print the async setting and each call's page faults in pages.
# With glibc's defaults each output is mapped apart, so every call faults in all its pages. With
# ddm's settings the heap grows over the first calls (the old x is alive while the new one is
# written) until it holds both. A small allocation that lands in a freed hole can make a later call
# grow it once more: in 36 runs, two at a time, 0 of the last 20 calls faulted in 22 runs, 1 in 8 and
# 2 in 6 (the test allows 5). With glibc's defaults, or async dispatch, all 20 faulted in each of 4 runs.
COUNTED = 20  # the child's last calls that the test counts, after the heap has grown
FAULTS_CHILD = """
import json, resource
import ddm
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 0.5)
x = jnp.ones((32, 1024, 1024), jnp.float32)
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _faulting_calls(**env):
    """(async setting, how many of the child's last COUNTED calls faulted in at least half the output)."""
    import json
    import subprocess

    environ = {k: v for k, v in os.environ.items() if k not in ("DDM_XLA_CPU_DEFAULTS", xla_cpu.ASYNC_DISPATCH_ENV)}
    environ.update(JAX_PLATFORMS="cpu", **env)
    done = subprocess.run([sys.executable, "-c", FAULTS_CHILD], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    half = 64 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    return out["async"], sum(faults >= half for faults in out["faults"][-COUNTED:])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the host-memory settings are glibc's")
def test_host_memory_stays_mapped_between_calls_with_ddms_settings():
    assert _faulting_calls(DDM_XLA_CPU_DEFAULTS="0") == (True, COUNTED)
    is_async, faulting = _faulting_calls()
    assert not is_async and faulting <= 5
    # The user's own async setting wins. XLA's dispatch thread then allocates the output in an arena
    # of its own, which maps a block this large apart whatever mallopt says.
    assert _faulting_calls(JAX_CPU_ENABLE_ASYNC_DISPATCH="1") == (True, COUNTED)
