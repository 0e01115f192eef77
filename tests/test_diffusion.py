"""The pytree, forward process, posterior, parameterisations and p_mean_variance against closed forms."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddm
from ddm.diffusion import MEAN_TYPES, VAR_TYPES

T = 100
SHAPE = (4, 8, 8, 3)


def make(mean_type="eps", var_type="fixed_small", loss_type=None, schedule="linear"):
    loss_type = loss_type or ("hybrid" if var_type in ("learned", "learned_range") else "mse")
    return ddm.make_diffusion(ddm.get_betas(schedule, T), mean_type, var_type, loss_type)


def batch(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x0 = jax.random.uniform(k1, SHAPE, minval=-1, maxval=1)
    noise = jax.random.normal(k2, SHAPE)
    t = jax.random.randint(k3, (SHAPE[0],), 0, T)
    return x0, noise, t


def test_pytree_arrays_are_float32_and_pass_through_jit():
    d = make()
    leaves = jax.tree_util.tree_leaves(d)
    assert all(leaf.shape == (T,) for leaf in leaves)
    assert {str(leaf.dtype) for leaf in leaves} == {"float32", "int32"}
    doubled = jax.jit(lambda d: jax.tree_util.tree_map(lambda a: a * 2, d))(d)
    assert isinstance(doubled, ddm.Diffusion) and doubled.mean_type == "eps"
    np.testing.assert_allclose(doubled.betas, 2 * d.betas)


def test_q_sample_is_the_formula():
    d = make()
    x0, noise, t = batch()
    ab = np.cumprod(1 - ddm.get_betas("linear", T))[np.asarray(t)][:, None, None, None]
    expected = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    np.testing.assert_allclose(ddm.q_sample(d, x0, t, noise), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), both Gaussians: product of Gaussians."""
    d = make(schedule=schedule)
    betas = ddm.get_betas(schedule, T)
    ab = np.cumprod(1 - betas)
    x0, noise, _ = batch()
    t = jnp.array([1, 5, 50, T - 1])
    xt = ddm.q_sample(d, x0, t, noise)
    mean, var, log_var = ddm.q_posterior(d, x0, xt, t)
    tt = np.asarray(t)
    b, a, ab_prev = betas[tt], 1 - betas[tt], ab[tt - 1]
    precision = 1 / (1 - ab_prev) + a / b
    bayes_var = (1 / precision)[:, None, None, None]
    bayes_mean = bayes_var * ((np.sqrt(ab_prev) / (1 - ab_prev))[:, None, None, None] * np.asarray(x0)
                              + (np.sqrt(a) / b)[:, None, None, None] * np.asarray(xt))
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var[:, 0, 0, 0], bayes_var[:, 0, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(log_var[:, 0, 0, 0], np.log(bayes_var[:, 0, 0, 0]), rtol=1e-5)


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    d = make()
    x0, noise, _ = batch()
    t = jnp.zeros((SHAPE[0],), jnp.int32)
    mean, var, log_var = ddm.q_posterior(d, x0, ddm.q_sample(d, x0, t, noise), t)
    np.testing.assert_allclose(mean, x0, atol=1e-6)
    assert float(var.max()) == 0.0
    np.testing.assert_allclose(log_var[:, 0, 0, 0], np.log(d.posterior_variance[1]), rtol=1e-6)


def test_parameterisations_round_trip():
    d = make()
    x0, noise, t = batch()
    xt = ddm.q_sample(d, x0, t, noise)
    np.testing.assert_allclose(ddm.pred_x0_from_eps(d, xt, t, noise), x0, atol=2e-3)
    np.testing.assert_allclose(ddm.pred_eps_from_x0(d, xt, t, x0), noise, atol=2e-3)
    np.testing.assert_allclose(ddm.pred_x0_from_v(d, xt, t, ddm.v_target(d, x0, t, noise)), x0, atol=1e-5)
    t1 = jnp.maximum(t, 1)  # coef1 = 0 only at... never; mu inverts everywhere coef1 > 0
    xt1 = ddm.q_sample(d, x0, t1, noise)
    mu = ddm.q_posterior(d, x0, xt1, t1)[0]
    np.testing.assert_allclose(ddm.pred_x0_from_mu(d, xt1, t1, mu), x0, atol=2e-3)


def exact_output(d, x0, xt, t, noise, var_part):
    """The model output that is exactly right for this x0, by mean type."""
    mean_part = {"eps": noise, "x0": x0, "v": ddm.v_target(d, x0, t, noise),
                 "mu": ddm.q_posterior(d, x0, xt, t)[0]}[d.mean_type]
    return mean_part if var_part is None else jnp.concatenate([mean_part, var_part], axis=-1)


@pytest.mark.parametrize("mean_type, var_type", list(itertools.product(MEAN_TYPES, VAR_TYPES)))
def test_p_mean_variance_every_type(mean_type, var_type):
    d = make(mean_type, var_type)
    x0, noise, _ = batch()
    t = jnp.array([0, 1, 40, T - 1])
    xt = ddm.q_sample(d, x0, t, noise)
    v = jnp.linspace(-1, 1, SHAPE[0]).reshape(-1, 1, 1, 1) * jnp.ones(SHAPE)
    var_part = v if d.learned_variance else None
    out = ddm.p_mean_variance(d, exact_output(d, x0, xt, t, noise, var_part), xt, t, clip_denoised=False)
    assert set(out) == {"mean", "variance", "log_variance", "pred_x0"}
    assert all(a.shape == SHAPE for a in out.values())
    np.testing.assert_allclose(out["pred_x0"][1:], x0[1:], atol=5e-3)
    np.testing.assert_allclose(out["mean"], ddm.q_posterior(d, x0, xt, t)[0], atol=5e-3)
    tt = np.asarray(t)
    betas = ddm.get_betas("linear", T)
    post = np.asarray(d.posterior_variance, np.float64)
    post_clipped = np.append(post[1], post[1:])
    expected_log_var = {
        "fixed_small": np.log(post_clipped[tt]),
        "fixed_large": np.log(np.append(post[1], betas[1:])[tt]),
        "learned": np.asarray(v[:, 0, 0, 0]),
        "learned_range": (np.asarray(v[:, 0, 0, 0]) + 1) / 2 * np.log(betas[tt])
        + (1 - np.asarray(v[:, 0, 0, 0])) / 2 * np.log(post_clipped[tt]),
    }[var_type]
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], expected_log_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["variance"], jnp.exp(out["log_variance"]), rtol=1e-6)


