"""The Gaussian diffusion of DDPM / IDDPM / DDIM as one immutable pytree and pure functions over it.

Conventions (see DESIGN.md): images are NHWC float32 in [-1, 1]; timesteps are 0-based int32
(``t = 0`` is the papers' t = 1); schedule arrays are computed in float64 and stored as float32.
Where the papers leave a choice, improved-diffusion's convention is followed and noted.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

MEAN_TYPES = ("eps", "x0", "mu", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "hybrid", "kl", "rescaled_kl")
LEARNED_VAR_TYPES = ("learned", "learned_range")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_choice(argument: str, value: Any, allowed: tuple) -> None:
    """Raise a ValueError naming ``argument``, its bad ``value`` and the ``allowed`` values."""
    if value not in allowed:
        raise ValueError(f"unknown {argument}={value!r}; allowed: {', '.join(map(repr, allowed))}")


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """Every precomputed array of a diffusion with T steps, each of shape (T,).

    A pytree: the arrays are leaves, the three type strings are static metadata, so a Diffusion
    passes through ``jit``, ``pmap`` and ``lax.scan`` as an ordinary argument.
    ``timestep_map[t]`` is the original timestep index the model is called with (identity unless
    the diffusion was respaced).
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    fixed_large_variance: jax.Array
    fixed_large_log_variance: jax.Array
    timestep_map: jax.Array
    mean_type: str = "eps"
    var_type: str = "fixed_small"
    loss_type: str = "mse"

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def learned_variance(self) -> bool:
        return self.var_type in LEARNED_VAR_TYPES


_META_FIELDS = ("mean_type", "var_type", "loss_type")
jax.tree_util.register_dataclass(
    Diffusion,
    data_fields=[f.name for f in dataclasses.fields(Diffusion) if f.name not in _META_FIELDS],
    meta_fields=list(_META_FIELDS),
)


def make_diffusion(betas, mean_type: str = "eps", var_type: str = "fixed_small",
                   loss_type: str = "mse", timestep_map=None) -> Diffusion:
    """Precompute every array of the diffusion with the given betas (any 1-D array, float64 math).

    mean_type: what the model predicts: "eps" (the noise), "x0", "mu" (the posterior mean
      directly, DDPM's mu-parameterisation) or "v" (sqrt(ab) eps - sqrt(1 - ab) x0).
    var_type: "fixed_small" (posterior beta-tilde), "fixed_large" (beta, with beta-tilde at t = 0
      as improved-diffusion does), "learned" (the model outputs log-variance) or "learned_range"
      (IDDPM: the model outputs v in [-1, 1] interpolating log beta and log beta-tilde).
    loss_type: "mse" (L_simple), "hybrid" (L_simple + 0.001 L_vlb, stop-gradient on the mean; needs a
      learned variance), "kl" (L_vlb) or "rescaled_kl" (L_vlb scaled by T, IDDPM's rescaled KL).
    timestep_map: original timestep indices the model is called with (set by ``respace``).
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if loss_type == "hybrid" and var_type not in LEARNED_VAR_TYPES:
        raise ValueError(f"loss_type='hybrid' trains the variance through L_vlb and needs var_type in "
                         f"{LEARNED_VAR_TYPES}, got var_type={var_type!r}; use loss_type='mse' for a fixed variance")
    if loss_type == "mse" and var_type in LEARNED_VAR_TYPES:
        raise ValueError(f"loss_type='mse' gives no gradient to a learned variance (var_type={var_type!r}); "
                         "use loss_type='hybrid', 'kl' or 'rescaled_kl'")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be a 1-D array of T >= 2 values, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError(f"betas must lie in (0, 1); got min {betas.min()}, max {betas.max()}")
    num_timesteps = betas.shape[0]
    if timestep_map is None:
        timestep_map = np.arange(num_timesteps)
    timestep_map = np.asarray(timestep_map)
    if timestep_map.shape != (num_timesteps,):
        raise ValueError(f"timestep_map must have shape ({num_timesteps},), got {timestep_map.shape}")

    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    ab_next = np.append(ab[1:], 0.0)
    posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    # beta-tilde_0 = 0: improved-diffusion clips the log at t = 0 by reusing the t = 1 value.
    posterior_variance_clipped = np.append(posterior_variance[1], posterior_variance[1:])
    fixed_large_variance = np.append(posterior_variance[1], betas[1:])
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Diffusion(
        betas=f32(betas),
        log_betas=f32(np.log(betas)),
        alphas_cumprod=f32(ab),
        alphas_cumprod_prev=f32(ab_prev),
        alphas_cumprod_next=f32(ab_next),
        sqrt_alphas_cumprod=f32(np.sqrt(ab)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ab)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ab - 1.0)),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(np.log(posterior_variance_clipped)),
        posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
        posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
        fixed_large_variance=f32(fixed_large_variance),
        fixed_large_log_variance=f32(np.log(fixed_large_variance)),
        timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
    )


def check_timesteps(diffusion: Diffusion, t) -> None:
    """Raise a ValueError if concrete timesteps ``t`` fall outside [0, T); traced values pass."""
    if isinstance(t, jax.core.Tracer):
        return
    t = np.asarray(t)
    if t.size and (t.min() < 0 or t.max() >= diffusion.num_timesteps):
        raise ValueError(f"t out of range: got values in [{t.min()}, {t.max()}], allowed "
                         f"[0, {diffusion.num_timesteps - 1}] (0-based, T = {diffusion.num_timesteps})")


def extract(a: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """``a[t]`` for a batch of timesteps t of shape (B,), shaped to broadcast against x (B, ...)."""
    return jnp.take(a, t).reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def call_model(diffusion: Diffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """Call the model at x_t with the original timestep indices of t (the respacing map)."""
    return model_fn(x, jnp.take(diffusion.timestep_map, t))


def q_mean_variance(diffusion: Diffusion, x0, t):
    """(mean, variance, log_variance) of q(x_t | x_0) = N(sqrt(ab_t) x0, (1 - ab_t) I)."""
    mean = extract(diffusion.sqrt_alphas_cumprod, t, x0) * x0
    variance = extract(1.0 - diffusion.alphas_cumprod, t, x0)
    log_variance = jnp.log(variance)
    return mean, variance, log_variance


def q_sample(diffusion: Diffusion, x0, t, noise):
    """Forward noising: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    check_timesteps(diffusion, t)
    return (extract(diffusion.sqrt_alphas_cumprod, t, x0) * x0
            + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior(diffusion: Diffusion, x0, xt, t):
    """(mean, variance, log_variance) of the true posterior q(x_{t-1} | x_t, x_0).

    mean = coef1_t x0 + coef2_t x_t, variance = beta-tilde_t; the log-variance is clipped at t = 0
    (where beta-tilde is 0) to its t = 1 value, as improved-diffusion does.
    """
    check_timesteps(diffusion, t)
    mean = extract(diffusion.posterior_mean_coef1, t, xt) * x0 + extract(diffusion.posterior_mean_coef2, t, xt) * xt
    variance = extract(diffusion.posterior_variance, t, xt)
    log_variance = extract(diffusion.posterior_log_variance_clipped, t, xt)
    return mean, variance, log_variance


def pred_x0_from_eps(diffusion: Diffusion, xt, t, eps):
    """x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
    return extract(diffusion.sqrt_recip_alphas_cumprod, t, xt) * xt - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, xt) * eps


def pred_eps_from_x0(diffusion: Diffusion, xt, t, x0):
    """eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)."""
    return ((extract(diffusion.sqrt_recip_alphas_cumprod, t, xt) * xt - x0)
            / extract(diffusion.sqrt_recipm1_alphas_cumprod, t, xt))


def pred_x0_from_mu(diffusion: Diffusion, xt, t, mu):
    """Invert the posterior mean: x0 = (mu - coef2_t x_t) / coef1_t."""
    return (mu - extract(diffusion.posterior_mean_coef2, t, xt) * xt) / extract(diffusion.posterior_mean_coef1, t, xt)


def pred_x0_from_v(diffusion: Diffusion, xt, t, v):
    """x0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v (Salimans & Ho's v-parameterisation)."""
    return extract(diffusion.sqrt_alphas_cumprod, t, xt) * xt - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, xt) * v


