"""ddm.xla_cpu: the XLA:CPU flag ddm sets, where it applies, and that it takes effect."""
import os

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
