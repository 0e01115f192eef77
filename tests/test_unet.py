"""Tests for ddm.unet: DDPM's parameter count, shapes and dtypes of every option, dropout,
conditioning on t and y, DDPM's zero-init, per-example independence, the config errors, and the
Winograd convs of CPU."""
import functools
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm import unet
from ddm.unet import Dropout, UNet, dropout_keep_mask, timestep_embedding, winograd_conv3x3

# A tiny network: levels of 8x8 and 4x4 feature maps, attention at 4x4.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)


def _inputs(batch=2, size=8, channels=3, seed=0):
    x = jax.random.uniform(jax.random.key(seed), (batch, size, size, channels), minval=-1, maxval=1)
    t = jnp.arange(batch, dtype=jnp.int32) * 97 + 3
    return x, t


def _random_params(model, x, t, y=None, seed=1):
    """Parameters of the shapes `init` would give, drawn N(0, 0.1^2) with NumPy.

    This skips the compile of `init` (slow on CPU) and leaves no branch at DDPM's zero init.
    """
    shapes = jax.eval_shape(
        lambda x, t, y: model.init(jax.random.key(0), x, t, y, train=False), x, t, y)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, train):
    return jax.jit(lambda params, x, t, y, rngs: model.apply(
        {"params": params}, x, t, y, train=train, rngs=rngs))


def _apply(model, params, x, t, y=None, *, train=False, rng=None):
    """model.apply under jit, one compile per (model, train, input shapes)."""
    rngs = None if rng is None else {"dropout": rng}
    return _jitted_apply(model, train)(params, x, t, y, rngs)


def test_ddpm_cifar10_parameter_count():
    # 35,746,307 was obtained independently from diffusers 0.42.1 (PyTorch): the parameter count
    # of UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
    # block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    # down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    # up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
    # norm_num_groups=32, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    # attention_head_dim=None), the config of google/ddpm-cifar10-32, a port of DDPM's TF model.
    # (Porting random weights of a small UNet into that diffusers model also gave our outputs to
    # 4e-6.)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 out_channels=3)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(shapes)) == 35_746_307


def test_timestep_embedding_matches_ddpm_closed_form():
    t = jnp.array([0, 1, 999], jnp.int32)
    dim = 16
    freqs = np.exp(-np.log(10000.0) * np.arange(8) / 7)
    args = np.array([0.0, 1.0, 999.0])[:, None] * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    emb = timestep_embedding(t, dim)
    assert emb.shape == (3, dim) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb, expected, atol=2e-4)  # float32 sin of args up to 999


@pytest.mark.parametrize("dim", [7, 2])
def test_timestep_embedding_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match=f"dim={dim}"):
        timestep_embedding(jnp.zeros((1,), jnp.int32), dim)


@pytest.mark.parametrize("options, size, channels, out_channels", [
    (dict(), 8, 3, 3),  # DDPM
    # IDDPM / ADM: learned variance ([mean | variance]), BigGAN up/down, heads of 16 channels,
    # adaptive group norm.
    (dict(out_channels=6, resblock_updown=True, num_head_channels=16, scale_shift_norm=True),
     8, 3, 6),
    (dict(num_heads=2, resamp_with_conv=False, conv_shortcut=True), 8, 3, 3),
    (dict(ch_mult=(1, 2, 2), attn_resolutions=(8,)), 16, 1, 1),  # 1-channel 16x16, 3 levels
])
def test_output_shape_and_dtype(options, size, channels, out_channels):
    model = UNet(**{**TINY, **options})
    x, t = _inputs(size=size, channels=channels)
    out = _apply(model, _random_params(model, x, t), x, t)
    assert out.shape == (2, size, size, out_channels) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_class_conditional_uses_labels():
    model = UNet(**TINY, num_classes=10)
    x, t = _inputs()
    y = jnp.array([1, 7], jnp.int32)
    params = _random_params(model, x, t, y)
    assert params["label_emb"]["embedding"].shape == (10, 4 * TINY["ch"])
    out = _apply(model, params, x, t, y)
    assert out.shape == x.shape
    assert not np.allclose(out, _apply(model, params, x, t, y[::-1]))


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = UNet(**TINY, dtype=jnp.bfloat16, num_head_channels=16, scale_shift_norm=True)
    x, t = _inputs()
    params = _random_params(model, x, t)  # keeps the dtypes that init gives
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = _apply(model, params, x, t)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out).max()) > 0


