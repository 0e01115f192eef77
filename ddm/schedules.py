"""Noise schedules beta_1..beta_T, computed in float64 NumPy.

Timesteps are 0-based: ``betas[t]`` is the papers' beta_{t+1}.
"""
import math

import numpy as np

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, 1e-4 to 0.02 for T = 1000, scaled by 1000 / T as IDDPM does.

    The scaling keeps the total noise added comparable when T differs from 1000.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
    """IDDPM's f(u) = cos^2(((u + s) / (1 + s)) * pi / 2) for u = t / T in [0, 1] (unnormalised alpha-bar)."""
    return np.cos((np.asarray(u, np.float64) + s) / (1.0 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule: beta_t = 1 - f(t / T) / f((t - 1) / T), clipped at ``max_beta``.

    The clip avoids the singularity at the end of the diffusion, where f -> 0.
    """
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = cosine_alpha_bar(u, s)
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The float64 betas of the schedule called ``name`` ("linear" or "cosine") with T = ``num_timesteps``."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if name == "linear":
        if num_timesteps <= 20:  # beta_T = 0.02 * 1000 / T reaches 1
            raise ValueError(f"the linear schedule scaled by 1000 / T needs num_timesteps > 20 (its last beta "
                             f"is 20 / T), got {num_timesteps}; use more steps, or 'cosine', or respace")
        return linear_betas(int(num_timesteps))
    if name == "cosine":
        return cosine_betas(int(num_timesteps))
    raise ValueError(f"unknown schedule name={name!r}; allowed: {', '.join(map(repr, SCHEDULES))}")
