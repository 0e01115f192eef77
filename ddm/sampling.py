"""Samplers, each one ``lax.scan`` over timesteps: DDPM ancestral, DDIM (any eta), DDIM encoding
and reconstruction, slerp interpolation in x_T, and progressive generation.

``model_fn(x, t)`` is any function of a batch x (B, H, W, C) and original timestep indices t (B,);
compose these functions with ``jax.jit`` (model_fn closed over its parameters) to compile the whole
loop once. Timesteps below are the diffusion's own (respaced) indices; the model still receives the
original ones through ``diffusion.timestep_map``.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddm.diffusion import Diffusion, ModelFn, call_model, extract, p_mean_variance, pred_eps_from_x0


def ddpm_step(diffusion: Diffusion, model_fn: ModelFn, x, t, key, clip_denoised: bool = True):
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t = 0). Returns (x_{t-1}, pred_x0)."""
    tb = jnp.full(x.shape[:1], t, dtype=jnp.int32)
    out = p_mean_variance(diffusion, call_model(diffusion, model_fn, x, tb), x, tb, clip_denoised)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return out["mean"] + (t != 0) * jnp.exp(0.5 * out["log_variance"]) * noise, out["pred_x0"]


def ddim_step(diffusion: Diffusion, model_fn: ModelFn, x, t, key, eta: float = 0.0, clip_denoised: bool = True):
    """One DDIM step (DDIM eq. 12): x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev).

    eps is re-derived from the (clipped) predicted x0, as improved-diffusion does; ab_prev at the
    last step is 1, so the final step lands on x0. Returns (x_{t-1}, pred_x0).
    """
    tb = jnp.full(x.shape[:1], t, dtype=jnp.int32)
    out = p_mean_variance(diffusion, call_model(diffusion, model_fn, x, tb), x, tb, clip_denoised)
    eps = pred_eps_from_x0(diffusion, x, tb, out["pred_x0"])
    ab = extract(diffusion.alphas_cumprod, tb, x)
    ab_prev = extract(diffusion.alphas_cumprod_prev, tb, x)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    mean = jnp.sqrt(ab_prev) * out["pred_x0"] + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma ** 2, 0.0)) * eps
    noise = jax.random.normal(key, x.shape, x.dtype)
    return mean + (t != 0) * sigma * noise, out["pred_x0"]


def ddim_reverse_step(diffusion: Diffusion, model_fn: ModelFn, x, t, clip_denoised: bool = True):
    """One deterministic DDIM step forward in time, x_t -> x_{t+1} (improved-diffusion's
    ``ddim_reverse_sample``): x_{t+1} = sqrt(ab_next) x0 + sqrt(1 - ab_next) eps. Returns (x_{t+1}, pred_x0)."""
    tb = jnp.full(x.shape[:1], t, dtype=jnp.int32)
    out = p_mean_variance(diffusion, call_model(diffusion, model_fn, x, tb), x, tb, clip_denoised)
    eps = pred_eps_from_x0(diffusion, x, tb, out["pred_x0"])
    ab_next = extract(diffusion.alphas_cumprod_next, tb, x)
    return jnp.sqrt(ab_next) * out["pred_x0"] + jnp.sqrt(1.0 - ab_next) * eps, out["pred_x0"]


def scan_steps(step, x, timesteps: np.ndarray, key, record_steps: Optional[Sequence[int]] = None):
    """x <- step(x, t, fold_in(key, t)) for t in ``timesteps``, as one ``lax.scan``.

    With ``record_steps`` (timesteps, each in ``timesteps``) also returns a dict of the state
    ``x_t`` entering each recorded step and the ``pred_x0`` made there, each (K, *x.shape), plus
    ``t`` (K,): progressive generation from the same scan body.
    """
    timesteps = np.asarray(timesteps, dtype=np.int32)
    record = np.asarray([] if record_steps is None else record_steps, dtype=np.int32)
    missing = sorted(set(record.tolist()) - set(timesteps.tolist()))
    if missing:
        raise ValueError(f"record_steps {missing} are not among the steps this loop runs "
                         f"({timesteps.min()}..{timesteps.max()})")
    slot = np.full(timesteps.shape, -1, dtype=np.int32)
    for k, t in enumerate(record.tolist()):
        slot[timesteps == t] = k
    buffers = {"x_t": jnp.zeros((len(record),) + x.shape, x.dtype),
               "pred_x0": jnp.zeros((len(record),) + x.shape, x.dtype)}

    def body(carry, inputs):
        x, buffers = carry
        t, k = inputs
        x_next, pred_x0 = step(x, t, jax.random.fold_in(key, t))
        if len(record):
            i = jnp.maximum(k, 0)
            write = lambda buf, value: buf.at[i].set(jnp.where(k >= 0, value, buf[i]))
            buffers = {"x_t": write(buffers["x_t"], x), "pred_x0": write(buffers["pred_x0"], pred_x0)}
        return (x_next, buffers), None

    (x, buffers), _ = jax.lax.scan(body, (x, buffers), (jnp.asarray(timesteps), jnp.asarray(slot)))
    if record_steps is None:
        return x
    return x, dict(buffers, t=record)


