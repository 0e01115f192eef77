"""KL, the discretized decoder, L_simple / L_vlb / L_hybrid and the bound in bits/dim."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddm
from ddm.losses import approx_standard_normal_cdf
from tests.gaussian import MU, S, eps_model, expected_mse

T = 100


def test_kl_of_equal_gaussians_is_zero_and_matches_closed_form():
    m, lv = jnp.array([0.3, -2.0]), jnp.array([0.1, -3.0])
    np.testing.assert_allclose(ddm.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)
    # KL(N(0, 1) || N(1, 4)) = log 2 + (1 + 1) / 8 - 1/2
    np.testing.assert_allclose(ddm.normal_kl(0.0, 0.0, 1.0, math.log(4.0)), math.log(2) + 0.25 - 0.5, rtol=1e-6)


def test_approx_cdf_is_close_to_erf():
    x = np.linspace(-5, 5, 101)
    exact = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(approx_standard_normal_cdf(jnp.asarray(x)), exact, atol=5e-4)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.7, -5.0), (-1.2, 0.0), (0.99, -1.0)])
def test_decoder_probabilities_over_256_values_sum_to_one(mean, log_scale):
    x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    log_p = ddm.discretized_gaussian_log_likelihood(x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
    np.testing.assert_allclose(float(jnp.exp(log_p).sum()), 1.0, atol=1e-5)
    assert np.all(np.asarray(log_p) <= 0)


def test_lsimple_of_exact_gaussian_model_equals_closed_form():
    d = ddm.make_diffusion(ddm.get_betas("cosine", T))
    key = jax.random.PRNGKey(0)
    ts = jnp.array([0, 10, 50, 90, 99])
    n = 512
    x0 = MU + S * jax.random.normal(key, (len(ts) * n, 8, 8, 1))
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.repeat(ts, n)
    mse = ddm.training_losses(d, eps_model(d.alphas_cumprod), x0, t, noise)["mse"].reshape(len(ts), n).mean(1)
    np.testing.assert_allclose(mse, expected_mse(d.alphas_cumprod)[np.asarray(ts)], rtol=0.02)


def output_model(params):
    """A 'model' whose output is a parameter array (mean part | variance part) regardless of input."""
    return lambda x, t: jnp.concatenate([params["mean"], params["var"]], axis=-1)


def test_hybrid_gradient_reaches_variance_but_not_mean_through_vlb():
    d = ddm.make_diffusion(ddm.get_betas("cosine", T), "eps", "learned_range", "hybrid")
    shape = (4, 4, 4, 3)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"mean": 0.1 * jax.random.normal(keys[0], shape), "var": 0.1 * jax.random.normal(keys[1], shape)}
    x0 = jax.random.uniform(keys[2], shape, minval=-1, maxval=1)
    noise = jax.random.normal(keys[3], shape)
    t = jnp.array([0, 3, 50, 99])

    def part(name):
        return lambda p: ddm.training_losses(d, output_model(p), x0, t, noise)[name].sum()

    g_loss, g_mse, g_vb = (jax.jit(jax.grad(part(n)))(params) for n in ("loss", "mse", "vb"))
    np.testing.assert_array_equal(g_vb["mean"], 0.0)
    assert float(jnp.abs(g_vb["var"]).sum()) > 0
    np.testing.assert_allclose(g_loss["mean"], g_mse["mean"], rtol=1e-6)
    np.testing.assert_allclose(g_loss["var"], 0.001 * T * g_vb["var"], rtol=1e-4, atol=1e-9)
    losses = [jax.jit(part(n))(params) for n in ("loss", "mse", "vb")]
    np.testing.assert_allclose(losses[0], losses[1] + 0.001 * T * losses[2], rtol=1e-5)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v", "mu"])
def test_mse_targets_give_zero_loss_for_exact_outputs(mean_type):
    d = ddm.make_diffusion(ddm.get_betas("linear", T), mean_type)
    key = jax.random.PRNGKey(3)
    x0 = jax.random.uniform(key, (4, 4, 4, 2), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
    t = jnp.array([0, 1, 50, 99])
    xt = ddm.q_sample(d, x0, t, noise)
    target = {"eps": noise, "x0": x0, "v": ddm.v_target(d, x0, t, noise), "mu": ddm.q_posterior(d, x0, xt, t)[0]}[mean_type]
    losses = ddm.training_losses(d, lambda x, tt: target, x0, t, noise)
    np.testing.assert_allclose(losses["mse"], 0.0, atol=1e-10)
    np.testing.assert_array_equal(losses["loss"], losses["mse"])


def test_kl_losses_and_rescaling():
    betas = ddm.get_betas("linear", T)
    shape = (3, 4, 4, 1)
    x0 = jnp.linspace(-1, 1, np.prod(shape)).reshape(shape)
    noise = jax.random.normal(jax.random.PRNGKey(0), shape)
    t = jnp.array([0, 20, 99])
    model = lambda x, tt: jnp.concatenate([0.5 * x, jnp.zeros_like(x)], -1)
    kl = ddm.training_losses(ddm.make_diffusion(betas, "eps", "learned", "kl"), model, x0, t, noise)
    rkl = ddm.training_losses(ddm.make_diffusion(betas, "eps", "learned", "rescaled_kl"), model, x0, t, noise)
    np.testing.assert_allclose(rkl["loss"], T * kl["loss"], rtol=1e-6)
    np.testing.assert_array_equal(kl["loss"], kl["vb"])
    assert np.all(np.asarray(kl["vb"]) > 0)


def test_vb_term_is_decoder_nll_at_t0_and_kl_elsewhere():
    d = ddm.make_diffusion(ddm.get_betas("linear", T), "eps", "fixed_large")
    shape = (2, 4, 4, 1)
    x0 = jnp.round((jax.random.uniform(jax.random.PRNGKey(0), shape, minval=-1, maxval=1) + 1) * 127.5) / 127.5 - 1
    noise = jax.random.normal(jax.random.PRNGKey(1), shape)
    for t_value in (0, 7):
        t = jnp.full((2,), t_value)
        xt = ddm.q_sample(d, x0, t, noise)
        out = ddm.p_mean_variance(d, noise, xt, t, clip_denoised=False)
        if t_value == 0:
            expected = -ddm.discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        else:
            mean, _, log_var = ddm.q_posterior(d, x0, xt, t)
            expected = ddm.normal_kl(mean, log_var, out["mean"], out["log_variance"])
        expected = expected.mean(axis=(1, 2, 3)) / math.log(2)
        np.testing.assert_allclose(ddm.vb_terms_bpd(d, noise, x0, xt, t)["output"], expected, rtol=1e-6)


def test_prior_bpd_closed_form():
    d = ddm.make_diffusion(ddm.get_betas("linear", T))
    x0 = jnp.linspace(-1, 1, 32).reshape(2, 4, 4, 1)
    ab = float(d.alphas_cumprod[-1])
    m, v = np.sqrt(ab) * np.asarray(x0, np.float64), 1 - ab
    kl = 0.5 * (v + m ** 2 - 1 - np.log(v))  # KL(N(m, v) || N(0, 1))
    np.testing.assert_allclose(ddm.prior_bpd(d, x0), kl.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-4)


def test_bits_per_dim_sums_its_terms():
    d = ddm.make_diffusion(ddm.get_betas("cosine", 20), "eps", "fixed_small")
    x0 = jnp.round(jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 1), minval=0, maxval=255)) / 127.5 - 1
    model = eps_model(d.alphas_cumprod, mu=0.0, s=0.6)
    out = jax.jit(lambda x: ddm.bits_per_dim(d, model, x, jax.random.PRNGKey(1)))(x0)
    assert out["vb"].shape == (3, 20) and out["x0_mse"].shape == (3, 20) and out["eps_mse"].shape == (3, 20)
    np.testing.assert_allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-6)
    np.testing.assert_allclose(out["prior_bpd"], ddm.prior_bpd(d, x0), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(out["total_bpd"]))) and np.all(np.asarray(out["vb"]) >= 0)
    # Column t is the term at t: recompute t = 0 (the decoder) and t = 12 with the same noise.
    for t_value in (0, 12):
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), t_value), x0.shape)
        t = jnp.full((3,), t_value)
        xt = ddm.q_sample(d, x0, t, noise)
        term = ddm.vb_terms_bpd(d, model(xt, t), x0, xt, t, clip_denoised=True)["output"]
        np.testing.assert_allclose(out["vb"][:, t_value], term, rtol=1e-5)


def test_bits_per_dim_of_a_better_model_is_lower():
    """On Gaussian data, the exact denoiser's bound is below a mismatched denoiser's."""
    d = ddm.make_diffusion(ddm.get_betas("cosine", 50), "eps", "fixed_small")
    x0 = jnp.clip(jnp.round((MU + S * jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 1)) + 1) * 127.5) / 127.5 - 1, -1, 1)
    bpd = lambda m: float(ddm.bits_per_dim(d, m, x0, jax.random.PRNGKey(1), clip_denoised=False)["total_bpd"].mean())
    exact, wrong = bpd(eps_model(d.alphas_cumprod)), bpd(eps_model(d.alphas_cumprod, mu=-0.5, s=0.8))
    assert exact < wrong
