"""ddm.unet's GroupNorm (moments over (H, W) first, closed-form gradient) against flax's nn.GroupNorm."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddm.unet as unet
from ddm.unet import GroupNorm, group_norm


def _both(x, dtype=jnp.float32):
    ours, ref = GroupNorm(dtype=dtype), nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) == jax.tree_util.tree_structure(variables)
    rng = np.random.default_rng(1)
    params = {"scale": jnp.asarray(rng.normal(1.0, 0.3, x.shape[-1]), jnp.float32),
              "bias": jnp.asarray(rng.normal(0.0, 0.3, x.shape[-1]), jnp.float32)}
    return ours, ref, {"params": params}


@pytest.mark.parametrize("shape,offset", [((3, 8, 8, 64), 0.0), ((2, 4, 6, 32), 3.0), ((1, 1, 1, 96), 0.0)])
def test_forward_and_gradients_match_flax(shape, offset):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(offset, 2.0, shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)  # a generic cotangent
    ours, ref, variables = _both(x)
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=2e-5)
    loss = lambda model: lambda v, x: jnp.sum(model.apply(v, x) * w)
    got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    want = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_normalises_each_group_and_keeps_dtype():
    x = jnp.asarray(np.random.default_rng(2).normal(5.0, 3.0, (2, 4, 4, 64)), jnp.bfloat16)
    model = GroupNorm(dtype=jnp.bfloat16)
    y = model.apply(model.init(jax.random.key(0), x), x)
    assert y.dtype == jnp.bfloat16
    groups = np.asarray(y, np.float32).reshape(2, 16, 32, 2)
    np.testing.assert_allclose(groups.mean(axis=(1, 3)), 0.0, atol=0.02)
    np.testing.assert_allclose(groups.std(axis=(1, 3)), 1.0, atol=0.02)


def test_channels_must_split_into_groups():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        GroupNorm().init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))


def test_scale_and_bias_gradients_are_summed_from_the_per_example_sums_off_cpu(monkeypatch):
    """Off CPU, the (C,) gradients come from the (B, C) sums the input gradient needs, not from another
    pass over the (B, H, W, C) tensors: XLA folds a reduce of a reduce into one, and
    ddm.unet._stacked_batch_sums' barrier stops it there (CPU keeps the folding)."""
    x, dy, scale = jnp.ones((4, 8, 8, 64)), jnp.ones((4, 8, 8, 64)), jnp.ones(64)

    def vjp():  # a function of its own per call: jax caches a function's trace
        return jax.jit(lambda x, s, b, dy: jax.vjp(lambda *a: group_norm(*a, 32, 1e-6), x, s, b)[1](dy))

    def reductions_to_channels():  # compiled here, on CPU: (C,) results, or both stacked as (2, C)
        hlo = vjp().lower(x, scale, scale, dy).compile().as_text()
        return set(re.findall(r"= f32\[(?:2,)?64\]\{[\d,]+\} reduce\([^)]*\), dimensions=\{([\d,]+)\}", hlo))

    lowered = {p: jax.export.export(vjp(), platforms=[p])(x, scale, scale, dy).mlir_module()
               for p in ("cuda", "tpu", "cpu")}
    assert "optimization_barrier" in lowered["cuda"] and "optimization_barrier" in lowered["tpu"]
    assert "optimization_barrier" not in lowered["cpu"]
    assert reductions_to_channels() == {"0,1,2"}  # folded: reductions of the whole tensors
    monkeypatch.setattr(unet, "_scale_bias_grads", unet._stacked_batch_sums)  # off CPU's branch
    assert reductions_to_channels() == {"1"}  # the two (B, C) sums stacked, summed over the batch


@pytest.mark.parametrize("shape", [(3, 8, 8, 64), (2, 4, 8, 128)])
def test_group_sums_by_adds_match_flax_forward_and_gradients(monkeypatch, shape):
    """On NVIDIA GPUs, from 32 positions on, each group's channels are summed by adds of strided
    slices (``ddm.unet._sum_by_adds``); here on CPU that branch is patched in."""
    monkeypatch.setattr(unet, "_sum_by_reduction", unet._sum_by_adds)
    monkeypatch.setattr(unet, "_scale_bias_grads", unet._stacked_batch_sums)
    test_forward_and_gradients_match_flax(shape, 1.0)
    g = jax.random.normal(jax.random.key(0), (2, 32, 4))
    np.testing.assert_allclose(unet._sum_by_adds(g), jnp.sum(g, axis=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size, fewer_on_gpu", [(8, 5), (4, 1)])
def test_group_sums_are_adds_on_gpus_from_32_positions(size, fewer_on_gpu):
    # The StableHLO exported for each platform: for CUDA, from 8x8 (64 positions) on, the group sums of
    # the two moments and of the two backward sums are adds (4 reductions fewer); off CPU the scale
    # and bias gradients are one reduction of the two stacked (1 fewer); at 4x4 only the latter.
    x, scale = jnp.ones((2, size, size, 64)), jnp.ones(64)
    vjp = jax.jit(lambda x, s, b, dy: jax.vjp(lambda *a: group_norm(*a, 32, 1e-6), x, s, b)[1](dy))
    reductions = {p: jax.export.export(vjp, platforms=[p])(x, scale, scale, x).mlir_module().count("stablehlo.reduce")
                  for p in ("cpu", "cuda", "tpu")}
    assert reductions["cpu"] - reductions["cuda"] == fewer_on_gpu and reductions["cpu"] - reductions["tpu"] == 1