def _start(diffusion: Diffusion, key, shape, x_T, t_start):
    """The loop's start (x_T or fresh N(0, I) noise), its key, and its descending timesteps."""
    t_start = diffusion.num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < diffusion.num_timesteps:
        raise ValueError(f"t_start={t_start} out of range [0, {diffusion.num_timesteps - 1}]")
    noise_key, loop_key = jax.random.split(key)
    if x_T is None:
        x_T = jax.random.normal(noise_key, tuple(shape), jnp.float32)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)}")
    return x_T, loop_key, np.arange(t_start, -1, -1)


def ddpm_sample(diffusion: Diffusion, model_fn: ModelFn, key, shape, x_T=None, clip_denoised: bool = True,
                record_steps=None, t_start: Optional[int] = None):
    """DDPM ancestral sampling (DDPM Algorithm 2) from x_T ~ N(0, I) of ``shape`` (or the given x_T).

    ``t_start`` starts the chain at that step with x_T as x_{t_start} (DDPM's interpolation at a
    chosen t). With ``record_steps`` returns (x0, progressive dict), see ``scan_steps``.
    """
    x, key, timesteps = _start(diffusion, key, shape, x_T, t_start)
    step = lambda x, t, k: ddpm_step(diffusion, model_fn, x, t, k, clip_denoised)
    return scan_steps(step, x, timesteps, key, record_steps)


def ddim_sample(diffusion: Diffusion, model_fn: ModelFn, key, shape, eta: float = 0.0, x_T=None,
                clip_denoised: bool = True, record_steps=None, t_start: Optional[int] = None):
    """DDIM sampling over the diffusion's (respaced) steps; eta = 0 is deterministic, eta = 1 has the
    DDPM posterior variance. Arguments as ``ddpm_sample``."""
    if not isinstance(eta, jax.core.Tracer) and eta < 0:
        raise ValueError(f"eta must be >= 0, got eta={eta}")
    x, key, timesteps = _start(diffusion, key, shape, x_T, t_start)
    step = lambda x, t, k: ddim_step(diffusion, model_fn, x, t, k, eta, clip_denoised)
    return scan_steps(step, x, timesteps, key, record_steps)


def ddim_encode(diffusion: Diffusion, model_fn: ModelFn, x0, clip_denoised: bool = True):
    """Deterministic DDIM inversion: run the probability-flow ODE forward from x0 to x_T."""
    step = lambda x, t, k: ddim_reverse_step(diffusion, model_fn, x, t, clip_denoised)
    return scan_steps(step, x0, np.arange(diffusion.num_timesteps), jax.random.PRNGKey(0))


def ddim_reconstruct(diffusion: Diffusion, model_fn: ModelFn, x0, clip_denoised: bool = True):
    """Encode x0 to x_T with DDIM, decode it back with eta = 0. Returns (x_T, reconstruction)."""
    x_T = ddim_encode(diffusion, model_fn, x0, clip_denoised)
    return x_T, ddim_sample(diffusion, model_fn, jax.random.PRNGKey(0), x0.shape, 0.0, x_T, clip_denoised)


def slerp(z0, z1, alpha):
    """Spherical interpolation between z0 and z1 (same shape) at fraction ``alpha`` in [0, 1]:
    sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1, theta the angle between them.
    Falls back to linear interpolation when the vectors are (nearly) parallel."""
    cos_theta = jnp.sum(z0 * z1) / (jnp.linalg.norm(z0) * jnp.linalg.norm(z1))
    theta = jnp.arccos(jnp.clip(cos_theta, -1.0, 1.0))
    safe = jnp.sin(theta) > 1e-6
    sin_theta = jnp.where(safe, jnp.sin(theta), 1.0)
    w0 = jnp.where(safe, jnp.sin((1.0 - alpha) * theta) / sin_theta, 1.0 - alpha)
    w1 = jnp.where(safe, jnp.sin(alpha * theta) / sin_theta, alpha)
    return w0 * z0 + w1 * z1


def interpolate(diffusion: Diffusion, model_fn: ModelFn, x_T0, x_T1, alphas, clip_denoised: bool = True):
    """DDIM's interpolation (DDIM Fig. 6): decode slerp(x_T0, x_T1, a) for each a in ``alphas``
    with eta = 0. x_T0 and x_T1 have shape (H, W, C); returns (len(alphas), H, W, C)."""
    alphas = jnp.asarray(alphas, jnp.float32)
    x_T = jax.vmap(lambda a: slerp(x_T0, x_T1, a))(alphas)
    return ddim_sample(diffusion, model_fn, jax.random.PRNGKey(0), x_T.shape, 0.0, x_T, clip_denoised)
