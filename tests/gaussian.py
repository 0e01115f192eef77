"""The exact denoiser of 1-D Gaussian data x0 ~ N(mu, s^2) per pixel, for closed-form tests.

x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is jointly Gaussian with eps, so
E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab) and
Var[eps | x_t] = ab s^2 / (ab s^2 + 1 - ab).
"""
import jax.numpy as jnp
import numpy as np

MU, S = 0.2, 0.3


def eps_model(alphas_cumprod, mu=MU, s=S):
    """model_fn(x, t) returning E[eps | x_t] under the schedule's alpha-bar (indexed by original t)."""
    ab_all = jnp.asarray(alphas_cumprod, jnp.float32)

    def model_fn(x, t):
        ab = ab_all[t].reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sqrt(1.0 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * s ** 2 + 1.0 - ab)

    return model_fn


def expected_mse(alphas_cumprod, mu=MU, s=S):
    """E||eps - E[eps | x_t]||^2 per dimension at each t (the closed-form L_simple)."""
    ab = np.asarray(alphas_cumprod, np.float64)
    return ab * s ** 2 / (ab * s ** 2 + 1.0 - ab)
