"""The hand FLOP count of benchmarks/common.py against XLA's cost analysis, on tiny U-Nets (no timing)."""
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddm.unet import UNet

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "common.py")


def _benchmark_script(name):
    """benchmarks/<name>.py, imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(os.path.dirname(_PATH), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _benchmark_script("common")


def _cost(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("resblock_updown", [False, True])
def test_hand_flops_match_xla_cost_analysis(resblock_updown):
    # Two levels (a downsample, an upsample, channel changes with NIN shortcuts), attention at 8x8
    # and in the middle, a learned-variance output; resampling by convs or by residual blocks.
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, out_channels=6,
                 resblock_updown=resblock_updown)
    shape, batch = (16, 16, 3), 2
    x, t = jnp.zeros((batch,) + shape), jnp.zeros((batch,), jnp.int32)
    params = common.random_params(model, shape)
    forward = lambda p, x, t: model.apply({"params": p}, x, t, train=False)
    grad = jax.grad(lambda p, x, t: jnp.sum(forward(p, x, t) ** 2))
    hand = common.hand_flops(model, shape, batch)
    # XLA also counts the elementwise work the hand count leaves out: a little above, never below.
    # The hand count is of the convolutions as the model defines them (XLA's direct ones) ...
    with common.direct_convs():
        assert 1.0 <= _cost(forward, params, x, t) / hand["forward"] < 1.04
        assert 1.0 <= _cost(grad, params, x, t) / hand["train"] < 1.04
    # ... which ddm's Winograd F(4, 3) convs at 16x16 compute in fewer multiply-adds on CPU (a new
    # function: jit would reuse the direct trace of `forward`)
    if jax.default_backend() == "cpu":
        winograd = lambda p, x, t: model.apply({"params": p}, x, t, train=False)
        assert _cost(winograd, params, x, t) / hand["forward"] < 0.9


def test_hand_flops_ddpm_cifar10():
    # DDPM's CIFAR-10 U-Net: ~6.2 GMACs per 32x32 image counting the padding taps (the figure
    # usually quoted, with the upsampling convs as 3x3 convs over the upsampled image: 36 taps per
    # input pixel where ddm's sub-pixel convs have 16, at 4x4, 8x8 and 16x16 with 256 channels),
    # fewer without them; the forward scales linearly with the batch.
    model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    padded = common.hand_flops(model, (32, 32, 3), 1, count_padding=True)
    exact = common.hand_flops(model, (32, 32, 3), 1)
    upsampled_taps_saved = (36 - 16) * (4 ** 2 + 8 ** 2 + 16 ** 2) * 256 ** 2
    assert 12.3e9 < padded["forward"] + 2 * upsampled_taps_saved < 12.6e9
    assert exact["forward"] < padded["forward"]
    assert common.hand_flops(model, (32, 32, 3), 4)["forward"] == 4 * exact["forward"]
    # train = 3 x forward - conv_in's forward, when no kernel gradient counts the padding
    train = common.hand_flops(model, (32, 32, 3), 1)["train"]
    assert train == 3 * exact["forward"] - 2 * exact["macs"]["conv_in"]
    assert common.hand_flops(model, (32, 32, 3), 1, wgrad_padding=True)["train"] > train


def test_taps_of_same_convs():
    assert common._taps(32, 3, 1) == 3 * 32 - 2  # one tap in the padding at each edge
    assert common._taps(32, 3, 2) == 3 * 16 - 1  # TF SAME, stride 2: one pad pixel at the end
    assert common._taps(4, 1, 1) == 4


def test_torch_peer_hybrid_loss_matches_ddm():
    # The PyTorch peer of the IDDPM train step computes L_t as ddm.losses does (same work, same numbers).
    import numpy as np
    import torch
    from ddm.losses import vb_terms_bpd

    peer = common.TorchTrainCall("cifar10_cosine", "float32", 2, 1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=())
    assert peer.hybrid and peer.T == 4000
    _, _, diffusion, _ = common.build("cifar10_cosine")
    rng = np.random.default_rng(0)
    x0 = np.round(rng.uniform(-1, 1, (4, 3, 8, 8)) * 127.5) / 127.5
    x0[0, 0, 0, :2] = (-1.0, 1.0)  # the decoder's open edge bins
    xt, eps, v = (rng.standard_normal((4, 3, 8, 8)) for _ in range(3))
    v = np.tanh(v)
    t = np.array([0, 1, 2000, 3999])
    ours = peer.vb_bpd(*(torch.tensor(a, dtype=torch.float32) for a in (eps, v, x0, xt)), torch.tensor(t))
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1), jnp.float32)
    ref = vb_terms_bpd(diffusion, jnp.concatenate([nhwc(eps), nhwc(v)], -1), nhwc(x0), nhwc(xt), jnp.asarray(t))
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref["output"]), rtol=2e-4, atol=1e-6)
    peer()  # one full train step of the peer runs and leaves finite parameters
    assert all(torch.isfinite(p).all() for p in peer.params)


def test_conv_floor_reads_every_convolution_of_the_unet():
    # conv_floor.py times the convolutions it reads from the forward's jaxpr: one use per conv
    # kernel of the parameter tree (each conv module runs once), with the same kernel shapes, but
    # four 2x2 sub-pixel convs per upsampling kernel; the XLA and PyTorch sides compute the same
    # convolution.
    import collections

    import numpy as np
    import torch

    conv_floor = _benchmark_script("conv_floor")
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    convs = conv_floor.unet_convs(model, (16, 16, 3), 2)
    leaves = jax.tree_util.tree_flatten_with_path(common.random_params(model, (16, 16, 3)))[0]
    kernels = collections.Counter()
    for path, p in leaves:
        if p.ndim == 4 and "upsample" in jax.tree_util.keystr(path):
            kernels[(2, 2) + p.shape[2:]] += 4
        elif p.ndim == 4:
            kernels[p.shape] += 1
    uses_by_kernel = collections.Counter()
    for conv, uses in convs.items():
        uses_by_kernel[conv.kernel_shape] += uses
    assert kernels == uses_by_kernel
    # conv_in, 2 per res block (1 + 1 down, 2 middle, 2 + 2 up), the downsampling conv, 4 for the
    # upsampling one, conv_out
    assert sum(convs.values()) == 1 + 2 * 8 + 1 + 4 + 1
    assert {c.strides for c in convs} == {(1, 1), (2, 2)} and all(c.x_shape[0] == 2 for c in convs)
    for conv in convs:
        xla, peer = conv_floor.XlaConvs({conv: 1}, False), conv_floor.TorchConvs({conv: 1}, False)
        x, w, _ = xla.inputs[0]
        forward, tx, tw, _ = peer.calls[0]
        with torch.no_grad():
            tx.copy_(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
            tw.copy_(torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()))
            y = forward().numpy().transpose(0, 2, 3, 1)
        if conv.strides == (1, 1):  # stride 2: TF pads the end only, PyTorch both sides (diffusers' way)
            np.testing.assert_allclose(y, np.asarray(xla.fn(xla.inputs)[0]), rtol=1e-4, atol=1e-4)


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(_PATH), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_trace(trace_dir, events):
    import gzip
    import json

    run = os.path.join(trace_dir, "plugins", "profile", "run")
    os.makedirs(run)
    with gzip.open(os.path.join(run, "perfetto_trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_profile_counts_only_the_device_timeline_on_a_gpu(tmp_path):
    # A GPU trace has the host's launch calls and the device's kernels: only the device's count, and
    # its "XLA Ops" line alone where it has one (its kernels would count the same work twice).
    profile_steps = _load_benchmark("profile_steps")
    meta = lambda kind, pid, name, tid=0: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}
    op = lambda name, pid, tid, dur: {"ph": "X", "name": name, "pid": pid, "tid": tid, "dur": dur}
    events = [meta("process_name", 1, "/host:CPU"), meta("process_name", 2, "/device:GPU:0 pid 2"),
              meta("thread_name", 2, "Stream #14(Compute)", 7), op("cuLaunchKernel", 1, 3, 50.0),
              op("loop_add_fusion_2", 1, 3, 40.0), op("loop_add_fusion_2", 2, 7, 5.0),
              op("sm90_xmma_wgrad_kernel", 2, 7, 20.0)]
    _write_trace(str(tmp_path / "streams"), events)
    totals, source = profile_steps.trace_ops(str(tmp_path / "streams"))
    assert totals == {"loop_add_fusion_2": 5.0, "sm90_xmma_wgrad_kernel": 20.0} and "Stream #14" in source
    events += [meta("thread_name", 2, "XLA Ops", 8), op("fusion.2", 2, 8, 6.0), op("convolution.1", 2, 8, 21.0)]
    _write_trace(str(tmp_path / "xla_ops"), events)
    totals, source = profile_steps.trace_ops(str(tmp_path / "xla_ops"))
    assert totals == {"fusion.2": 6.0, "convolution.1": 21.0} and source == "the device's 'XLA Ops' line"
    # a CPU trace (no device process) keeps every op event, as before
    _write_trace(str(tmp_path / "cpu"), [meta("process_name", 1, "/host:CPU"), op("ynn_fusion.3", 1, 3, 9.0),
                                         op("TfrtCpuExecutable::Execute", 1, 3, 99.0)])
    assert profile_steps.trace_ops(str(tmp_path / "cpu"))[0] == {"ynn_fusion.3": 9.0}
    assert profile_steps.op_kind("sm90_xmma_wgrad_implicit_gemm_bf16_kernel", "") == "convolution (kernel gradient)"
    assert profile_steps.op_kind("sm90_xmma_dgrad_implicit_gemm", "") == "convolution (forward / input gradient)"
    assert profile_steps.op_kind("nvjet_sm90_tst_128x128", "") == "dot"
    assert profile_steps.op_kind("input_reduce_fusion_3", "reduce broadcast; -> f32[8,256]") == \
        "reduce (norms, softmax sums)"


def test_flax_group_norm_arm_swaps_the_norm_only_inside_the_block():
    import flax.linen as nn
    import ddm.unet as unet

    model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = common.random_params(model, (8, 8, 3))  # random, so conv_out's zero init does not hide the norms
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    with common.flax_group_norm():
        flax_out = model.apply({"params": params}, x, t, train=False)  # same parameter names
        assert isinstance(unet.GroupNorm(), nn.GroupNorm)
    assert not isinstance(unet.GroupNorm(), nn.GroupNorm)
    ddm_out = model.apply({"params": params}, x, t, train=False)
    assert float(jnp.abs(ddm_out).mean()) > 1e-2
    assert jnp.allclose(flax_out, ddm_out, rtol=1e-4, atol=1e-6)


def test_nearest_upsample_arm_swaps_the_upsampling_only_inside_the_block():
    import ddm.unet as unet

    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    forward = lambda: jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, train=False))(params)
    conv_kernels = lambda jaxpr: sorted(e.invars[1].aval.shape[:2] for e in jaxpr.eqns
                                        if e.primitive.name == "conv_general_dilated")
    with common.VARIANTS["nearest_upsample"]():
        nearest_out = model.apply({"params": params}, x, t, train=False)
        assert conv_kernels(forward()).count((2, 2)) == 0
    assert unet.upsample_conv.__module__ == "ddm.unet" and conv_kernels(forward()).count((2, 2)) == 4
    ddm_out = model.apply({"params": params}, x, t, train=False)
    assert float(jnp.abs(ddm_out).mean()) > 1e-2
    assert jnp.allclose(nearest_out, ddm_out, rtol=1e-4, atol=1e-5)


def test_threefry_dropout_arm_swaps_the_dropout_only_inside_the_block():
    import numpy as np

    model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.5)
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    apply = lambda train: model.apply({"params": params}, x, t, train=train, rngs={"dropout": jax.random.key(2)})
    bit_shapes = lambda: re.findall(r"random_bits\[bit_width=32 shape=\(([\d, ]*)\)\]",
                                    str(jax.make_jaxpr(lambda: apply(True))()))  # nested jaxprs too
    with common.VARIANTS["threefry_dropout"]():
        flax_train, flax_eval = apply(True), apply(False)
        assert "2, 8, 8, 32" in bit_shapes()  # flax's nn.Dropout: threefry bits per element
    assert bit_shapes() == ["2,"]  # ddm's: one 2-word seed for the 5 res blocks' masks
    with common.VARIANTS["rng_per_dropout"]():
        per_layer_train = apply(True)
        assert bit_shapes() == ["2,"] + ["2,"] * 5  # the U-Net's, unused, and one per layer's mask
    ddm_train, ddm_eval = apply(True), apply(False)
    np.testing.assert_array_equal(flax_eval, ddm_eval)
    assert not np.allclose(flax_train, ddm_train) and not np.allclose(ddm_train, ddm_eval)
    assert not np.allclose(per_layer_train, ddm_train)  # other masks


def test_einsum_heads_arm_swaps_the_attention_only_inside_the_block():
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_heads=2)
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    forward = lambda: jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, train=False))(params)
    with common.VARIANTS["einsum_heads"]():
        einsum_out = model.apply({"params": params}, x, t, train=False)
        assert "f32[2,2,16,16]" in str(forward())  # logits (B, heads, H*W, H*W) at the 4x4 level
    ddm_jaxpr = str(forward())
    assert "f32[2,2,16,16]" not in ddm_jaxpr and "f32[4,16,16]" in ddm_jaxpr  # (B * heads, ...)
    ddm_out = model.apply({"params": params}, x, t, train=False)
    assert float(jnp.abs(ddm_out).mean()) > 1e-2
    assert jnp.allclose(einsum_out, ddm_out, rtol=1e-5, atol=1e-5)


def test_mfu_text_against_the_table_peak(monkeypatch):
    class Device:
        device_kind = "NVIDIA H200"

    monkeypatch.setattr(common.jax, "devices", lambda: [Device()])
    monkeypatch.setattr(common.jax, "default_backend", lambda: "gpu")
    # 204 TFLOP/s in bf16 is 20.6% of the H200's 989; float32 is quoted against fp32 and TF32 peaks
    assert common.mfu_text(204e12, "bfloat16").startswith("20.6% of table: H200 bfloat16")
    text = common.mfu_text(125e12, "float32")
    assert "186.6% of table: H200 float32" in text and "25.3% of table: H200 tf32" in text


def test_sample_scan_call_runs_the_ddim_sampler_with_new_noise_per_call():
    import numpy as np

    import ddm

    call = common.SampleScanCall("digits", "float32", 2, 3).ready()
    assert call.steps == 3 and call.diffusion.num_timesteps == 3
    first, second = np.asarray(call()), np.asarray(call())
    assert first.shape == (2,) + tuple(call.image_shape) and np.isfinite(first).all()
    assert not np.allclose(first, second)  # each call draws its own x_T
    model_fn = lambda x, t: call.model.apply({"params": call.params}, x, t, train=False)
    expected = ddm.ddim_sample(call.diffusion, model_fn, jax.random.key(call.calls), first.shape, eta=0.0)
    np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-5)


def test_winograd_f2x2_conv3x3_is_the_3x3_conv_and_the_arm_keeps_the_unet_output():
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 4, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)
    direct = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = common.winograd_f2x2_conv3x3(x, kernel, jnp.float32)
    np.testing.assert_allclose(y, direct(x, kernel), rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    ours = jax.vjp(lambda x, k: common.winograd_f2x2_conv3x3(x, k, jnp.float32), x, kernel)[1](cotangent)
    for a, b in zip(ours, jax.vjp(direct, x, kernel)[1](cotangent)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    bf16 = common.winograd_f2x2_conv3x3(x, kernel, jnp.bfloat16)  # float32 sums: no cancelled outputs
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), y, rtol=0.05, atol=0.1)
    with pytest.raises(ValueError, match="H=3 and W=4 must be even"):
        common.winograd_f2x2_conv3x3(jnp.zeros((1, 3, 4, 5)), kernel, jnp.float32)
    # The arm: the 8x8 and 4x4 stride-1 convs become dots (the strided one and the sub-pixel ones
    # stay convolutions); the U-Net's output is unchanged.
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    compiled = lambda: jax.jit(lambda p: model.apply({"params": p}, x, t, train=False)).lower(params).compile()
    with common.VARIANTS["winograd_2d"]():
        winograd = compiled()
    plain = compiled()
    assert winograd.as_text().count(" convolution(") == 1 + 4  # the downsampling conv, 4 sub-pixel phases
    assert plain.as_text().count(" convolution(") > 5
    np.testing.assert_allclose(winograd(params), plain(params), rtol=1e-5, atol=1e-5)


def test_optax_clip_arm_swaps_the_clip_only_inside_the_block():
    from ddm import train

    grads, params = {"w": jnp.array([30.0, 40.0])}, {"w": jnp.zeros(2)}
    jaxpr = lambda: str(jax.make_jaxpr(lambda g: train.make_optimizer(1e-3, 0, 1.0).update(g, state, params))(grads))
    state = train.make_optimizer(1e-3, 0, 1.0).init(params)
    clip_select = "f32[2] = select_n"  # optax: a per-element select of g or g / norm * max_norm
    with common.VARIANTS["optax_clip"]():
        assert clip_select in jaxpr() and "min 1.0" not in jaxpr()
    assert clip_select not in jaxpr() and "f32[] = min 1.0" in jaxpr()  # ddm: g * min(1, max_norm / norm)


def test_dense_4d_arm_swaps_the_dense_contraction_only_inside_the_block():
    from ddm import unet

    x = jnp.ones((2, 4, 4, 8))
    jaxpr = lambda: str(jax.make_jaxpr(lambda x: unet._dense(3, jnp.float32).init_with_output(jax.random.key(0), x)[0])(x))
    with common.VARIANTS["dense_4d"]():
        assert "f32[2,4,4,3] = dot_general" in jaxpr()  # the 4-D contraction
    assert "f32[32,3] = dot_general" in jaxpr()  # ddm: (B*H*W, C) x (C, F)


def test_variant_ab_xla_options_become_named_arms_and_bad_specs_name_themselves():
    variant_ab = _benchmark_script("variant_ab")
    parsed = variant_ab.parse_xla_options(['off={"xla_gpu_enable_command_buffer": ""}', 'lvl={"a": 2, "b": true}'],
                                          ["ddm"])
    assert parsed == {"off": {"xla_gpu_enable_command_buffer": ""}, "lvl": {"a": 2, "b": True}}
    for spec, says in [("off", "is not NAME=JSON"), ('ddm={"a": 1}', "is taken"), ("x={a: 1}", "not JSON"),
                       ("x={}", "non-empty JSON object"), ("x=[1]", "non-empty JSON object")]:
        with pytest.raises(ValueError, match=re.escape(repr(spec)) + ".*" + says):
            variant_ab.parse_xla_options([spec], ["ddm"])


def test_compiler_options_reach_xla_and_an_unknown_one_is_an_error():
    # what variant_ab's --xla_options arms rely on: the options go to XLA, which rejects what it does not know
    lowered = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(4))
    assert lowered.compile(compiler_options={"xla_cpu_enable_fast_math": False})(jnp.ones(4)).shape == (4,)
    with pytest.raises(Exception, match="xla_no_such_option"):
        lowered.compile(compiler_options={"xla_no_such_option": 1})


def test_gpu_check_ratio_lines_pair_ours_with_the_peer_per_dtype():
    gpu_check = _benchmark_script("gpu_check")
    rows = [{"what": "train step, batch 128", "dtype": "bfloat16", "steps_per_s": 44.0},
            {"what": "DDIM 50 steps, batch 2000", "dtype": "bfloat16", "samples_per_s": 550.0},
            {"what": "train step, batch 128", "dtype": "float32", "steps_per_s": 26.0},
            {"what": "PEER diffusers train step, batch 128", "dtype": "bfloat16", "steps_per_s": 11.0},
            {"what": "PEER diffusers one DDIM step, batch 2000", "dtype": "bfloat16",
             "samples_per_s_for_ddim_steps": 220.0}]
    assert gpu_check.ratio_lines(rows) == ["", "ours / peer, train steps/s, bfloat16: 4.00x",
                                           "ours / peer, DDIM samples/s, bfloat16: 2.50x"]
    assert gpu_check.ratio_lines(rows[:3]) == []  # no peer, no ratio


def test_gpu_session_starts_no_stage_without_the_time_it_needs(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(_PATH), "gpu_session.sh")
    done = subprocess.run(["bash", script, str(tmp_path), "0"], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("candidates", "attention_check", "attention", "profile", "calibrate", "gpu_check", "iddpm",
                  "ablations", "largest_batch", "xla"):
        assert f"skipped {stage}: " in summary
    assert f"jax {jax.__version__}" in summary and "total " in summary
    assert not list(tmp_path.glob("*.log"))
    chosen = tmp_path / "chosen"
    done = subprocess.run(["bash", script, str(chosen), "0"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "STAGES": "profile,xla"})
    assert done.returncode == 0, done.stderr
    summary = (chosen / "summary.txt").read_text()
    for stage in ("candidates", "attention_check", "attention", "calibrate", "gpu_check", "iddpm", "ablations",
                  "largest_batch"):
        assert f"not chosen: {stage} (STAGES=profile,xla)" in summary and f"skipped {stage}" not in summary
    assert "skipped profile: " in summary and "skipped xla: " in summary


def test_scaling_device_memory_is_the_allocator_limit_and_a_cpu_is_told_to_give_gib():
    scaling = _benchmark_script("scaling")

    class Device:
        device_kind = "NVIDIA H100 80GB HBM3"

        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    assert scaling.device_memory_bytes(Device({"bytes_limit": 64 * 2 ** 30, "bytes_in_use": 0})) == 64 * 2 ** 30
    with pytest.raises(ValueError, match=r"reports no memory limit \(memory_stats: None\); give the budget in GiB"):
        scaling.device_memory_bytes(Device(None))


def test_train_call_pipelined_runs_each_call_on_the_last_ones_state():
    call = common.TrainCall("digits", "float32", 2, 1).ready()
    step = int(jax.device_get(call.state.step)[0])
    seconds = call.pipelined_s(3)
    assert seconds > 0 and int(jax.device_get(call.state.step)[0]) == step + 3


def _primitive_count(primitive, fn, *args):
    """How many equations of fn's jaxpr, nested jaxprs included, apply ``primitive`` (traced anew:
    a new function, so no trace is reused from before a swap)."""
    return len(re.findall(rf" = {primitive}\b", str(jax.make_jaxpr(lambda *a: fn(*a))(*args))))


@pytest.mark.parametrize("ablation, primitive", [
    ("without_attention", "reduce_max"),  # the softmax's max (nothing else in the U-Net takes one)
    ("without_group_norm", "rsqrt"),  # GroupNorm's 1 / std
    ("without_swish", "logistic"),  # swish = x * sigmoid(x)
    ("without_dropout", "shift_right_logical"),  # the dropout mask's hash
])
def test_ablation_arms_take_their_piece_out_only_inside_the_block(ablation, primitive):
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    apply = lambda p: model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
    with common.VARIANTS[ablation]():
        ablated_count, ablated = _primitive_count(primitive, apply, params), apply(params)
    assert ablated_count == 0 and _primitive_count(primitive, apply, params) > 0
    assert ablated.shape == apply(params).shape and bool(jnp.all(jnp.isfinite(ablated)))
    assert not jnp.array_equal(ablated, apply(params))  # a different model


def test_tanh_swish_arm_is_the_same_function_through_tanh_only_inside_the_block():
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    apply = lambda p: model.apply({"params": p}, x, t, train=False)
    # New functions each time, so that jit traces them anew (inside or outside the block).
    output_and_grads = lambda: (jax.jit(lambda p: apply(p))(params),
                                jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(params))
    with common.VARIANTS["tanh_swish"]():
        counts = _primitive_count("tanh", apply, params), _primitive_count("logistic", apply, params)
        out, grads = output_and_grads()
    assert counts[0] > 0 and counts[1] == 0
    assert _primitive_count("tanh", apply, params) == 0 and _primitive_count("logistic", apply, params) > 0
    ref, ref_grads = output_and_grads()
    np.testing.assert_allclose(out, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-4 * float(jnp.max(jnp.abs(r))) + 1e-7)


def test_without_ema_arm_leaves_the_ema_parameters_as_they_are_only_inside_the_block():
    import numpy as np

    from ddm import train

    params, ema = {"w": jnp.ones(3)}, {train.ema_key(0.9): {"w": jnp.zeros(3)}}
    step = lambda: train.update_ema(ema, params, (0.9,))
    with common.VARIANTS["without_ema"]():
        np.testing.assert_array_equal(step()[train.ema_key(0.9)]["w"], 0.0)
    np.testing.assert_allclose(step()[train.ema_key(0.9)]["w"], 0.1, rtol=1e-6)


def test_ablation_lines_give_what_each_removed_piece_costs_per_step():
    variant_ab = _benchmark_script("variant_ab")
    names = ["ddm", "dense_4d", "without_swish", "without_ema"]
    # seconds per call of 2 steps, 3 rounds: ddm 1.0 s, without_swish 0.9 s, without_ema 0.98 s
    times = [[1.0, 1.2, 1.0], [1.1, 1.1, 1.1], [0.9, 1.1, 0.9], [0.98, 0.98, 0.98]]
    lines = variant_ab.ablation_lines(names, times, per_call=2)
    assert len(lines) == 2  # dense_4d is an alternative, not an ablation
    assert lines[0] == ("  without_swish: the piece costs 50.0 ms per step (10.0% of ddm's 500.0 ms; "
                        "per-round median 50.0 ms)")
    assert lines[1].startswith("  without_ema: the piece costs 10.0 ms per step (2.0% of ddm's 500.0 ms;")
    assert lines[1].endswith("per-round median 10.0 ms)")


def test_host_cpu_names_the_cpu_and_its_widest_vector_isa(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n\n"
                       "processor\t: 1\nmodel name\t: another\n")
    assert common.host_cpu(str(cpuinfo)) == "AMD EPYC, family 26, model 2, AVX-512"
    cpuinfo.write_text("model name\t: Old Xeon\nflags\t\t: fpu sse2 avx avx2\n")
    assert common.host_cpu(str(cpuinfo)) == "Old Xeon, family ?, model ?, AVX2"
    assert common.host_cpu(str(tmp_path / "missing")) == "unknown CPU"


def test_cpu_host_ab_ratio_is_of_the_overall_medians_then_the_per_round_median():
    host_ab = _benchmark_script("cpu_host_ab")
    results = {"before": [[1.0, 1.2], [1.1, 1.3]], "after": [[0.5, 0.6], [1.1, 1.3]]}
    # overall: median(1.0, 1.2, 1.1, 1.3) / median(0.5, 0.6, 1.1, 1.3) = 1.15 / 0.85; per round: 2.0 and 1.0
    assert host_ab.ratio_text(results, "before", "after") == "1.353x (1.500x)"


_GPU_HLO = """HloModule train, entry_computation_layout={(f32[100]{0})->f32[10]{0}}

