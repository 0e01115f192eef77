"""Timestep samplers for training: uniform, and IDDPM's loss-second-moment importance sampler.

Each sampler is pure: ``init() -> state``, ``sample(state, key, batch_size) -> (t, weights)`` and
``update(state, t, losses) -> state``, with the state a pytree. Losses are reweighted by
``weights`` = 1 / (T p_t), so the weighted loss stays an unbiased estimate of the uniform one.
Under ``pmap`` give ``update`` every device's pairs (``lax.all_gather`` of t and losses) so all
replicas hold the same state.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddm.diffusion import check_choice

TIMESTEP_SAMPLERS = ("uniform", "loss_second_moment")


class TimestepSampler(NamedTuple):
    init: Callable[[], Any]
    sample: Callable[[Any, jax.Array, int], tuple]
    update: Callable[[Any, jax.Array, jax.Array], Any]


def sample_from_probs(probs, key, batch_size: int):
    """t ~ probs (T,) and importance weights 1 / (T p_t), both of shape (batch_size,)."""
    t = jax.random.categorical(key, jnp.log(probs), shape=(batch_size,)).astype(jnp.int32)
    return t, 1.0 / (probs.shape[0] * probs[t])


def uniform_sampler(num_timesteps: int) -> TimestepSampler:
    """t uniform on [0, T), weights 1. The state is empty."""
    probs = jnp.full((num_timesteps,), 1.0 / num_timesteps, dtype=jnp.float32)
    return TimestepSampler(
        init=lambda: {},
        sample=lambda state, key, batch_size: sample_from_probs(probs, key, batch_size),
        update=lambda state, t, losses: state,
    )


def loss_second_moment_probs(state, uniform_prob: float = 0.001):
    """IDDPM's p_t: uniform until every t has a full history, then proportional to
    sqrt(E[L_t^2]) over the history, mixed with ``uniform_prob`` of the uniform distribution."""
    num_timesteps = state["counts"].shape[0]
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, dtype=jnp.float32)
    rms = jnp.sqrt(jnp.mean(state["history"] ** 2, axis=-1))
    probs = rms / jnp.sum(rms) * (1.0 - uniform_prob) + uniform_prob / num_timesteps
    warmed_up = jnp.all(state["counts"] == state["history"].shape[-1])
    return jnp.where(warmed_up, probs, uniform)


def update_loss_history(state, t, losses):
    """Append each (t_i, loss_i) in order to t_i's history, dropping its oldest loss when full."""
    history_per_term = state["history"].shape[-1]

    def push(state, pair):
        t, loss = pair
        row, count = state["history"][t], state["counts"][t]
        shifted = jnp.append(row[1:], loss)
        row = jnp.where(count == history_per_term, shifted, row.at[jnp.minimum(count, history_per_term - 1)].set(loss))
        return {"history": state["history"].at[t].set(row),
                "counts": state["counts"].at[t].set(jnp.minimum(count + 1, history_per_term))}, None

    pairs = (jnp.ravel(t).astype(jnp.int32), jnp.ravel(losses).astype(jnp.float32))
    return jax.lax.scan(push, state, pairs)[0]


def loss_second_moment_sampler(num_timesteps: int, history_per_term: int = 10,
                               uniform_prob: float = 0.001) -> TimestepSampler:
    """IDDPM's importance sampler over a history of ``history_per_term`` losses per timestep."""
    def init():
        return {"history": jnp.zeros((num_timesteps, history_per_term), jnp.float32),
                "counts": jnp.zeros((num_timesteps,), jnp.int32)}

    def sample(state, key, batch_size):
        return sample_from_probs(loss_second_moment_probs(state, uniform_prob), key, batch_size)

    return TimestepSampler(init=init, sample=sample, update=update_loss_history)


def get_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    """The sampler called ``name``: "uniform" or "loss_second_moment"."""
    check_choice("timestep sampler", name, TIMESTEP_SAMPLERS)
    if name == "uniform":
        return uniform_sampler(num_timesteps)
    return loss_second_moment_sampler(num_timesteps)