def test_ddpm_zero_init():
    """DDPM zero-inits the output conv, each res block's second conv and attention's proj_out."""
    model = UNet(**TINY)
    x, t = _inputs()
    key = jax.random.key(0, impl="rbg")  # compiles faster on CPU than threefry
    params = jax.jit(lambda x, t: model.init(key, x, t, train=False))(x, t)["params"]
    for zero in [params["conv_out"], params["mid_block_1"]["conv2"],
                 params["down_1_block_0"]["conv2"], params["mid_attn"]["proj_out"],
                 params["up_1_attn_0"]["proj_out"]]:
        assert not np.any(zero["kernel"]) and not np.any(zero["bias"])
    for random in [params["conv_in"], params["mid_block_1"]["conv1"], params["mid_attn"]["q"],
                   params["temb_dense0"], params["down_1_block_0"]["nin_shortcut"]]:
        assert np.all(random["kernel"].std() > 0) and not np.any(random["bias"])
    assert not np.any(_apply(model, params, x, t))


def test_dropout():
    model = UNet(**TINY)
    x, t = _inputs()
    params = _random_params(model, x, t)
    eval_a = _apply(model, params, x, t)
    eval_b = _apply(model, params, x, t, rng=jax.random.key(9))
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = _apply(model, params, x, t, train=True, rng=jax.random.key(1))
    train_a2 = _apply(model, params, x, t, train=True, rng=jax.random.key(1))
    train_b = _apply(model, params, x, t, train=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(train_a, train_a2)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)


