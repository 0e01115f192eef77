"""Every public function works under jit, vmap and pmap (two fake CPU devices) and agrees with eager."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddm
from tests.gaussian import eps_model

T = 20
D = ddm.make_diffusion(ddm.get_betas("cosine", T), "eps", "learned_range", "hybrid")
D_RESPACED = ddm.respace(D, ddm.space_timesteps(T, 5))


def model(x, t):
    eps = eps_model(D.alphas_cumprod)(x, t)
    return jnp.concatenate([eps, jnp.tanh(x)], axis=-1)


def inputs(batch=4):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x0 = jax.random.uniform(k[0], (batch, 4, 4, 2), minval=-1, maxval=1)
    noise = jax.random.normal(k[1], x0.shape)
    t = jax.random.randint(k[2], (batch,), 0, T)
    return x0, noise, t, k[3]


CASES = {
    "q_sample": lambda x0, n, t, k: ddm.q_sample(D, x0, t, n),
    "q_posterior": lambda x0, n, t, k: ddm.q_posterior(D, x0, ddm.q_sample(D, x0, t, n), t),
    "p_mean_variance": lambda x0, n, t, k: ddm.p_mean_variance(D, model(x0, t), x0, t),
    "training_losses": lambda x0, n, t, k: ddm.training_losses(D, model, x0, t, n),
    "vb_terms_bpd": lambda x0, n, t, k: ddm.vb_terms_bpd(D, model(x0, t), x0, ddm.q_sample(D, x0, t, n), t)["output"],
    "prior_bpd": lambda x0, n, t, k: ddm.prior_bpd(D, x0),
    "bits_per_dim": lambda x0, n, t, k: ddm.bits_per_dim(D_RESPACED, model, x0, k),
    "ddpm_sample": lambda x0, n, t, k: ddm.ddpm_sample(D_RESPACED, model, k, x0.shape, x_T=n),
    "ddim_sample": lambda x0, n, t, k: ddm.ddim_sample(D_RESPACED, model, k, x0.shape, eta=0.5, x_T=n),
    "ddim_encode": lambda x0, n, t, k: ddm.ddim_encode(D_RESPACED, model, x0),
}


def assert_trees_close(a, b):
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5), a, b)


@pytest.mark.parametrize("name", CASES)
def test_jit_vmap_pmap_agree_with_eager(name):
    fn = CASES[name]
    x0, noise, t, key = inputs()
    eager = fn(x0, noise, t, key)
    assert_trees_close(jax.jit(fn)(x0, noise, t, key), eager)
    # vmap over a leading axis of two copies of the batch (one key each).
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), (x0, noise, t, key))
    vmapped = jax.vmap(fn)(*stacked)
    assert_trees_close(jax.tree_util.tree_map(lambda a: a[1], vmapped), eager)
    # pmap: each of two devices takes half the batch with the same key.
    halves = jax.tree_util.tree_map(lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:]), (x0, noise, t))
    pmapped = jax.pmap(fn)(*halves, jnp.stack([key, key]))
    assert_trees_close(jax.tree_util.tree_map(lambda a: a[0], pmapped), fn(x0[:2], noise[:2], t[:2], key))
