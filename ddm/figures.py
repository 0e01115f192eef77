"""The papers' qualitative figures, as uint8 arrays and labelled PNGs.

- ``progressive``: predicted x0 along one DDPM ancestral trajectory (DDPM Fig. 6);
- ``ddim_interpolation``: slerp between two x_T, decoded by deterministic DDIM (DDIM Fig. 6);
- ``ddpm_interpolation``: two images diffused to t with shared noise, mixed, denoised (DDPM Fig. 8);
- ``reconstruction``: DDIM encode then decode with S steps, and its error (DDIM Table 2);
- ``write_figures``: all of them under ``<workdir>/eval/`` for ``--mode=eval``.

Inputs are float images NHWC in [-1, 1] (``data.to_float``); outputs are uint8 NHWC (``data.to_uint8``).
Timesteps are the diffusion's 0-based indices (t = 0 is the papers' t = 1). Each trajectory is one
jitted ``lax.scan`` (``ddm.sampling``); only the step counts of ``reconstruction`` are a Python loop.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddm.data import to_float, to_uint8
from ddm.diffusion import Diffusion, ModelFn, q_sample
from ddm.images import make_grid, save_png
from ddm.respacing import respace, space_timesteps
from ddm.sampling import ddim_reconstruct, ddim_sample, ddpm_sample, slerp

FIGURE_ROWS = 8  # samples (progressive, DDIM interpolation) or test pairs (DDPM interpolation) per figure
PADDING = 2  # pixels between images in a grid, before enlarging
FONT_SIZE = 14  # label text height in pixels


def progressive_steps(num_timesteps: int, num_snapshots: int) -> np.ndarray:
    """``num_snapshots`` distinct timesteps evenly spaced from T - 1 down to 0 (int, descending)."""
    if not 2 <= num_snapshots <= num_timesteps:
        raise ValueError(f"num_snapshots={num_snapshots} must be in 2..{num_timesteps} (the diffusion's steps); "
                         "set eval.progressive_snapshots in that range")
    return np.rint(np.linspace(num_timesteps - 1, 0, num_snapshots)).astype(np.int32)


def progressive(diffusion: Diffusion, model_fn: ModelFn, key, shape, num_snapshots: int) -> np.ndarray:
    """DDPM Fig. 6: the predicted x0 at ``progressive_steps`` along one ancestral trajectory.

    shape: (N, H, W, C) of the samples. Returns uint8 (num_snapshots, N, H, W, C); snapshot k is the
    x0 predicted at the k-th step, the last one is the final sample (``ddpm_sample`` with this key).
    """
    record = progressive_steps(diffusion.num_timesteps, num_snapshots)[:-1]
    run = jax.jit(lambda key: ddpm_sample(diffusion, model_fn, key, shape, record_steps=record))
    x0, recorded = run(key)
    return to_uint8(jnp.concatenate([recorded["pred_x0"], x0[None]]))


def interpolation_endpoints(key, image_shape, rows: int):
    """The two x_T ~ N(0, I) of each row of ``ddim_interpolation``, each (rows, H, W, C)."""
    key0, key1 = jax.random.split(key)
    shape = (rows,) + tuple(image_shape)
    return jax.random.normal(key0, shape, jnp.float32), jax.random.normal(key1, shape, jnp.float32)


def ddim_interpolation(diffusion: Diffusion, model_fn: ModelFn, key, image_shape, num_points: int,
                       rows: int) -> np.ndarray:
    """DDIM Fig. 6: decode slerp(x_T0, x_T1, a) for ``num_points`` a evenly spaced in [0, 1] with
    deterministic DDIM (eta = 0) over the diffusion's (respaced) steps.

    The endpoints come from ``interpolation_endpoints(key, image_shape, rows)``. Returns uint8
    (rows, num_points, H, W, C); columns 0 and -1 are the DDIM samples of x_T0 and x_T1.
    """
    if num_points < 2:
        raise ValueError(f"num_points={num_points} must be >= 2 (the two endpoints); set eval.interpolation_points")
    alphas = np.linspace(0.0, 1.0, num_points, dtype=np.float32)  # exactly 0 and 1 at the ends
    x_T0, x_T1 = interpolation_endpoints(key, image_shape, rows)

    def run(x_T0, x_T1):
        x_T = jax.vmap(lambda z0, z1: jax.vmap(lambda a: slerp(z0, z1, a))(alphas))(x_T0, x_T1)
        flat = x_T.reshape((-1,) + tuple(image_shape))
        x0 = ddim_sample(diffusion, model_fn, jax.random.PRNGKey(0), flat.shape, 0.0, flat)
        return x0.reshape(x_T.shape)

    return to_uint8(jax.jit(run)(x_T0, x_T1))


def ddpm_interpolation(diffusion: Diffusion, model_fn: ModelFn, key, x0_a, x0_b, t: int,
                       num_points: int) -> np.ndarray:
    """DDPM Fig. 8: interpolate two images through their diffused latents at step ``t``.

    x0_a, x0_b: float (N, H, W, C) in [-1, 1], row i mixes x0_a[i] with x0_b[i]. Both are diffused to
    x_t = q_sample(x0, t, eps) with the same eps ~ N(0, I) drawn from ``split(key)[0]``; the latent
    (1 - lam) x_t^a + lam x_t^b for ``num_points`` lam evenly spaced in [0, 1] is denoised by DDPM
    ancestral sampling from t with ``split(key)[1]``, the same reverse noise in every column.
    Returns uint8 (N, num_points + 2, H, W, C): column 0 is x0_a, column -1 is x0_b, the columns
    between are the decoded mixes (lam = 0 first).
    """
    if x0_a.shape != x0_b.shape:
        raise ValueError(f"x0_a {x0_a.shape} and x0_b {x0_b.shape} must have the same shape")
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"t={t} must be in 0..{diffusion.num_timesteps - 1}; set eval.interpolation_t in that range")
    if num_points < 2:
        raise ValueError(f"num_points={num_points} must be >= 2; set eval.interpolation_points")
    noise_key, loop_key = jax.random.split(key)
    lams = np.linspace(0.0, 1.0, num_points, dtype=np.float32).reshape((-1,) + (1,) * x0_a.ndim)

    def run(x0_a, x0_b):
        tb = jnp.full(x0_a.shape[:1], t, jnp.int32)
        eps = jax.random.normal(noise_key, x0_a.shape, jnp.float32)
        mixed = (1.0 - lams) * q_sample(diffusion, x0_a, tb, eps) + lams * q_sample(diffusion, x0_b, tb, eps)
        decode = lambda x_t: ddpm_sample(diffusion, model_fn, loop_key, x_t.shape, x_T=x_t, t_start=t)
        return jnp.swapaxes(jax.vmap(decode)(mixed), 0, 1)  # (N, num_points, H, W, C)

    decoded = to_uint8(jax.jit(run)(jnp.asarray(x0_a), jnp.asarray(x0_b)))
    return np.concatenate([to_uint8(x0_a)[:, None], decoded, to_uint8(x0_b)[:, None]], axis=1)


def reconstruction(diffusion: Diffusion, model_fn: ModelFn, x0, steps_list):
    """DDIM Table 2: encode x0 to x_T with deterministic DDIM, decode it back, for each step count.

    x0: float (N, H, W, C) in [-1, 1]. Each S in ``steps_list`` respaces the diffusion to S evenly
    spread steps (``space_timesteps(T, S)``; S = T uses it as is); S > T is skipped. Returns (images,
    mse): images uint8 (1 + len(kept), N, H, W, C), the originals first, then one reconstruction per
    kept S in order; mse {S: mean squared error per dimension with pixels scaled to [0, 1]}.
    """
    num_timesteps = diffusion.num_timesteps
    too_few = [s for s in steps_list if s < 2]
    if too_few:
        raise ValueError(f"reconstruction steps {too_few} must be >= 2; fix eval.reconstruction_steps")
    x0 = jnp.asarray(x0, jnp.float32)
    images, mse = [to_uint8(x0)], {}
    for steps in (int(s) for s in steps_list if s <= num_timesteps):
        d = diffusion if steps == num_timesteps else respace(diffusion, space_timesteps(num_timesteps, steps))
        x0_hat = jax.jit(lambda x: ddim_reconstruct(d, model_fn, x)[1])(x0)
        mse[steps] = float(jnp.mean(((x0_hat - x0) / 2.0) ** 2))
        images.append(to_uint8(x0_hat))
    return np.stack(images), mse


def labeled_grid(images: np.ndarray, row_labels=(), col_labels=()) -> np.ndarray:
    """Tile uint8 images (R, K, H, W, C) into one RGB image, R rows by K columns, enlarged like
    ``experiment.save_sample_grid`` (to about 128 pixels per image), with optional text labels left of
    each row and above each column. Returns uint8 (height, width, 3)."""
    rows, cols, h, w, c = images.shape
    scale = max(1, 128 // h)
    grid = make_grid(images.reshape((rows * cols, h, w, c)), ncols=cols, padding=PADDING)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    grid = np.repeat(grid, 3, axis=-1) if c == 1 else grid
    font = ImageFont.load_default(size=FONT_SIZE)
    left = int(max(font.getlength(label) for label in row_labels)) + FONT_SIZE if row_labels else 0
    top = 2 * FONT_SIZE if col_labels else 0
    canvas = Image.new("RGB", (left + grid.shape[1], top + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    center = lambda i, size: (PADDING + i * (size + PADDING) + size / 2) * scale
    for i, label in enumerate(row_labels):
        draw.text((left - FONT_SIZE // 2, top + center(i, h)), label, fill="black", font=font, anchor="rm")
    for j, label in enumerate(col_labels):
        draw.text((left + center(j, w), FONT_SIZE), label, fill="black", font=font, anchor="mm")
    return np.asarray(canvas)


def _write_csv(path: str, header: str, rows) -> str:
    """Write comma-separated ``rows`` under ``header`` atomically."""
    with open(path + ".tmp", "w") as f:
        f.write(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    os.replace(path + ".tmp", path)
    return path


def write_figures(config, workdir: str, diffusion: Diffusion, model_fn: ModelFn, test_images_uint8: np.ndarray,
                  key) -> dict:
    """Write the four figures and the reconstruction errors under ``<workdir>/eval/``.

    diffusion: the full (un-respaced) training diffusion; DDIM interpolation runs on it respaced by
    ``sample.steps`` / ``sample.respacing``. test_images_uint8: (N >= 2, H, W, C) test images, pairs
    (2i, 2i + 1) for DDPM interpolation, the first ``eval.reconstruction_examples`` for reconstruction.
    Returns {name: path} for progressive, interpolation_ddim, interpolation_ddpm, reconstruction (PNGs)
    and reconstruction_csv (columns steps, mse).
    """
    from ddm.experiment import build_sampling_diffusion  # here, not at the top: it imports TensorFlow (clu)

    ev = config.eval
    images = np.asarray(test_images_uint8)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) < 2:
        raise ValueError(f"test_images_uint8 must be uint8 (N >= 2, H, W, C), got {images.dtype} {images.shape}")
    if ev.reconstruction_examples < 1:
        raise ValueError(f"eval.reconstruction_examples={ev.reconstruction_examples} must be >= 1")
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    x = to_float(images)
    image_shape = x.shape[1:]
    keys = jax.random.split(key, 3)
    paths = {}

    steps = progressive_steps(diffusion.num_timesteps, ev.progressive_snapshots)
    snapshots = progressive(diffusion, model_fn, keys[0], (FIGURE_ROWS,) + image_shape, ev.progressive_snapshots)
    paths["progressive"] = save_png(labeled_grid(
        np.swapaxes(snapshots, 0, 1), col_labels=[f"t={t}" for t in steps[:-1]] + ["sample"]),
        os.path.join(out, "progressive.png"))

    alphas = np.linspace(0.0, 1.0, ev.interpolation_points)
    interpolated = ddim_interpolation(build_sampling_diffusion(config, diffusion), model_fn, keys[1], image_shape,
                                      ev.interpolation_points, FIGURE_ROWS)
    paths["interpolation_ddim"] = save_png(labeled_grid(interpolated, col_labels=[f"{a:.2f}" for a in alphas]),
                                           os.path.join(out, "interpolation_ddim.png"))

    pairs = min(FIGURE_ROWS, len(x) // 2)
    mixed = ddpm_interpolation(diffusion, model_fn, keys[2], x[0:2 * pairs:2], x[1:2 * pairs:2],
                               ev.interpolation_t, ev.interpolation_points)
    paths["interpolation_ddpm"] = save_png(labeled_grid(
        mixed, col_labels=["x0 a"] + [f"{a:.2f}" for a in alphas] + ["x0 b"]),
        os.path.join(out, "interpolation_ddpm.png"))

    recon, mse = reconstruction(diffusion, model_fn, x[:ev.reconstruction_examples], ev.reconstruction_steps)
    paths["reconstruction"] = save_png(labeled_grid(recon, row_labels=["original"] + [f"{s} steps" for s in mse]),
                                       os.path.join(out, "reconstruction.png"))
    paths["reconstruction_csv"] = _write_csv(os.path.join(out, "reconstruction.csv"), "steps,mse",
                                             [(s, f"{e:.8g}") for s, e in mse.items()])
    return paths