def _within(count, n, p, sigmas=5.0):
    """count of n Bernoulli(p) trials is within `sigmas` standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9, 0.999])
def test_dropout_keep_mask_keeps_each_element_with_probability_keep_prob(keep_prob):
    n = 1 << 20
    mask = np.asarray(dropout_keep_mask(jax.random.key(3), (n,), keep_prob))
    assert mask.dtype == bool and mask.shape == (n,)
    assert _within(mask.sum(), n, keep_prob)


def test_dropout_keep_mask_elements_and_keys_are_independent():
    # Pairs of elements at power-of-two strides (where index hashes show structure if any), the
    # masks of two keys, and of two keys folded from one, each kept together with probability p^2.
    p, n = 0.5, 1 << 20
    mask = np.asarray(dropout_keep_mask(jax.random.key(5), (n,), p))
    for stride in (1, 2, 3, 16, 128, 1024, 1 << 15):
        assert _within(np.sum(mask[:-stride] & mask[stride:]), n - stride, p * p), stride
    image = np.asarray(dropout_keep_mask(jax.random.key(5), (16, 32, 32, 64), p))
    for axis in range(4):  # neighbours along every axis of an activation-shaped mask
        a, b = np.swapaxes(image, 0, axis)[:-1], np.swapaxes(image, 0, axis)[1:]
        assert _within(np.sum(a & b), a.size, p * p), axis
    key = jax.random.key(7)
    for key_a, key_b in [(jax.random.key(5), jax.random.key(6)), tuple(jax.random.split(key)),
                         (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))]:
        a, b = (np.asarray(dropout_keep_mask(k, (n,), p)) for k in (key_a, key_b))
        assert _within(np.sum(a & b), n, p * p)
    np.testing.assert_array_equal(mask, dropout_keep_mask(jax.random.key(5), (n,), p))


def test_dropout_keep_mask_rejects_more_than_2_to_the_32_elements():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        jax.eval_shape(lambda k: dropout_keep_mask(k, (1 << 16, (1 << 16) + 1), 0.9), jax.random.key(0))


def test_seeded_dropout_layers_hash_one_seed_with_their_stream_into_independent_masks():
    x = jnp.ones((2, 64, 64, 32))  # 262,144 elements
    seed = jax.random.bits(jax.random.key(4), (2,), jnp.uint32)
    layer = lambda stream: np.asarray(Dropout(0.5, deterministic=False).apply({}, x, seed, stream)) != 0
    streams = (zlib.crc32(b"down_0_block_0"), zlib.crc32(b"down_0_block_0"), zlib.crc32(b"down_0_block_1"))
    a, a2, b = (layer(stream) for stream in streams)
    np.testing.assert_array_equal(a, a2)
    assert _within(a.sum(), a.size, 0.5) and _within(b.sum(), b.size, 0.5)
    assert _within(np.sum(a & b), a.size, 0.25)  # two layers' masks: independent to this resolution
    for stream in (0, 1, 2):  # neighbouring streams too
        assert _within(np.sum(layer(stream) & layer(stream + 1)), a.size, 0.25), stream
    np.testing.assert_array_equal(layer(0), np.asarray(unet.seeded_keep_mask(unet._mix32(seed), x.shape, 0.5)))


def test_unet_draws_one_dropout_seed_per_call_for_all_its_layers():
    model = UNet(**TINY)
    x, t = _inputs()
    params = _random_params(model, x, t)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, train=True,
                                                     rngs={"dropout": jax.random.key(1)}))(params))
    assert re.findall(r"random_bits\[bit_width=32 shape=\(([\d, ]*)\)\]", jaxpr) == ["2,"]  # 5 res blocks
    assert jaxpr.count("random_fold_in") == 1  # flax's make_rng, once


def test_dropout_module_scales_kept_elements_and_passes_through_when_off():
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 32), jnp.float32, 1.0, 2.0)  # no zeros
    rngs = {"dropout": jax.random.key(1)}
    y = Dropout(0.25, deterministic=False).apply({}, x, rngs=rngs)
    kept = np.asarray(y) != 0
    assert _within(kept.sum(), x.size, 0.75)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    for module in (Dropout(0.25, deterministic=True), Dropout(0.0, deterministic=False)):
        np.testing.assert_array_equal(module.apply({}, x, rngs=rngs), x)
    assert not np.any(Dropout(1.0, deterministic=False).apply({}, x, rngs=rngs))
    bf16 = Dropout(0.25, deterministic=False).apply({}, x.astype(jnp.bfloat16), rngs=rngs)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16) != 0, kept)  # the mask does not depend on the dtype


def test_output_depends_on_t():
    model = UNet(**TINY)
    x, t = _inputs(batch=1)
    params = _random_params(model, x, t)
    out0 = _apply(model, params, x, jnp.array([0], jnp.int32))
    out1 = _apply(model, params, x, jnp.array([500], jnp.int32))
    assert not np.allclose(out0, out1)


def test_jit_batch_of_one_and_examples_are_independent():
    """Under jit, a batch of 2 gives what each example gives alone in a batch of 1."""
    model = UNet(**TINY)
    x, t = _inputs()
    params = _random_params(model, x, t)
    both = _apply(model, params, x, t)
    for i in range(2):
        one = _apply(model, params, x[i:i + 1], t[i:i + 1])
        np.testing.assert_allclose(one, both[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, size, use_y, match", [
    (dict(ch_mult=(1, 2, 2)), 6, False, r"ch_mult=\(1, 2, 2\).*divisible by 2\*\*2=4.*6x6"),
    (dict(ch=48), 8, False, r"ch=48.*32"),
    (dict(num_heads=3), 8, False, r"num_heads=3.*64 channels"),
    (dict(num_head_channels=24), 8, False, r"num_head_channels=24.*64 channels"),
    (dict(attn_resolutions=(4, 16)), 8, False, r"attn_resolutions=\(4, 16\).*\[16\].*\[8, 4\]"),
    (dict(num_classes=10), 8, False, r"num_classes=10.*y"),
    (dict(), 8, True, r"num_classes=None.*y"),
    (dict(attention="flash"), 8, False, r"attention='flash' is not one of \('xla', 'cudnn'\)"),
    (dict(attention="cudnn"), 8, False, r"attention='cudnn' needs dtype bfloat16 or float16.*got float32"),
])
def test_bad_config_raises(options, size, use_y, match):
    model = UNet(**{**TINY, **options})
    x, t = _inputs(size=size)
    y = jnp.zeros((2,), jnp.int32) if use_y else None
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x, t, y: model.init(jax.random.key(0), x, t, y, train=False),
                       x, t, y)


def _nearest_then_conv(x, params, dtype=jnp.float32):
    """The reference: flax's 3x3 'SAME' nn.Conv on the nearest-neighbour upsampled image."""
    import flax.linen as nn

    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(params["kernel"].shape[-1], (3, 3), padding="SAME", dtype=dtype).apply({"params": params}, up)


