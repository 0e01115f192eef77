"""cuDNN's fused attention (``model.attention='cudnn'``) against ddm's XLA attention on this GPU: the
same outputs and gradients, to bfloat16's precision, for the attention shapes of the DDPM and IDDPM
CIFAR-10 U-Nets, and the whole U-Net's output with either.

    python benchmarks/attention_check.py [--batch 128]
    python benchmarks/attention_check.py --smoke     # on a CPU: JAX's XLA attention stands in for cuDNN

Each line gives the largest difference relative to the largest magnitude of the XLA result
(forward output, and the gradients of a fixed random projection of it with respect to q, k and v);
the check fails (exit 1) if any exceeds --tolerance. ``--smoke`` runs the same code with
``jax.nn.dot_product_attention``'s XLA implementation in place of cuDNN (a check of this script, not
of cuDNN).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ddm.unet as unet  # noqa: E402

# (what, H = W, channels, heads): DDPM's blocks at 16x16 (one 256-channel head); IDDPM's at 16x16
# and 8x8 (4 heads of 64).
SHAPES = (("DDPM 16x16", 16, 256, 1), ("IDDPM 16x16", 16, 256, 4), ("IDDPM 8x8", 8, 256, 4))


def relative_errors(batch: int, size: int, channels: int, heads: int, dtype=jnp.bfloat16) -> dict:
    """{"forward", "dq", "dk", "dv"}: max |cudnn - xla| / max |xla| for one attention call."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(key, (batch, size, size, channels), dtype) for key in keys)

    def loss(impl):
        return lambda q, k, v: jnp.sum(unet.multi_head_attention(q, k, v, heads, impl).astype(jnp.float32) * w)

    out = {impl: jax.jit(lambda q, k, v, impl=impl: unet.multi_head_attention(q, k, v, heads, impl))(q, k, v)
           for impl in ("xla", "cudnn")}
    grads = {impl: jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v) for impl in ("xla", "cudnn")}
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                             / jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-30))
    errors = {"forward": rel(out["cudnn"], out["xla"])}
    errors.update({name: rel(g, x) for name, g, x in zip(("dq", "dk", "dv"), grads["cudnn"], grads["xla"])})
    return errors


def unet_error(config: str, batch: int) -> float:
    """max |U-Net(cudnn) - U-Net(xla)| / max |U-Net(xla)| of a config's U-Net in bfloat16 (random
    parameters, DDPM's zero-initialised output layers drawn too)."""
    _, model, _, image_shape = common.build(config, "bfloat16")
    params = common.random_params(model, image_shape)
    x = jax.random.normal(jax.random.key(1), (batch,) + tuple(image_shape))
    t = jnp.arange(batch, dtype=jnp.int32) * 7 % 1000
    outputs = [jax.jit(lambda p, x, t, m=model.clone(attention=impl): m.apply({"params": p}, x, t, train=False))(
        params, x, t) for impl in ("xla", "cudnn")]
    return float(jnp.max(jnp.abs(outputs[1] - outputs[0])) / jnp.max(jnp.abs(outputs[0])))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tolerance", type=float, default=0.02, help="bfloat16 has 8 bits of mantissa")
    parser.add_argument("--smoke", action="store_true", help="JAX's XLA attention in place of cuDNN (any device)")
    args = parser.parse_args()
    if args.smoke:
        xla_attention = jax.nn.dot_product_attention
        jax.nn.dot_product_attention = lambda *a, implementation=None, **kw: xla_attention(
            *a, implementation="xla", **kw)
        args.batch = min(args.batch, 2)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}, bfloat16"
          + (" (smoke: XLA stands in for cuDNN)" if args.smoke else ""))
    worst = 0.0
    for name, size, channels, heads in SHAPES:
        errors = relative_errors(args.batch, size, channels, heads)
        worst = max(worst, *errors.values())
        print(f"  {name:<12} ({heads} head(s) of {channels // heads}): "
              + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    for config in ("cifar10_linear", "cifar10_cosine"):
        error = unet_error(config, min(args.batch, 16))
        worst = max(worst, error)
        print(f"  U-Net {config}: output {error:.2e}")
    ok = worst <= args.tolerance
    print(f"{'ok' if ok else 'FAILED'}: largest relative difference {worst:.2e} (tolerance {args.tolerance})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
