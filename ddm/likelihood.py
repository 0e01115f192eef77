"""The variational bound in bits/dim: the prior term, and all T terms of a batch in one scan."""
import math

import jax
import jax.numpy as jnp

from ddm.diffusion import Diffusion, ModelFn, call_model, pred_eps_from_x0, q_mean_variance, q_sample
from ddm.losses import mean_flat, normal_kl, vb_terms_bpd


def prior_bpd(diffusion: Diffusion, x0):
    """KL(q(x_T | x0) || N(0, I)) per example, in bits/dim (the L_T term; no parameters)."""
    t = jnp.full(x0.shape[:1], diffusion.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(diffusion, x0, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def bits_per_dim(diffusion: Diffusion, model_fn: ModelFn, x0, key, clip_denoised: bool = True):
    """The full variational bound of x0 (B, H, W, C) in bits/dim: prior + every term t = T-1..0.

    One ``lax.scan`` over t evaluates the model once per step on x_t ~ q(x_t | x0). On a respaced
    diffusion this is IDDPM's strided bound. Returns a dict of per-example arrays:
    ``total_bpd`` (B,), ``prior_bpd`` (B,), and per-t ``vb`` (B, T), ``x0_mse`` (B, T),
    ``eps_mse`` (B, T), indexed by t (column 0 is the decoder NLL).
    """
    batch = x0.shape[0]

    def term(_, t):
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)
        tb = jnp.full((batch,), t, dtype=jnp.int32)
        xt = q_sample(diffusion, x0, tb, noise)
        model_output = call_model(diffusion, model_fn, xt, tb)
        vb = vb_terms_bpd(diffusion, model_output, x0, xt, tb, clip_denoised=clip_denoised)
        eps = pred_eps_from_x0(diffusion, xt, tb, vb["pred_x0"])
        return None, (vb["output"], mean_flat((vb["pred_x0"] - x0) ** 2), mean_flat((eps - noise) ** 2))

    ts = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, x0_mse, eps_mse) = jax.lax.scan(term, None, ts)
    # The scan ran t = T-1..0; flip to index by t and put the batch first.
    vb, x0_mse, eps_mse = (jnp.flip(a, axis=0).T for a in (vb, x0_mse, eps_mse))
    prior = prior_bpd(diffusion, x0)
    return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb, "x0_mse": x0_mse, "eps_mse": eps_mse}