@pytest.mark.parametrize("size", [1, 5])
def test_upsample_conv_is_nearest_upsampling_then_a_3x3_conv(size):
    from ddm.unet import UpsampleConv

    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 6))
    module = UpsampleConv(5)
    params = module.init(jax.random.key(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.key(2), (5,))}
    y = module.apply({"params": params}, x)
    assert y.shape == (2, 2 * size, 2 * size + 2, 5)
    np.testing.assert_allclose(y, _nearest_then_conv(x, params), rtol=1e-5, atol=1e-5)
    # Both gradients too (the sub-pixel taps are linear in the kernel).
    cotangent = jax.random.normal(jax.random.key(3), y.shape)
    loss = lambda f: lambda p, x: jnp.sum(f(p, x) * cotangent)
    ours = jax.grad(loss(lambda p, x: module.apply({"params": p}, x)), argnums=(0, 1))(params, x)
    ref = jax.grad(loss(lambda p, x: _nearest_then_conv(x, p)), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_conv_bfloat16_and_init_match_flax_conv():
    import flax.linen as nn
    from ddm.unet import UpsampleConv, _kernel_init

    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    ours = UpsampleConv(8, dtype=jnp.bfloat16).init(jax.random.key(1), x)["params"]
    # The same parameters as the nn.Conv that ddm's Upsample used to apply to the upsampled image.
    flax_conv = nn.Conv(8, (3, 3), kernel_init=_kernel_init(False)).init(jax.random.key(1), jnp.zeros((2, 8, 8, 8)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, flax_conv["params"])
    y = UpsampleConv(8, dtype=jnp.bfloat16).apply({"params": ours}, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), _nearest_then_conv(x, ours), rtol=0.05, atol=0.05)


def test_up_resblock_matches_upsampling_the_image_then_a_conv(monkeypatch):
    # An "up" ResBlock (resblock_updown, ADM) convolves through UpsampleConv and gives ADM's output:
    # swap in the upsampled-image form and compare. (Upsample's conv, DDPM's, is compared the same
    # way in tests/test_benchmarks.py with the benchmarks' nearest_upsample arm.)
    import ddm.unet as unet

    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, resblock_updown=True)
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([3, 500])
    params = jax.jit(lambda: model.init(jax.random.key(1), x, t, train=False))()["params"]
    rng = np.random.default_rng(2)  # off the zero init of the residual branches
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)
    forward = lambda: jax.jit(lambda p: model.apply({"params": p}, x, t, train=False))(params)
    ours = forward()

    def upsample_then_conv(x, kernel, dtype):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2).astype(dtype)
        return jax.lax.conv_general_dilated(up, kernel.astype(dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    monkeypatch.setattr(unet, "upsample_conv", upsample_then_conv)
    reference = forward()
    assert float(jnp.abs(reference).mean()) > 1e-2
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def _direct_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_winograd_matrices_compute_four_outputs_of_a_3_tap_correlation():
    rng = np.random.default_rng(0)
    bt, g, at = (np.array(m, np.float64) for m in (unet.WINOGRAD_BT, unet.WINOGRAD_G, unet.WINOGRAD_AT))
    for _ in range(5):
        d, taps = rng.standard_normal(6), rng.standard_normal(3)
        expected = [sum(d[i + j] * taps[j] for j in range(3)) for i in range(4)]
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, features", [((2, 5, 8, 3), 7), ((2, 16, 16, 16), 16), ((1, 3, 32, 8), 4)])
def test_winograd_conv3x3_and_its_gradients_match_xla_conv(shape, features):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (3, 3, shape[-1], features)) / 3
    g = jax.random.normal(kg, shape[:3] + (features,))
    y, vjp = jax.vjp(jax.jit(winograd_conv3x3), x, kernel)
    y_ref, vjp_ref = jax.vjp(_direct_conv, x, kernel)
    for ours, ref in [(y, y_ref), *zip(vjp(g), vjp_ref(g))]:
        assert ours.shape == ref.shape
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0.1 and float(jnp.max(jnp.abs(ours - ref))) < 1e-5 * scale


def test_winograd_conv3x3_rejects_a_width_not_a_multiple_of_4():
    with pytest.raises(ValueError, match=r"W \(here 6\) a multiple of 4"):
        winograd_conv3x3(jnp.zeros((1, 4, 6, 2)), jnp.zeros((3, 3, 2, 2)))


def _exported_convs(x, kernel, platform, stride=1):
    """The kernel shapes of the convolutions ``unet._conv_general_dilated`` lowers to on ``platform``."""
    import re

    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    f = lambda x, k: unet._conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=dn)
    text = jax.export.export(jax.jit(f), platforms=[platform])(x, kernel).mlir_module()
    return re.findall(r"stablehlo.convolution.*, tensor<(\w+)>\) -> ", text)