%fused_update (param_0: f32[100], param_1: f32[10]) -> f32[10] {
  %param_0 = f32[100]{0} parameter(0)
  %constant_1 = f32[] constant(2)
  %broadcast_1 = f32[100]{0} broadcast(%constant_1), dimensions={}
  %multiply_1 = f32[100]{0} multiply(%param_0, %broadcast_1)
  %slice_1 = f32[10]{0} slice(%multiply_1), slice={[20:30]}
  %param_1 = f32[10]{0} parameter(1)
  ROOT %add_1 = f32[10]{0} add(%slice_1, %param_1)
}

%fused_reduce (param_0.1: bf16[8,4,4,16]) -> f32[16] {
  %param_0.1 = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %convert_2 = f32[8,4,4,16]{3,2,1,0} convert(%param_0.1)
  %constant_2 = f32[] constant(0)
  ROOT %reduce_2 = f32[16]{0} reduce(%convert_2, %constant_2), dimensions={0,1,2}, to_apply=%add
}

%gemm_fusion_dot.1_computation (parameter_0: bf16[16,32], parameter_1: bf16[32,8]) -> f32[16,8] {
  %parameter_0 = bf16[16,32]{1,0} parameter(0)
  %parameter_1 = bf16[32,8]{1,0} parameter(1)
  ROOT %dot_3 = f32[16,8]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.1 (p0: f32[100], p1: f32[10], x: bf16[8,4,4,16], w: bf16[16,3,3,16], a: bf16[16,32], b: bf16[32,8]) -> f32[10] {
  %p0 = f32[100]{0} parameter(0), metadata={op_name="flat_args[0]"}
  %p1 = f32[10]{0} parameter(1)
  %x = bf16[8,4,4,16]{3,2,1,0} parameter(2)
  %w = bf16[16,3,3,16]{3,2,1,0} parameter(3)
  %a = bf16[16,32]{1,0} parameter(4)
  %b = bf16[32,8]{1,0} parameter(5)
  %loop_add_fusion = f32[10]{0} fusion(%p0, %p1), kind=kLoop, calls=%fused_update, metadata={op_name="jit(_fun)/add"}
  %cudnn-conv.1 = (bf16[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(_fun)/jvp(UNet)/down_0_block_0/conv1/conv_general_dilated"}
  %get-tuple-element.1 = bf16[8,4,4,16]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %input_reduce_fusion = f32[16]{0} fusion(%get-tuple-element.1), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(_fun)/transpose(jvp(UNet))/up_1_block_1/norm2/reduce_sum"}
  %gemm_fusion_dot.1 = f32[16,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %copy.1 = f32[100]{0} copy(%p0)
  ROOT %tuple.1 = (f32[10]{0}, f32[100]{0}) tuple(%loop_add_fusion, %copy.1)
}
"""


def test_gpu_hlo_census_counts_each_kernel_with_what_it_reads_and_writes():
    gpu_hlo = _benchmark_script("gpu_hlo")
    kernels = {k.name: k for k in gpu_hlo.census(_GPU_HLO)}
    assert sorted(kernels) == ["copy.1", "cudnn-conv.1", "gemm_fusion_dot.1", "input_reduce_fusion",
                               "loop_add_fusion"]  # parameters, tuples and get-tuple-elements are no kernels
    conv, image = kernels["cudnn-conv.1"], 8 * 4 * 4 * 16 * 2
    assert (conv.kind, conv.part, conv.bytes) == ("conv forward", "forward conv1", image + (image + 16 * 9 * 16 * 2))
    # The update computes 10 of the 100 elements it multiplies (a slice of them): it reads 10 of p0's.
    update = kernels["loop_add_fusion"]
    assert (update.kind, update.part, update.bytes) == ("loop fusion", "rest add", 40 + 40 + 40)
    norm = kernels["input_reduce_fusion"]
    assert (norm.kind, norm.part, norm.bytes) == ("reduce fusion", "backward norm2", image + 64)
    gemm = kernels["gemm_fusion_dot.1"]
    assert (gemm.kind, gemm.part, gemm.bytes) == ("gemm", "rest", 16 * 32 * 2 + 32 * 8 * 2 + 16 * 8 * 4)
    assert (kernels["copy.1"].kind, kernels["copy.1"].bytes) == ("copy", 800)
    assert gpu_hlo.totals(kernels.values(), lambda k: k.part.split()[0])["rest"] == (3, 120 + 2048 + 800)


def test_gpu_hlo_lower_bound_is_matmul_flops_or_bytes_plus_the_other_bytes():
    gpu_hlo = _benchmark_script("gpu_hlo")
    K = gpu_hlo.Kernel
    kernels = [K("c", "conv forward", "forward conv1", 2e9, ""), K("g", "gemm", "forward q", 1e9, ""),
               K("n", "reduce fusion", "forward norm1", 4e9, ""), K("u", "loop fusion", "rest add", 2e9, "")]
    # 6 GB of other kernels at 2 TB/s (3 ms), then the matmuls: 1 TFLOP at 1 PFLOP/s (1 ms) or their
    # 3 GB at 2 TB/s (1.5 ms), whichever is longer.
    assert gpu_hlo.lower_bound_s(kernels, 1e12, 1e15, 2e12) == pytest.approx(3e-3 + 1.5e-3)
    assert gpu_hlo.lower_bound_s(kernels, 4e12, 1e15, 2e12) == pytest.approx(3e-3 + 4e-3)


def test_gpu_hlo_counts_cudnn_attention_as_a_matmul_kernel():
    gpu_hlo = _benchmark_script("gpu_hlo")
    for target in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"):
        line = (f'%fmha = (bf16[2,1,16,64]{{3,1,2,0}}, u8[0]{{0}}) custom-call(%q, %k, %v), '
                f'custom_call_target="{target}"')
        instruction = gpu_hlo._instruction(line)
        assert gpu_hlo.kernel_kind(instruction) == "fused attention" in gpu_hlo.MATMUL_KINDS


def test_gpu_hlo_compiles_the_sampling_step_for_the_device_it_is_given():
    import types

    gpu_hlo = _benchmark_script("gpu_hlo")
    args = types.SimpleNamespace(step="sample", config="digits", dtype="float32", batch=2)
    text, call = gpu_hlo.step_hlo(args, "ddm", jax.devices("cpu"))
    kernels = gpu_hlo.census(text)
    assert (call.method, call.steps, call.x_shape) == ("ddim", 50, (2, 8, 8, 1))  # digits: 8x8, 1 channel
    assert any(k.kind == "convolution" for k in kernels) and not any(k.part.startswith("backward") for k in kernels)


def test_attention_check_measures_the_difference_of_the_two_implementations(monkeypatch):
    import ddm.unet as unet

    check = _benchmark_script("attention_check")
    jax_attention = jax.nn.dot_product_attention  # cuDNN needs a GPU: XLA's stands in, then a perturbed one
    monkeypatch.setattr(unet.jax.nn, "dot_product_attention",
                        lambda *a, implementation=None: jax_attention(*a, implementation="xla"))
    errors = check.relative_errors(1, 4, 64, 2)
    assert sorted(errors) == ["dk", "dq", "dv", "forward"] and max(errors.values()) < 0.02
    monkeypatch.setattr(unet.jax.nn, "dot_product_attention",
                        lambda *a, implementation=None: 1.1 * jax_attention(*a, implementation="xla"))
    assert check.relative_errors(1, 4, 64, 2)["forward"] == pytest.approx(0.1, rel=0.1)


def test_gpu_hlo_answers_jax_cudnn_checks_for_the_compile_only_device():
    from jax._src.cudnn import fused_attention_stablehlo as fused

    gpu_hlo = _benchmark_script("gpu_hlo")
    check = fused.check_compute_capability
    hopper = type("Device", (), {"compute_capability": "9.0"})()
    with gpu_hlo._compute_capability(hopper):
        assert fused.check_compute_capability("9.0") and fused.check_compute_capability("8.0")
        assert not fused.check_compute_capability("10.0")
    assert fused.check_compute_capability is check
    with gpu_hlo._compute_capability(jax.devices("cpu")[0]):  # not a GPU: nothing to answer
        assert fused.check_compute_capability is check


def test_cudnn_attention_arm_swaps_the_attention_only_inside_the_block(monkeypatch):
    import ddm.unet as unet

    calls, jax_attention = [], jax.nn.dot_product_attention

    def dot_product_attention(q, k, v, implementation=None):  # cuDNN needs a GPU: XLA's stands in
        calls.append(implementation)
        return jax_attention(q, k, v, implementation="xla")

    monkeypatch.setattr(unet.jax.nn, "dot_product_attention", dot_product_attention)
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_heads=2)
    params = common.random_params(model, (8, 8, 3))
    x, t = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)), jnp.array([3, 500])
    with common.VARIANTS["cudnn_attention"]():
        arm_out = model.apply({"params": params}, x, t, train=False)
    assert calls == ["cudnn"] * 4  # at 4x4: one down the U-Net, the middle, two up
    ddm_out = model.apply({"params": params}, x, t, train=False)
    assert len(calls) == 4 and float(jnp.abs(ddm_out).mean()) > 1e-2
    assert jnp.allclose(arm_out, ddm_out, rtol=1e-5, atol=1e-5)


def test_gpu_hlo_target_config_carries_the_spec_and_an_entry_is_required():
    gpu_hlo = _benchmark_script("gpu_hlo")
    text = gpu_hlo.target_config(gpu_hlo.H100_SXM)
    for field in ("core_count: 132", "memory_bandwidth: 3350000000000", "major: 9 minor: 0",
                  'device_description_str: "NVIDIA H100 80GB HBM3"', 'platform_name: "CUDA"'):
        assert field in text
    with pytest.raises(ValueError, match="no ENTRY"):
        gpu_hlo.census("HloModule empty\n")


def test_gpu_hlo_census_counts_a_while_body_once_per_iteration():
    gpu_hlo = _benchmark_script("gpu_hlo")
    loop = """HloModule k_steps

%body (state: (s32[], f32[100])) -> (s32[], f32[100]) {
  %state = (s32[], f32[100]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[100]{0} get-tuple-element(%state), index=1
  %copy.2 = f32[100]{0} copy(%x)
  ROOT %next = (s32[], f32[100]{0}) tuple(%i, %copy.2)
}

%cond (state.1: (s32[], f32[100])) -> pred[] {
  %state.1 = (s32[], f32[100]{0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main.2 (p: (s32[], f32[100])) -> (s32[], f32[100]) {
  %p = (s32[], f32[100]{0}) parameter(0)
  ROOT %while.1 = (s32[], f32[100]{0}) while(%p), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""
    kernels = gpu_hlo.census(loop)
    assert [(k.name, k.kind, k.bytes) for k in kernels] == [("copy.2", "copy", 800)] * 4
    with pytest.raises(ValueError, match="no known trip count"):
        gpu_hlo.census(loop.replace(', backend_config={"known_trip_count":{"n":"4"}}', ""))


def test_gpu_hlo_fits_measured_kernel_times_to_bytes_and_a_cost_per_kernel():
    gpu_hlo = _benchmark_script("gpu_hlo")
    K = gpu_hlo.Kernel
    kernels = [K("loop_add_fusion.1", "loop fusion", "rest add", 1e6, ""),
               K("input_reduce_fusion.2", "reduce fusion", "forward norm1", 4e6, ""),
               K("copy.3", "copy", "rest", 9e6, ""), K("copy.3", "copy", "rest", 9e6, ""),  # a loop body's, twice
               K("cudnn-conv.4", "conv forward", "forward conv1", 5e7, ""),
               K("loop_multiply_fusion.5", "loop fusion", "forward silu", 2e6, "")]  # not in the trace
    # 2 calls; each kernel takes bytes / (2 TB/s) + 3 us, the conv 40 us; the GPU trace's names use "_"
    per_call = {"loop_add_fusion_1": 1e6 / 2e12 + 3e-6, "input_reduce_fusion.2": 4e6 / 2e12 + 3e-6,
                "copy_3": 2 * (9e6 / 2e12 + 3e-6), "cudnn-conv.4": 40e-6}
    ops = {name: [t * 1e6 * 2, "what"] for name, t in per_call.items()}
    times = gpu_hlo.measured_times(kernels, ops, calls=2)
    assert set(times) == {"loop_add_fusion.1", "input_reduce_fusion.2", "copy.3", "cudnn-conv.4"}
    assert times["copy.3"] == pytest.approx(per_call["copy_3"])
    a, b, r2 = gpu_hlo.fit_kernel_time(kernels, times)
    assert (1 / a, b, r2) == (pytest.approx(2e12), pytest.approx(3e-6), pytest.approx(1.0))
    lines = []
    gpu_hlo.report_times(kernels, times, lines=lines.append)
    assert lines[0].startswith("  measured: 4 of 5 kernels found in the trace")
    assert "t = bytes / (2.00 TB/s) + 3.00 us per kernel (R^2 1.00)" in lines[-1]


def test_flat_norm_and_leaf_norms_arms_take_the_same_norm_only_inside_the_block():
    from ddm import train

    large = train.NORM_CONCAT_MAX_SIZE + 1
    grads = {"w": jnp.full((large,), 0.5), "v": jnp.full((large,), 0.5), "b": jnp.array([3.0, 4.0]),
             "c": jnp.zeros((2, 2))}

    def update(g):  # a function of its own per call: jax caches a function's trace
        optimizer = train.make_optimizer(1e-3, 0, 1.0)
        return optimizer.update(g, optimizer.init(g), g)[0]

    def norms(arm):
        with common.VARIANTS[arm]():
            jaxpr = str(jax.make_jaxpr(lambda g: update(g))(grads))
            return train.global_norm(grads), jaxpr.count("concatenate"), jaxpr.count("reduce_sum"), update(grads)

    want = float(jnp.sqrt(2 * 0.25 * large + 25.0))
    ours, flat, leaves = norms("ddm"), norms("flat_norm"), norms("leaf_norms")
    assert flat[1:3] == (1, 1) and leaves[1:3] == (0, 4)  # the clip's norm: one reduction, one per leaf
    for norm, _, _, clipped in (ours, flat, leaves):
        assert norm == pytest.approx(want, rel=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(clipped), jax.tree_util.tree_leaves(ours[3])):
            np.testing.assert_allclose(a, b, rtol=1e-6)  # the same clipped Adam update


def _group_norm_vjp_case():
    """(x, scale, dy, make_vjp) for GroupNorm's gradient at 8x8x64: make_vjp() is a new jitted function
    each call (jax caches a function's trace, so each arm needs one of its own)."""
    import ddm.unet as unet

    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.normal(size=(4, 8, 8, 64)), jnp.float32) for _ in range(2))
    scale = jnp.asarray(rng.normal(1.0, 0.3, 64), jnp.float32)
    make_vjp = lambda: jax.jit(lambda x, s, dy: jax.vjp(lambda x, s: unet.group_norm(x, s, s, 32, 1e-6), x, s)[1](dy))
    return x, scale, dy, make_vjp


def test_folded_norm_grads_arm_lets_xla_fold_the_norm_gradients_only_inside_the_block(monkeypatch):
    import ddm.unet as unet

    x, scale, dy, vjp = _group_norm_vjp_case()

    def barrier_on_gpu():
        return "optimization_barrier" in jax.export.export(vjp(), platforms=["cuda"])(x, scale, dy).mlir_module()

    with common.VARIANTS["folded_norm_grads"]():
        assert not barrier_on_gpu()
        folded = vjp()(x, scale, dy)
    assert barrier_on_gpu()
    monkeypatch.setattr(unet, "_scale_bias_grads", unet._stacked_batch_sums)  # ddm's branch off CPU, run here
    for a, b in zip(folded, vjp()(x, scale, dy)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_reduced_group_sums_arm_reduces_the_groups_on_gpu_only_inside_the_block(monkeypatch):
    import ddm.unet as unet

    x, scale, dy, vjp = _group_norm_vjp_case()

    def reductions_on_gpu():
        return jax.export.export(vjp(), platforms=["cuda"])(x, scale, dy).mlir_module().count("stablehlo.reduce")

    with common.VARIANTS["reduced_group_sums"]():
        reduced = reductions_on_gpu()
        with_reductions = vjp()(x, scale, dy)
    # ddm's: 4 group sums as adds (2 moments forward, 2 sums backward), the 2 batch sums as 1
    assert reduced - reductions_on_gpu() == 5
    monkeypatch.setattr(unet, "_sum_by_reduction", unet._sum_by_adds)  # ddm's branch on a GPU, run here
    monkeypatch.setattr(unet, "_scale_bias_grads", unet._stacked_batch_sums)
    for a, b in zip(with_reductions, vjp()(x, scale, dy)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_flat_optimizer_arm_runs_the_same_update_on_one_vector_only_inside_the_block():
    from ddm import experiment, train

    config = common.load_config("cifar10_linear")
    grads = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([3.0, 4.0])}
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(2)}

    def update():  # clip and Adam as experiment builds them, and the step's grad_norm metric
        optimizer = experiment.build_optimizer(config)
        state = optimizer.init(params)
        metric_jaxpr = str(jax.make_jaxpr(lambda g: train.global_norm(g))(grads))
        return optimizer.update(grads, state, params)[0], state, train.global_norm(grads), metric_jaxpr

    with common.VARIANTS["flat_optimizer"]():
        flat_updates, flat_state, flat_metric, flat_jaxpr = update()
    updates, state, metric, jaxpr = update()
    moments = lambda s: [leaf.shape for leaf in jax.tree_util.tree_leaves(s) if leaf.ndim]
    assert moments(flat_state) == [(8,), (8,)] and moments(state) == [(2,), (2, 3)] * 2
    assert flat_jaxpr.count("reduce_sum") == 1 and "platform_index" in jaxpr  # the metric: flat_norm's one reduction
    assert flat_metric == pytest.approx(float(metric))
    for a, b in zip(jax.tree_util.tree_leaves(flat_updates), jax.tree_util.tree_leaves(updates)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_largest_batch_bisects_to_the_granularity_on_the_device_it_is_given(monkeypatch):
    scaling = _benchmark_script("scaling")
    compiled_for = []

    class FakeTrainCall:  # a train call whose compiled peak is 1 MB per image plus 5 MB
        def __init__(self, config, dtype_name, batch, k, devices, **overrides):
            compiled_for.append(devices)
            self.batch = batch

        def compile(self):
            return self.batch

    monkeypatch.setattr(scaling.common, "TrainCall", FakeTrainCall)
    monkeypatch.setattr(scaling.common, "peak_bytes", lambda batch: {"peak": 10 ** 6 * batch + 5 * 10 ** 6})
    fits, fails, probes = scaling.largest_batch("cifar10_linear", "bfloat16", 10 ** 9, {}, max_compiles=12,
                                                device="the device")
    assert (fits, fails) == (992, 1000)  # 995 images fit 1 GB; the granularity is 8
    assert all(10 ** 6 * b + 5 * 10 ** 6 <= 10 ** 9 for b, _ in probes if b <= fits)
    assert compiled_for and all(devices == ["the device"] for devices in compiled_for)


def test_concat_skip_arm_concatenates_for_the_shortcut_and_keeps_the_unet_output():
    from ddm import unet

    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)), jnp.array([3, 700])
    params = common.random_params(model, (16, 16, 3))
    forward = lambda p: model.apply({"params": p}, x, t, train=False)
    dots = lambda: str(jax.make_jaxpr(lambda p: forward(p))(params)).count("dot_general")  # a new trace
    ours, ours_dots = forward(params), dots()
    with common.VARIANTS["concat_skip"]():
        assert unet.NinShortcut is common.ConcatNinShortcut
        theirs, their_dots = forward(params), dots()  # the same parameters fit both
    assert unet.NinShortcut is not common.ConcatNinShortcut
    # each up-path block with a channel change: one matmul per part (2) against one of the concatenation
    assert ours_dots - their_dots == sum(1 for name in params if name.startswith("up_") and
                                         "nin_shortcut" in params[name])
    assert jnp.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gpu_hlo_fit_needs_kernels_of_two_sizes():
    gpu_hlo = _benchmark_script("gpu_hlo")
    kernels = [gpu_hlo.Kernel("copy.1", "copy", "rest", 100, ""), gpu_hlo.Kernel("copy.2", "copy", "rest", 100, "")]
    with pytest.raises(ValueError, match="2 measured kernels of 1 sizes"):
        gpu_hlo.fit_kernel_time(kernels, {"copy.1": 1e-6, "copy.2": 2e-6})
