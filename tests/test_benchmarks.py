"""The hand FLOP count of benchmarks/common.py against XLA's cost analysis, on tiny U-Nets (no timing)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
from ddm.unet import UNet

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "common.py")
_spec = importlib.util.spec_from_file_location("benchmarks_common", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _cost(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_hand_flops_match_xla_cost_analysis():
    # Two levels (a downsample, an upsample, channel changes with NIN shortcuts), attention at 8x8
    # and in the middle, a learned-variance output.
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, out_channels=6)
    shape, batch = (16, 16, 3), 2
    x, t = jnp.zeros((batch,) + shape), jnp.zeros((batch,), jnp.int32)
    params = common.random_params(model, shape)
    forward = lambda p, x, t: model.apply({"params": p}, x, t, train=False)
    grad = jax.grad(lambda p, x, t: jnp.sum(forward(p, x, t) ** 2))
    hand = common.hand_flops(model, shape, batch)
    # XLA also counts the elementwise work the hand count leaves out: a little above, never below.
    assert 1.0 <= _cost(forward, params, x, t) / hand["forward"] < 1.04
    assert 1.0 <= _cost(grad, params, x, t) / hand["train"] < 1.04


def test_hand_flops_ddpm_cifar10():
    # DDPM's CIFAR-10 U-Net: ~6.2 GMACs per 32x32 image counting the padding taps (the figure
    # usually quoted), fewer without them; the forward scales linearly with the batch.
    model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    padded = common.hand_flops(model, (32, 32, 3), 1, count_padding=True)
    exact = common.hand_flops(model, (32, 32, 3), 1)
    assert 12.3e9 < padded["forward"] < 12.6e9
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
    # kernel of the parameter tree (each conv module runs once), with the same kernel shapes,
    # and the XLA and PyTorch sides compute the same convolution.
    import collections

    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("conv_floor", os.path.join(os.path.dirname(_PATH), "conv_floor.py"))
    conv_floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv_floor)
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    convs = conv_floor.unet_convs(model, (16, 16, 3), 2)
    kernels = [p.shape for p in jax.tree_util.tree_leaves(common.random_params(model, (16, 16, 3))) if p.ndim == 4]
    uses_by_kernel = collections.Counter()
    for conv, uses in convs.items():
        uses_by_kernel[conv.kernel_shape] += uses
    assert collections.Counter(kernels) == uses_by_kernel
    # conv_in, 2 per res block (1 + 1 down, 2 middle, 2 + 2 up), the down- and upsampling convs, conv_out
    assert sum(convs.values()) == len(kernels) == 1 + 2 * 8 + 2 + 1
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