def test_unet_convs_are_winograd_on_cpu_only_for_wide_float32_stride_1_3x3():
    x, kernel = jnp.ones((2, 16, 16, 4)), jnp.ones((3, 3, 4, 5))
    assert _exported_convs(x, kernel, "cpu") == ["3x1x4x5xf32"] * 6  # one 3x1 conv (over H) per product
    assert _exported_convs(x, kernel, "cuda") == ["3x3x4x5xf32"]  # accelerators keep XLA's conv
    assert _exported_convs(x, kernel, "cpu", stride=2) == ["3x3x4x5xf32"]
    assert _exported_convs(x[:, :, :8], kernel, "cpu") == ["3x3x4x5xf32"]  # under WINOGRAD_MIN_WIDTH
    bf16 = _exported_convs(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), "cpu")
    assert bf16 == ["3x3x4x5xbf16"]
    assert _exported_convs(x[..., :2], jnp.ones((1, 1, 2, 5)), "cpu") == ["1x1x2x5xf32"]
    # a 1-D conv goes to XLA as it is
    dn = jax.lax.conv_dimension_numbers((2, 16, 4), (3, 4, 5), ("NWC", "WIO", "NWC"))
    y = unet._conv_general_dilated(jnp.ones((2, 16, 4)), jnp.ones((3, 4, 5)), (1,), "SAME", dimension_numbers=dn)
    assert y.shape == (2, 16, 5) and float(y[0, 0, 0]) == 8.0  # 2 taps x 4 channels at the edge