def test_clip_denoised_clips_pred_x0():
    d = make("x0")
    x0, noise, t = batch()
    xt = ddm.q_sample(d, x0, t, noise)
    out = ddm.p_mean_variance(d, 3.0 * jnp.ones(SHAPE), xt, t, clip_denoised=True)
    np.testing.assert_allclose(out["pred_x0"], 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"mean_type": "score"}, r"unknown mean_type='score'; allowed: 'eps', 'x0', 'mu', 'v'"),
    ({"var_type": "big"}, r"unknown var_type='big'; allowed: 'fixed_small', 'fixed_large', 'learned', 'learned_range'"),
    ({"loss_type": "l1"}, r"unknown loss_type='l1'; allowed: 'mse', 'hybrid', 'kl', 'rescaled_kl'"),
    ({"loss_type": "hybrid"}, r"loss_type='hybrid'.*var_type='fixed_small'"),
    ({"var_type": "learned_range", "loss_type": "mse"}, r"loss_type='mse'.*var_type='learned_range'.*'hybrid'"),
])
def test_bad_types(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddm.make_diffusion(ddm.get_betas("cosine", 10), **kwargs)


def test_bad_betas():
    with pytest.raises(ValueError, match="T >= 2"):
        ddm.make_diffusion(np.array([0.1]))
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        ddm.make_diffusion(np.array([0.1, 1.0]))


def test_wrong_channel_count_for_learned_variance():
    d = make("eps", "learned_range")
    x0, noise, t = batch()
    with pytest.raises(ValueError, match=r"model output has 3 channels; var_type='learned_range' with 3-channel images needs 6"):
        ddm.p_mean_variance(d, noise, x0, t)
    with pytest.raises(ValueError, match=r"has 6 channels; var_type='fixed_small'.*needs 3"):
        ddm.p_mean_variance(make(), jnp.concatenate([noise, noise], -1), x0, t)


def test_t_out_of_range_is_caught_eagerly():
    d = make()
    x0, noise, _ = batch()
    with pytest.raises(ValueError, match=r"t out of range: got values in \[0, 100\], allowed \[0, 99\]"):
        ddm.q_sample(d, x0, jnp.array([0, 1, 2, T]), noise)
    with pytest.raises(ValueError, match="t out of range"):
        ddm.q_posterior(d, x0, x0, jnp.array([-1, 0, 0, 0]))
