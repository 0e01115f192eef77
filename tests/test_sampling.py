"""Samplers with the exact denoiser of Gaussian data: they must reproduce the data's statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddm
from tests.gaussian import MU, S, eps_model

T = 1000
SHAPE = (512, 4, 4, 1)


@pytest.fixture(scope="module")
def diffusion():
    return ddm.make_diffusion(ddm.get_betas("linear", T), "eps", "fixed_small")


def gaussian_model(d):
    return eps_model(d.alphas_cumprod)  # indexed by original timesteps, so it serves respaced runs too


def check_stats(x, tol_mean=0.015, tol_std=0.02):
    x = np.asarray(x)
    assert abs(x.mean() - MU) < tol_mean, x.mean()
    assert abs(x.std() - S) < tol_std, x.std()


def test_ddpm_reproduces_gaussian_data(diffusion):
    sample = jax.jit(lambda key: ddm.ddpm_sample(diffusion, gaussian_model(diffusion), key, SHAPE, clip_denoised=False))
    check_stats(sample(jax.random.PRNGKey(0)))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_reproduces_gaussian_data_closer_as_steps_grow(diffusion, eta):
    std_errors = []
    for steps in ("ddim10", "ddim50", "ddim200"):
        d = ddm.respace(diffusion, ddm.space_timesteps(T, steps))
        x = jax.jit(lambda key: ddm.ddim_sample(d, gaussian_model(diffusion), key, SHAPE, eta=eta,
                                                clip_denoised=False))(jax.random.PRNGKey(1))
        assert abs(float(x.mean()) - MU) < 0.015
        std_errors.append(abs(float(x.std()) - S))
    assert std_errors[0] > std_errors[1] > std_errors[2], std_errors
    assert std_errors[2] < 0.02, std_errors


def test_ddim_eta0_is_deterministic_given_x_T(diffusion):
    d = ddm.respace(diffusion, ddm.space_timesteps(T, "20"))
    x_T = jax.random.normal(jax.random.PRNGKey(2), (4, 4, 4, 1))
    run = lambda key, eta: ddm.ddim_sample(d, gaussian_model(diffusion), key, x_T.shape, eta=eta, x_T=x_T)
    np.testing.assert_array_equal(run(jax.random.PRNGKey(0), 0.0), run(jax.random.PRNGKey(1), 0.0))
    assert not np.allclose(run(jax.random.PRNGKey(0), 1.0), run(jax.random.PRNGKey(1), 1.0))


def test_ddim_encode_decode_returns_input_closer_as_steps_grow(diffusion):
    x0 = MU + S * jax.random.normal(jax.random.PRNGKey(3), (64, 4, 4, 1))
    errors = []
    for steps in (10, 50, 250):
        d = ddm.respace(diffusion, ddm.space_timesteps(T, steps))
        x_T, x0_hat = jax.jit(lambda x: ddm.ddim_reconstruct(d, gaussian_model(diffusion), x, clip_denoised=False))(x0)
        errors.append(float(jnp.sqrt(jnp.mean((x0_hat - x0) ** 2))))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.02, errors
    # x_T is close to standard normal: the encoder maps the data distribution to the prior.
    assert abs(float(x_T.std()) - 1.0) < 0.1


def test_progressive_records_x_t_and_pred_x0(diffusion):
    d = ddm.respace(diffusion, ddm.space_timesteps(T, 25))
    model = gaussian_model(diffusion)
    x_T = jax.random.normal(jax.random.PRNGKey(4), (8, 4, 4, 1))
    plain = ddm.ddpm_sample(d, model, jax.random.PRNGKey(5), x_T.shape, x_T=x_T)
    x0, progress = ddm.ddpm_sample(d, model, jax.random.PRNGKey(5), x_T.shape, x_T=x_T, record_steps=[24, 12, 0])
    np.testing.assert_array_equal(x0, plain)  # recording does not change the trajectory
    assert progress["x_t"].shape == (3,) + x_T.shape and list(progress["t"]) == [24, 12, 0]
    np.testing.assert_array_equal(progress["x_t"][0], x_T)
    np.testing.assert_allclose(progress["pred_x0"][-1], x0, atol=1e-6)  # the last step returns pred_x0
    with pytest.raises(ValueError, match=r"record_steps \[30\] are not among the steps"):
        ddm.ddpm_sample(d, model, jax.random.PRNGKey(5), x_T.shape, record_steps=[30])


def test_t_start_runs_the_tail_of_the_chain(diffusion):
    d = ddm.respace(diffusion, ddm.space_timesteps(T, 10))
    model = gaussian_model(diffusion)
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 4, 4, 1))
    out = ddm.ddim_sample(d, model, jax.random.PRNGKey(0), x.shape, x_T=x, t_start=0)
    t0 = jnp.zeros((4,), jnp.int32)
    expected = ddm.p_mean_variance(d, model(x, d.timestep_map[t0]), x, t0)["pred_x0"]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"t_start=10 out of range \[0, 9\]"):
        ddm.ddim_sample(d, model, jax.random.PRNGKey(0), x.shape, t_start=10)


def test_bad_sampler_arguments(diffusion):
    model = gaussian_model(diffusion)
    with pytest.raises(ValueError, match="eta must be >= 0, got eta=-0.5"):
        ddm.ddim_sample(diffusion, model, jax.random.PRNGKey(0), (1, 2, 2, 1), eta=-0.5)
    with pytest.raises(ValueError, match=r"x_T has shape \(2, 2, 2, 1\) but shape=\(1, 2, 2, 1\)"):
        ddm.ddpm_sample(diffusion, model, jax.random.PRNGKey(0), (1, 2, 2, 1), x_T=jnp.zeros((2, 2, 2, 1)))


def test_slerp():
    z0, z1 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    np.testing.assert_allclose(ddm.slerp(z0, z1, 0.0), z0, atol=1e-7)
    np.testing.assert_allclose(ddm.slerp(z0, z1, 1.0), z1, atol=1e-7)
    np.testing.assert_allclose(ddm.slerp(z0, z1, 0.5), [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)  # stays on the circle
    parallel = ddm.slerp(z0, 2 * z0, 0.5)
    np.testing.assert_allclose(parallel, [1.5, 0.0], atol=1e-6)  # falls back to lerp, no NaN


def test_interpolate_endpoints_are_the_ddim_samples(diffusion):
    d = ddm.respace(diffusion, ddm.space_timesteps(T, 10))
    model = gaussian_model(diffusion)
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (4, 4, 1)) for i in (7, 8))
    images = ddm.interpolate(d, model, a, b, [0.0, 0.5, 1.0])
    assert images.shape == (3, 4, 4, 1)
    ends = ddm.ddim_sample(d, model, jax.random.PRNGKey(0), (2, 4, 4, 1), x_T=jnp.stack([a, b]))
    np.testing.assert_allclose(images[jnp.array([0, 2])], ends, atol=1e-5)
