"""How much of the train and sampling steps the convolutions alone take, in XLA and in PyTorch, and so
how fast the whole step could at best be against the peer: every 3x3 / strided convolution of the
config's U-Net timed on its own (forward; forward + both gradients for the train step), summed
over the network, next to the full steps of ddm and diffusers, all in one run.

    python benchmarks/conv_floor.py [--config cifar10_linear] [--batch 8] [--rounds 5] [--skip_steps]

The convolutions are read from the jaxpr of the U-Net's forward (shapes, kernel, strides, padding),
as the model defines them, and timed as XLA's direct convolutions: ddm's sampling step runs the
float32 stride-1 3x3 ones of 16 pixels and wider as Winograd F(4, 3) on CPU
(``ddm.unet.winograd_conv3x3``), which can take it under this floor; its train step runs these.
XLA runs all of them in one jitted program (each use on its own input); PyTorch runs
``F.conv2d`` on each in turn (NCHW, as diffusers runs it; symmetric padding 1); the two sides are interleaved over --rounds rounds, median per call. The table above the
totals times each distinct convolution on its own, to show where either side is faster. The
input gradient of the first convolution (the noisy image) is computed too although neither
train step needs it. "conv floor" is the time of all the convolutions; "rest" is the full step
minus it (norms, activations, attention, dense layers, loss, optimizer and EMA). "best ratio" is
the peer's full step over ddm's conv floor: the ratio ddm would reach if everything but its
convolutions took no time.
"""
import argparse
import collections
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

Conv = collections.namedtuple("Conv", "x_shape kernel_shape strides padding")


def _subjaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def unet_convs(model, image_shape, batch):
    """Counter of the U-Net forward's convolutions, Conv(x NHWC, kernel HWIO, strides, padding), as the
    model defines them (traced under ``common.direct_convs``: not the 3x1 convs of ddm's CPU Winograd)."""
    x = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda: common.random_params(model, image_shape))
    with common.direct_convs():
        jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply({"params": p}, x, t, train=False))(params, x, t).jaxpr
    convs = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                convs[Conv(lhs, rhs, tuple(eqn.params["window_strides"]), tuple(eqn.params["padding"]))] += 1
            for value in eqn.params.values():
                for sub in _subjaxprs(value):
                    walk(sub)

    walk(jaxpr)
    return convs


def _conv_fn(conv):
    return lambda x, w: jax.lax.conv_general_dilated(x, w, conv.strides, conv.padding,
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))


class XlaConvs:
    """The given convolutions (Conv: uses) in one jitted XLA program, each use on its own input (so
    that XLA cannot merge them); ``train`` adds the input and kernel gradients of each."""

    def __init__(self, convs, train):
        rng = np.random.default_rng(0)
        normal = lambda shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
        self.inputs, fns = [], []
        for conv, uses in convs.items():
            f = _conv_fn(conv)
            y_shape = jax.eval_shape(f, jax.ShapeDtypeStruct(conv.x_shape, jnp.float32),
                                     jax.ShapeDtypeStruct(conv.kernel_shape, jnp.float32)).shape
            for _ in range(uses):
                self.inputs.append((normal(conv.x_shape), normal(conv.kernel_shape, 0.05), normal(y_shape)))
                fns.append(f)

        def run(inputs):
            outputs = []
            for f, (x, w, dy) in zip(fns, inputs):
                if train:
                    y, vjp = jax.vjp(f, x, w)
                    outputs.append((y, vjp(dy)))
                else:
                    outputs.append(f(x, w))
            return outputs

        self.fn = jax.jit(run)
        self()

    def __call__(self):
        jax.block_until_ready(self.fn(self.inputs))


