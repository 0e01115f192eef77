import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddm
from ddm.timestep_sampling import loss_second_moment_probs

T = 8


def test_uniform():
    sampler = ddm.uniform_sampler(T)
    t, w = sampler.sample(sampler.init(), jax.random.PRNGKey(0), 8000)
    assert t.dtype == jnp.int32 and t.min() >= 0 and t.max() < T
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_allclose(np.bincount(np.asarray(t), minlength=T) / 8000, 1 / T, atol=0.015)
    assert sampler.update(sampler.init(), t, w) == {}


def test_second_moment_is_uniform_until_every_history_is_full():
    sampler = ddm.loss_second_moment_sampler(T, history_per_term=3)
    state = sampler.init()
    state = sampler.update(state, jnp.array([0, 0, 0, 1, 2]), jnp.array([9.0, 9.0, 9.0, 1.0, 1.0]))
    np.testing.assert_array_equal(state["counts"], [3, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(loss_second_moment_probs(state), 1 / T)
    t, w = sampler.sample(state, jax.random.PRNGKey(0), 16)
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)


def test_second_moment_probabilities_and_weights():
    sampler = ddm.loss_second_moment_sampler(T, history_per_term=2, uniform_prob=0.001)
    losses = np.arange(1, T + 1, dtype=np.float32)  # L_t = t + 1, constant over the history
    ts = np.repeat(np.arange(T), 2)
    state = sampler.update(sampler.init(), jnp.asarray(ts), jnp.asarray(losses[ts]))
    expected = losses / losses.sum() * 0.999 + 0.001 / T  # sqrt(E[L^2]) = L
    np.testing.assert_allclose(loss_second_moment_probs(state), expected, rtol=1e-6)
    t, w = sampler.sample(state, jax.random.PRNGKey(1), 20000)
    np.testing.assert_allclose(w, 1.0 / (T * expected[np.asarray(t)]), rtol=1e-5)
    np.testing.assert_allclose(np.bincount(np.asarray(t), minlength=T) / 20000, expected, atol=0.012)
    # Importance weights keep the estimate unbiased: E_p[w L] = mean_t L.
    np.testing.assert_allclose(float(jnp.mean(w * losses[np.asarray(t)])), losses.mean(), rtol=0.03)


def test_history_rolls_and_keeps_the_newest_losses_in_order():
    sampler = ddm.loss_second_moment_sampler(T, history_per_term=3)
    state = sampler.update(sampler.init(), jnp.full((5,), 4), jnp.arange(5.0))
    np.testing.assert_array_equal(state["history"][4], [2.0, 3.0, 4.0])
    assert int(state["counts"][4]) == 3
    np.testing.assert_array_equal(state["history"][3], 0.0)


def test_update_under_pmap_gives_every_replica_the_same_state():
    assert jax.local_device_count() == 2
    sampler = ddm.loss_second_moment_sampler(T, history_per_term=2)
    t = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    losses = jnp.arange(16.0).reshape(2, 8)

    def step(state, t, losses):
        all_t = jax.lax.all_gather(t, "devices").reshape(-1)
        all_losses = jax.lax.all_gather(losses, "devices").reshape(-1)
        state = sampler.update(state, all_t, all_losses)
        return state, sampler.sample(state, jax.random.PRNGKey(0), 4)

    states = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), sampler.init())
    new, (ts, _) = jax.pmap(step, axis_name="devices")(states, t, losses)
    single = sampler.update(sampler.init(), t.reshape(-1), losses.reshape(-1))
    for replica in range(2):
        np.testing.assert_array_equal(new["history"][replica], single["history"])
    np.testing.assert_array_equal(ts[0], ts[1])


def test_unknown_sampler():
    with pytest.raises(ValueError, match=r"unknown timestep sampler='importance'; allowed: 'uniform', 'loss_second_moment'"):
        ddm.get_timestep_sampler("importance", T)
