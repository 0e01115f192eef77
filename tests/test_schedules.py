import math

import numpy as np
import pytest

import ddm
from ddm.schedules import cosine_alpha_bar


def product(betas):
    """alpha-bar by an independent path: a running product in Python floats."""
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - float(b)
        out.append(acc)
    return np.array(out)


@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_linear_matches_ddpm_scaled(T):
    betas = ddm.get_betas("linear", T)
    scale = 1000 / T
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4 * scale, 0.02 * scale], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) * scale / (T - 1), rtol=1e-9)


def test_linear_alpha_bar_T1000():
    ab = ddm.make_diffusion(ddm.get_betas("linear", 1000)).alphas_cumprod
    # log ab_T = sum log(1 - beta_i); integral approximation gives ~ -10.12, so ab_T ~ 4.0e-5.
    expected = math.exp(math.fsum(math.log1p(-(1e-4 + (0.02 - 1e-4) * i / 999)) for i in range(1000)))
    np.testing.assert_allclose(float(ab[-1]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ab), product(ddm.get_betas("linear", 1000)), rtol=2e-6)
    assert 3.9e-5 < expected < 4.1e-5


@pytest.mark.parametrize("T", [1000, 4000])
def test_cosine_alpha_bar_is_the_formula(T):
    betas = ddm.get_betas("cosine", T)
    ab = product(betas)
    t = np.arange(1, T + 1)
    formula = np.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    unclipped = betas < 0.999
    assert unclipped[: T - 1].all()  # only the last beta hits the clip
    np.testing.assert_allclose(ab[unclipped], formula[unclipped], rtol=1e-10, atol=1e-15)
    assert betas.max() == 0.999
    np.testing.assert_allclose(cosine_alpha_bar(0.0), math.cos(0.008 / 1.008 * math.pi / 2) ** 2)


@pytest.mark.parametrize("bad, match", [(("quadratic", 100), "unknown schedule name='quadratic'.*'linear', 'cosine'"),
                                        (("linear", 1), "num_timesteps must be an integer >= 2, got 1"),
                                        (("linear", 10.5), "got 10.5"),
                                        (("linear", 20), "needs num_timesteps > 20.*got 20")])
def test_bad_schedule(bad, match):
    with pytest.raises(ValueError, match=match):
        ddm.get_betas(*bad)