class TorchConvs:
    """The same convolutions as PyTorch's F.conv2d (NCHW), one after another: padded as in XLA where
    the padding is the same on both sides of an axis or the stride is 1 (the sub-pixel convs of the
    upsampling pad one side, so PyTorch pads them first with F.pad); stride 2 pads 1 on both sides,
    diffusers' way."""

    def __init__(self, convs, train):
        import torch

        self.torch, self.train, self.calls = torch, train, []
        for conv, uses in convs.items():
            b, h, w, c = conv.x_shape
            k, _, _, o = conv.kernel_shape
            (top, bottom), (left, right) = conv.padding
            one_sided = conv.strides == (1, 1) and (top, left) != (bottom, right)
            for _ in range(uses):
                x = torch.randn(b, c, h, w, requires_grad=train)
                weight = (torch.randn(o, c, k, k) * 0.05).requires_grad_(train)
                if one_sided:
                    forward = functools.partial(_padded_conv2d, x, weight, (left, right, top, bottom))
                else:
                    forward = functools.partial(torch.nn.functional.conv2d, x, weight, stride=conv.strides[0],
                                                padding=k // 2)
                self.calls.append((forward, x, weight, torch.randn_like(forward()) if train else None))
        self()

    def __call__(self):
        if not self.train:
            with self.torch.inference_mode():
                for forward, *_ in self.calls:
                    forward()
            return
        for forward, x, weight, dy in self.calls:
            x.grad = weight.grad = None
            forward().backward(dy)


def _padded_conv2d(x, weight, pads):
    import torch

    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, pads), weight)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip_steps", action="store_true", help="only the convolutions, not the full steps")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    print(common.machine_line() + f"; torch {torch.__version__}, {torch.get_num_threads()} threads")
    _, model, _, image_shape = common.build(args.config)
    convs = unet_convs(model, image_shape, args.batch)
    print(f"{args.config}: {sum(convs.values())} convolutions, {len(convs)} distinct, batch {args.batch}")
    floors = {}
    for step, train in (("train", True), ("sample", False)):
        print(f"\n{step}: {'forward + input and kernel gradients' if train else 'forward'}, ms per call")
        print(f"{'x (NHWC)':<20} {'kernel':<18} {'stride':>6} {'uses':>4} | {'xla':>7} {'torch':>7} {'ratio':>6}")
        for conv, uses in sorted(convs.items(), key=lambda kv: -np.prod(kv[0].x_shape) * kv[0].kernel_shape[-1]):
            one = {conv: 1}
            times = common.interleaved([XlaConvs(one, train), TorchConvs(one, train)], args.rounds)
            xla, peer = (common.median(t) for t in times)
            print(f"{str(conv.x_shape):<20} {str(conv.kernel_shape):<18} {conv.strides[0]:>6} {uses:>4} | "
                  f"{1e3 * xla:>7.2f} {1e3 * peer:>7.2f} {peer / xla:>6.2f}")
        times = common.interleaved([XlaConvs(convs, train), TorchConvs(convs, train)], args.rounds)
        floors[step] = [common.median(t) for t in times]
        print(f"conv floor of the {step} step (all {sum(convs.values())} in one call): xla {floors[step][0]:.3f} s, "
              f"torch {floors[step][1]:.3f} s, torch / xla {floors[step][1] / floors[step][0]:.2f}")
    if args.skip_steps:
        return
    from sampling_step import DDIM_STEPS, TorchRunner

    for step in ("train", "sample"):
        if step == "train":
            runners = [common.TrainCall(args.config, "float32", args.batch, 2).ready(),
                       common.TorchTrainCall(args.config, "float32", args.batch, 2)]
            per_call = 2
        else:
            ours = common.SampleCall(args.config, "float32", args.batch, method="ddim", steps=DDIM_STEPS).ready()
            runners = [ours, TorchRunner(ours.model, ours.diffusion, ours.image_shape, args.batch, "float32")]
            per_call = 1
        times = common.interleaved(runners, args.rounds)
        full = [common.median(t) / per_call for t in times]
        floor = floors[step]
        print(f"\n{step} step ({'K=2 per call' if step == 'train' else 'DDIM-50'}), s per step: "
              f"ddm {full[0]:.3f} (conv floor {floor[0]:.3f}, rest {full[0] - floor[0]:.3f}); "
              f"diffusers {full[1]:.3f} (conv floor {floor[1]:.3f}, rest {full[1] - floor[1]:.3f})")
        print(f"  ratio ddm / diffusers speed {full[1] / full[0]:.2f}; best ratio (ddm's rest at 0) "
              f"{full[1] / floor[0]:.2f}; for 1.2x ddm's rest would have to be {full[1] / 1.2 - floor[0]:.3f} s")


if __name__ == "__main__":
    main()
