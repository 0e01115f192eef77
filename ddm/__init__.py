"""ddm: denoising diffusion models (DDPM, improved DDPM, DDIM) in JAX.

The public API (see DESIGN.md) is importable from here; each name lives in the module of its concept.
"""
from ddm import xla_cpu

xla_cpu.apply()  # before any JAX computation: XLA reads XLA_FLAGS when its CPU backend starts

from ddm.diffusion import (Diffusion, make_diffusion, p_mean_variance, pred_eps_from_x0, pred_x0_from_eps,
                           pred_x0_from_mu, pred_x0_from_v, q_mean_variance, q_posterior, q_sample, v_target)
from ddm.likelihood import bits_per_dim, prior_bpd
from ddm.losses import (discretized_gaussian_log_likelihood, normal_kl, training_losses, vb_terms_bpd)
from ddm.respacing import respace, space_timesteps
from ddm.sampling import (ddim_encode, ddim_reconstruct, ddim_sample, ddpm_sample, interpolate, scan_steps,
                          slerp)
from ddm.schedules import get_betas
from ddm.timestep_sampling import (TimestepSampler, get_timestep_sampler, loss_second_moment_sampler,
                                   uniform_sampler)