def test_winograd_conv3x3_differentiates_its_input_by_winograd_and_its_kernel_by_xla_conv():
    x, kernel = jnp.ones((2, 16, 16, 4)), jnp.ones((3, 3, 4, 5))
    grad = jax.grad(lambda x, k: jnp.sum(winograd_conv3x3(x, k) ** 2), argnums=(0, 1))
    text = jax.jit(grad).lower(x, kernel).as_text()
    convs = re.findall(r"stablehlo.convolution.*: \(tensor<(\w+)>, tensor<(\w+)>\) -> ", text)
    # six 3x1 convs (over H) of tiles (W/4 = 4) each for the forward and for the input gradient (the
    # kernel turned and its channels swapped), and the kernel gradient as one direct conv of the
    # residual, the input padded along W (18 columns), with the output gradient as rhs
    assert sorted(convs) == ([("2x16x18x4xf32", "2x16x16x5xf32")] + [("2x16x4x4xf32", "3x1x4x5xf32")] * 6
                             + [("2x16x4x5xf32", "3x1x5x4xf32")] * 6), convs


def test_unet_with_winograd_convs_matches_xla_convs_and_trains_with_them(monkeypatch):
    from jax.flatten_util import ravel_pytree

    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    x, t = _inputs(batch=2, size=16)
    params = _random_params(model, x, t)

    def run():  # new functions per call: jit must trace the convs again
        forward = jax.jit(lambda p: model.apply({"params": p}, x, t, train=False))
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, train=False) ** 2)
        grad = jax.jit(jax.value_and_grad(loss))
        hlos = (f.lower(params).compile().as_text() for f in (forward, grad))
        return forward(params), grad(params), [hlo.count("window={size=3x1") for hlo in hlos]

    out, (value, grads), winograd_convs = run()
    monkeypatch.setattr(unet, "_conv_general_dilated", jax.lax.conv_general_dilated)
    out_ref, (value_ref, grads_ref), direct_convs = run()
    # the 16x16 level's eight 3x3 convs (conv_in, two in the down res block, four in the two up res
    # blocks, conv_out) are six 3x1 convs each
    # differentiated, seven of them also have a Winograd input gradient (not conv_in: the image is data)
    assert (winograd_convs, direct_convs) == ([8 * 6, (8 + 7) * 6], [0, 0])
    assert float(jnp.max(jnp.abs(out_ref))) > 1e-2
    assert float(jnp.max(jnp.abs(out - out_ref))) < 1e-5 * float(jnp.max(jnp.abs(out_ref)))
    # differentiated: the same value and gradients, to Winograd's float32 error
    assert float(value_ref) > 1e-3 and abs(float(value) - float(value_ref)) < 1e-5 * float(value_ref)
    ours, ref = ravel_pytree(grads)[0], ravel_pytree(grads_ref)[0]
    assert float(jnp.max(jnp.abs(ours - ref))) <= 1e-6 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (2, 4, 6, 7)])
def test_matmul_last_axis_is_lax_dot_general(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (7, 3))
    numbers = (((len(shape) - 1,), (0,)), ((), ()))
    expected = jax.lax.dot_general(x, kernel, numbers, precision="highest")
    np.testing.assert_allclose(unet._matmul_last_axis(x, kernel, numbers, precision="highest"), expected, rtol=1e-6)
    transposed = (((0,), (0,)), ((), ()))  # any other contraction falls through to lax
    np.testing.assert_array_equal(unet._matmul_last_axis(x.reshape(7, -1), kernel, transposed),
                                  jax.lax.dot_general(x.reshape(7, -1), kernel, transposed))