def v_target(diffusion: Diffusion, x0, t, noise):
    """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
    return extract(diffusion.sqrt_alphas_cumprod, t, x0) * noise - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def split_model_output(diffusion: Diffusion, model_output, xt):
    """(mean part, variance part or None) of a model output, checking its channel count."""
    channels = xt.shape[-1]
    expected = 2 * channels if diffusion.learned_variance else channels
    if model_output.shape[-1] != expected:
        raise ValueError(f"model output has {model_output.shape[-1]} channels; var_type={diffusion.var_type!r} "
                         f"with {channels}-channel images needs {expected} "
                         f"({'[mean | variance]' if diffusion.learned_variance else 'the mean part only'})")
    if diffusion.learned_variance:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def model_variance(diffusion: Diffusion, var_output, xt, t):
    """(variance, log_variance) of p(x_{t-1} | x_t) for the diffusion's var_type."""
    if diffusion.var_type == "learned":
        log_variance = var_output
    elif diffusion.var_type == "learned_range":
        min_log = extract(diffusion.posterior_log_variance_clipped, t, xt)
        max_log = extract(diffusion.log_betas, t, xt)
        frac = (var_output + 1.0) / 2.0  # the model's v in [-1, 1] mapped to [0, 1]
        log_variance = frac * max_log + (1.0 - frac) * min_log
    elif diffusion.var_type == "fixed_large":
        log_variance = jnp.broadcast_to(extract(diffusion.fixed_large_log_variance, t, xt), xt.shape)
    else:
        log_variance = jnp.broadcast_to(extract(diffusion.posterior_log_variance_clipped, t, xt), xt.shape)
    return jnp.exp(log_variance), log_variance


def p_mean_variance(diffusion: Diffusion, model_output, xt, t, clip_denoised: bool = True):
    """The reverse step p(x_{t-1} | x_t) from a model output at (x_t, t).

    Returns a dict with ``mean``, ``variance``, ``log_variance`` and ``pred_x0`` (all shaped like
    x_t). With ``clip_denoised`` the predicted x0 is clipped to [-1, 1] before the posterior mean is
    formed; for mean_type "mu" the model's mean is used as is and only pred_x0 is clipped.
    """
    check_timesteps(diffusion, t)
    mean_output, var_output = split_model_output(diffusion, model_output, xt)
    variance, log_variance = model_variance(diffusion, var_output, xt, t)
    clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip_denoised else (lambda x: x)
    if diffusion.mean_type == "mu":
        pred_x0 = clip(pred_x0_from_mu(diffusion, xt, t, mean_output))
        mean = mean_output
    else:
        to_x0 = {"eps": pred_x0_from_eps, "v": pred_x0_from_v, "x0": lambda d, x, t, o: o}[diffusion.mean_type]
        pred_x0 = clip(to_x0(diffusion, xt, t, mean_output))
        mean, _, _ = q_posterior(diffusion, pred_x0, xt, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}
