"""The papers' figures with closed-form denoisers (no network): shapes, dtypes and what each must show."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddm
from configs.default import get_config
from ddm import figures
from ddm.data import to_float, to_uint8
from tests.gaussian import eps_model

T = 50
IMAGE_SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def diffusion():
    return ddm.make_diffusion(ddm.get_betas("linear", T), "eps", "fixed_small")


def point_model(d, point):
    """The exact eps of a dataset holding the one image ``point``: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    ab_all = jnp.asarray(d.alphas_cumprod)

    def model_fn(x, t):
        ab = ab_all[t].reshape((-1, 1, 1, 1))
        return (x - jnp.sqrt(ab) * point) / jnp.sqrt(1.0 - ab)

    return model_fn


def test_progressive_last_snapshot_is_the_ddpm_sample(diffusion):
    model = eps_model(diffusion.alphas_cumprod)
    shape = (3,) + IMAGE_SHAPE
    key = jax.random.PRNGKey(0)
    snapshots = figures.progressive(diffusion, model, key, shape, 5)
    assert snapshots.shape == (5,) + shape and snapshots.dtype == np.uint8
    plain = jax.jit(lambda k: ddm.ddpm_sample(diffusion, model, k, shape))(key)
    np.testing.assert_array_equal(snapshots[-1], to_uint8(plain))
    assert list(figures.progressive_steps(T, 5)) == [49, 37, 24, 12, 0]
    # early predictions of x0 from nearly pure noise differ from the final sample
    assert np.abs(snapshots[0].astype(int) - snapshots[-1].astype(int)).mean() > 1
    with pytest.raises(ValueError, match="progressive_snapshots"):
        figures.progressive_steps(T, 1)


def test_ddim_interpolation_endpoints_are_the_ddim_samples_of_the_endpoints(diffusion):
    d = ddm.respace(diffusion, ddm.space_timesteps(T, 10))
    model = eps_model(diffusion.alphas_cumprod)
    key = jax.random.PRNGKey(1)
    out = figures.ddim_interpolation(d, model, key, IMAGE_SHAPE, num_points=4, rows=2)
    assert out.shape == (2, 4) + IMAGE_SHAPE and out.dtype == np.uint8
    x_T0, x_T1 = figures.interpolation_endpoints(key, IMAGE_SHAPE, 2)
    decode = jax.jit(lambda x_T: ddm.ddim_sample(d, model, jax.random.PRNGKey(5), x_T.shape, 0.0, x_T))
    np.testing.assert_array_equal(out[:, 0], to_uint8(decode(x_T0)))
    np.testing.assert_array_equal(out[:, -1], to_uint8(decode(x_T1)))
    assert not np.array_equal(out[:, 1], out[:, 0])


def test_ddpm_interpolation_at_mix_0_is_the_reconstruction_path_of_a(diffusion):
    model = eps_model(diffusion.alphas_cumprod)
    x = to_float(np.random.default_rng(0).integers(0, 256, (4,) + IMAGE_SHAPE, dtype=np.uint8))
    x0_a, x0_b = x[:2], x[2:]
    key, t = jax.random.PRNGKey(2), 20
    out = figures.ddpm_interpolation(diffusion, model, key, x0_a, x0_b, t, num_points=3)
    assert out.shape == (2, 5) + IMAGE_SHAPE and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0], to_uint8(x0_a))
    np.testing.assert_array_equal(out[:, -1], to_uint8(x0_b))
    noise_key, loop_key = jax.random.split(key)
    eps = jax.random.normal(noise_key, x0_a.shape)
    x_t = ddm.q_sample(diffusion, jnp.asarray(x0_a), jnp.full((2,), t), eps)
    path_a = jax.jit(lambda x_t: ddm.ddpm_sample(diffusion, model, loop_key, x_t.shape, x_T=x_t, t_start=t))(x_t)
    np.testing.assert_array_equal(out[:, 1], to_uint8(path_a))
    with pytest.raises(ValueError, match="interpolation_t"):
        figures.ddpm_interpolation(diffusion, model, key, x0_a, x0_b, T, num_points=3)


def test_reconstruction_of_the_one_point_dataset_is_exact(diffusion):
    point = jnp.linspace(-0.8, 0.8, 64).reshape((1,) + IMAGE_SHAPE)
    x0 = jnp.concatenate([point, point])
    images, mse = figures.reconstruction(diffusion, point_model(diffusion, point), x0, [5, 2 * T, T])
    assert list(mse) == [5, T]  # 2T > T is skipped
    assert images.shape == (3, 2) + IMAGE_SHAPE and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], to_uint8(x0))
    assert max(mse.values()) < 1e-8, mse
    for recon in images[1:]:
        assert np.abs(recon.astype(int) - images[0].astype(int)).max() <= 1
    # a model that knows nothing about the data reconstructs far worse
    _, bad = figures.reconstruction(diffusion, lambda x, t: jnp.zeros_like(x), x0, [5])
    assert bad[5] > 1e-3, bad


def test_labeled_grid_size_and_labels():
    images = np.zeros((2, 3) + IMAGE_SHAPE, np.uint8)
    plain = figures.labeled_grid(images)
    scale = 128 // IMAGE_SHAPE[0]
    assert plain.shape == ((2 * 10 + 2) * scale, (3 * 10 + 2) * scale, 3) and plain.dtype == np.uint8
    labeled = figures.labeled_grid(images, row_labels=["a", "bb"], col_labels=["x", "y", "z"])
    assert labeled.shape[0] > plain.shape[0] and labeled.shape[1] > plain.shape[1]


def test_write_figures_writes_each_png_and_the_csv(diffusion, tmp_path):
    config = get_config()
    config.sample.steps = 10
    ev = config.eval
    ev.progressive_snapshots, ev.interpolation_points, ev.interpolation_t = 4, 3, 20
    ev.reconstruction_steps, ev.reconstruction_examples = (5, 1000), 3
    test_images = np.random.default_rng(1).integers(0, 256, (6,) + IMAGE_SHAPE, dtype=np.uint8)
    paths = figures.write_figures(config, str(tmp_path), diffusion, eps_model(diffusion.alphas_cumprod),
                                  test_images, jax.random.PRNGKey(3))
    assert set(paths) == {"progressive", "interpolation_ddim", "interpolation_ddpm", "reconstruction",
                          "reconstruction_csv"}
    scale = 128 // IMAGE_SHAPE[0]
    grid = lambda n: (n * (IMAGE_SHAPE[0] + 2) + 2) * scale
    # (rows, columns) of images in each figure
    layout = {"progressive": (figures.FIGURE_ROWS, 4), "interpolation_ddim": (figures.FIGURE_ROWS, 3),
              "interpolation_ddpm": (3, 5), "reconstruction": (2, 3)}
    for name, (rows, cols) in layout.items():
        assert paths[name] == str(tmp_path / "eval" / f"{name}.png")
        with Image.open(paths[name]) as image:
            width, height = image.size
            assert image.mode == "RGB"
        assert grid(cols) <= width < grid(cols) + 200, (name, width)
        assert grid(rows) <= height < grid(rows) + 60, (name, height)
    with open(paths["reconstruction_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["steps"]) for r in rows] == [5] and all(0 <= float(r["mse"]) <= 1 for r in rows)