def test_dense_kernel_gradient_reads_its_output_gradient_once_in_place(monkeypatch):
    """A NIN shortcut's output gradient, sliced from a wider cheap elementwise producer (as the up
    path's concatenated skips give it), feeds the input gradient and the kernel gradient. As one 2-D
    matmul both dots read one (B*H*W, F) buffer; as lax's 4-D contraction over (B, H, W), XLA:CPU adds
    a transposed (F, B*H*W) copy of it with the producer recomputed inside."""
    x, a = jnp.ones((2, 8, 8, 24)), jnp.ones((2, 8, 8, 32))

    def fusion_shapes():  # the 2-D fusions of the compiled gradients, with _dense built as it is now
        dense = unet._dense(16, jnp.float32)
        params = dense.init(jax.random.key(0), x)

        def grads(params, x, a, b):
            _, vjp = jax.vjp(lambda p, x: dense.apply(p, x), params, x)
            return vjp((a * b - a)[..., :16])

        hlo = jax.jit(grads).lower(params, x, a, a).compile().as_text()
        return sorted(re.findall(r"= f32\[(\d+,\d+)\]\{[\d,]+\} fusion", hlo[hlo.index("ENTRY"):]))

    assert fusion_shapes() == ["128,16"]  # dy once, in place, (B*H*W, F)
    monkeypatch.setattr(unet, "_matmul_last_axis", jax.lax.dot_general)
    assert fusion_shapes() == ["128,16", "16,128"]  # lax: dy again, transposed


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_nin_shortcut_of_parts_is_the_dense_layer_of_their_concatenation(dtype, tol):
    import flax.linen as nn
    from ddm.unet import NinShortcut

    a = jax.random.normal(jax.random.key(0), (2, 4, 4, 24))
    b = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    shortcut = NinShortcut(16, dtype)
    params = shortcut.init(jax.random.key(2), (a, b))["params"]
    assert jax.tree_util.tree_map(jnp.shape, params) == {"kernel": (32, 16), "bias": (16,)}  # nn.Dense's
    params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.key(3), (16,))}
    y = shortcut.apply({"params": params}, (a, b))
    dense = nn.Dense(16, dtype=dtype).apply({"params": params}, jnp.concatenate([a, b], axis=-1))
    assert y.dtype == dtype and y.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(dense, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_cudnn_attention_passes_the_heads_as_dot_product_attention_takes_them(monkeypatch, num_heads):
    # cuDNN needs an NVIDIA GPU. Here JAX's XLA implementation of the same call stands in for it, so this
    # checks ddm's side of the call: the (B, L, heads, d) layout, the default 1/sqrt(d) scale, the way back.
    calls, jax_attention = [], jax.nn.dot_product_attention

    def dot_product_attention(q, k, v, implementation=None):
        calls.append((q.shape, implementation))
        return jax_attention(q, k, v, implementation="xla")

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 4, 4, 64)) for i in range(3))
    xla = unet.multi_head_attention(q, k, v, num_heads)
    monkeypatch.setattr(unet.jax.nn, "dot_product_attention", dot_product_attention)
    cudnn = unet.multi_head_attention(q, k, v, num_heads, "cudnn")
    assert calls == [((2, 16, num_heads, 64 // num_heads), "cudnn")]
    np.testing.assert_allclose(cudnn, xla, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(xla - v).mean()) > 0.1  # the weights are not one-hot: the softmax matters


def test_cudnn_attention_where_jax_refuses_it_names_the_option_and_the_fix():
    q = jnp.ones((1, 4, 4, 64), jnp.bfloat16)  # on a CPU JAX finds no cuDNN
    with pytest.raises(ValueError, match=r"'cudnn' cannot run heads of 64 channels over 16 positions in "
                                         r"bfloat16 here: .*cuDNN.* Use 'xla' \(UNet.attention"):
        unet.multi_head_attention(q, q, q, 1, "cudnn")


def test_unet_attention_option_reaches_every_attention_block(monkeypatch):
    seen = []
    monkeypatch.setattr(unet, "multi_head_attention",
                        lambda q, k, v, num_heads, implementation: seen.append(implementation) or q)
    model = UNet(**TINY, dtype=jnp.bfloat16, attention="cudnn")
    x, t = _inputs()
    jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    assert seen == ["cudnn"] * 4  # at 4x4: one down the U-Net, the middle, two up
