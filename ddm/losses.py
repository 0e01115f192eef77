"""Training objectives: L_simple, L_vlb (KL terms and the discretized decoder), L_hybrid.

All per-example losses are means over pixels (``mean_flat``); VLB terms are in bits per dimension.
"""
import math

import jax
import jax.numpy as jnp

from ddm.diffusion import (Diffusion, ModelFn, call_model, check_timesteps, p_mean_variance, q_posterior, q_sample,
                           split_model_output, v_target)

HYBRID_LAMBDA = 0.001  # IDDPM's weight of L_vlb in L_hybrid


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first (batch) one."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that DDPM and improved-diffusion use."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) in nats, elementwise, of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2).

    Each of the 256 values owns a bin of width 2/255 centred on it; the edge bins are open
    (x = -1 takes all mass below -1 + 1/255, x = 1 all mass above 1 - 1/255), so the 256
    probabilities of a pixel sum to 1. Log-probabilities are clamped at log(1e-12).
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion: Diffusion, model_output, x0, xt, t, clip_denoised: bool = False):
    """Per-example bits/dim of one VLB term: the decoder NLL -log p(x0 | x1) at t = 0, else
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)).

    Returns a dict with ``output`` (B,) and the ``pred_x0`` the model implied.
    """
    true_mean, _, true_log_variance = q_posterior(diffusion, x0, xt, t)
    out = p_mean_variance(diffusion, model_output, xt, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
    return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_x0": out["pred_x0"]}


def mse_target(diffusion: Diffusion, x0, xt, t, noise):
    """What the model's mean part regresses onto under L_simple, by mean_type."""
    if diffusion.mean_type == "eps":
        return noise
    if diffusion.mean_type == "x0":
        return x0
    if diffusion.mean_type == "v":
        return v_target(diffusion, x0, t, noise)
    return q_posterior(diffusion, x0, xt, t)[0]


def training_losses(diffusion: Diffusion, model_fn: ModelFn, x0, t, noise):
    """Per-example training losses at timesteps t (B,) with the given noise, by loss_type.

    "mse": loss = mse, the mean-flat squared error to the mean_type's target (L_simple).
    "hybrid": loss = mse + vb * T * 0.001, the VLB term computed with a stop-gradient on the mean
      output, so it trains only the variance (IDDPM's L_hybrid; T * L_t estimates L_vlb).
    "kl" / "rescaled_kl": loss = vb (L_t in bits/dim), times T for "rescaled_kl".
    Returns a dict of (B,) arrays: ``loss``, and ``mse`` / ``vb`` where they apply.
    """
    check_timesteps(diffusion, t)
    xt = q_sample(diffusion, x0, t, noise)
    model_output = call_model(diffusion, model_fn, xt, t)
    num_timesteps = diffusion.num_timesteps
    if diffusion.loss_type in ("kl", "rescaled_kl"):
        vb = vb_terms_bpd(diffusion, model_output, x0, xt, t)["output"]
        scale = num_timesteps if diffusion.loss_type == "rescaled_kl" else 1.0
        return {"loss": vb * scale, "vb": vb}
    mean_output, var_output = split_model_output(diffusion, model_output, xt)
    mse = mean_flat((mse_target(diffusion, x0, xt, t, noise) - mean_output) ** 2)
    if diffusion.loss_type == "mse":
        return {"loss": mse, "mse": mse}
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
    vb = vb_terms_bpd(diffusion, frozen, x0, xt, t)["output"]
    return {"loss": mse + HYBRID_LAMBDA * num_timesteps * vb, "mse": mse, "vb": vb}
