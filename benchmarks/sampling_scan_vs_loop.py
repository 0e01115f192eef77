"""Sampling as one lax.scan against a Python loop of per-step jitted calls (same model, same run).

    python benchmarks/sampling_scan_vs_loop.py [--settings 1x8,16x16] [--repeats 3]

Each setting is BATCHxIMAGE_SIZE for a small U-Net (ch 32, mult (1, 2)). Both paths run the same
step function with the same keys, and the script checks that they give the same samples before it
prints the times and the ratio loop / scan (> 1: the scan is faster). A small batch shows the
per-step dispatch cost the scan removes; a larger one shows the compute-bound case.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ddm
from ddm.sampling import ddim_step, ddpm_step
from ddm.unet import UNet


def best_time(fn, repeats):
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="1x8,16x16", help="comma-separated BATCHxIMAGE_SIZE")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, U-Net ch 32 mult (1, 2), 1 channel")
    print(f"{'sampler':<8} {'steps':>5} {'batch':>12} {'scan s':>8} {'loop s':>8} {'loop/scan':>9}")
    for setting in args.settings.split(","):
        batch, size = (int(v) for v in setting.split("x"))
        compare((batch, size, size, 1), args.repeats)


def compare(shape, repeats):
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32),
                        train=False)["params"]
    # Zero-initialised output layers would make every step trivial: perturb them.
    params = jax.tree_util.tree_map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    base = ddm.make_diffusion(ddm.get_betas("linear", 1000))
    key = jax.random.PRNGKey(2)
    x_T = jax.random.normal(key, shape)
    for name, steps in (("ddpm", 1000), ("ddim", 50)):
        d = base if steps == 1000 else ddm.respace(base, ddm.space_timesteps(1000, f"ddim{steps}"))
        model_fn = lambda p: (lambda x, t: model.apply({"params": p}, x, t, train=False))
        sample = ddm.ddpm_sample if name == "ddpm" else ddm.ddim_sample
        step = ddpm_step if name == "ddpm" else ddim_step
        scan = jax.jit(lambda p, x: sample(d, model_fn(p), key, shape, x_T=x))
        _, loop_key = jax.random.split(key)  # the key the scan's steps fold t into
        one_step = jax.jit(lambda p, x, t: step(d, model_fn(p), x, t, jax.random.fold_in(loop_key, t))[0])

        def loop():
            x = x_T
            for t in range(d.num_timesteps - 1, -1, -1):
                x = one_step(params, x, t)
            return x

        np.testing.assert_allclose(scan(params, x_T), loop(), atol=1e-3)
        t_scan, t_loop = best_time(lambda: scan(params, x_T), repeats), best_time(loop, repeats)
        batch = "x".join(map(str, shape))
        print(f"{name:<8} {steps:>5} {batch:>12} {t_scan:>8.3f} {t_loop:>8.3f} {t_loop / t_scan:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
