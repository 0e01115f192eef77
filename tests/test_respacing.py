import jax.numpy as jnp
import numpy as np
import pytest

import ddm


def test_ddim_stride_and_sections():
    np.testing.assert_array_equal(ddm.space_timesteps(1000, "ddim50"), np.arange(0, 1000, 20))
    np.testing.assert_array_equal(ddm.space_timesteps(100, "10"), np.round(np.arange(10) * 99 / 9).astype(int))
    np.testing.assert_array_equal(ddm.space_timesteps(100, 10), ddm.space_timesteps(100, "10"))
    kept = ddm.space_timesteps(300, "10,15,20")
    assert len(kept) == 45 and kept[0] == 0 and kept[-1] == 299
    assert len([k for k in kept if k < 100]) == 10 and len([k for k in kept if 100 <= k < 200]) == 15
    np.testing.assert_array_equal(ddm.space_timesteps(300, [10, 15, 20]), kept)
    np.testing.assert_array_equal(ddm.space_timesteps(1000, "1000"), np.arange(1000))


def test_quadratic_is_ddims_skip():
    kept = ddm.space_timesteps(1000, "quad50")
    ddim = (np.linspace(0, np.sqrt(800), 50) ** 2).astype(int)  # DDIM's sequence, which repeats 0
    assert len(set(ddim)) == 49 and len(set(kept)) == 50 and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept[:4], [0, 1, 2, 3])
    np.testing.assert_array_equal(kept[4:], ddim[4:])
    assert kept[-1] == 800


@pytest.mark.parametrize("spec, match", [
    ("ddim33", "no integer stride gives exactly 33 of 100 steps"),
    ("200", r"section 0 has 100 steps, cannot take 200 \(allowed 1..100\)"),
    ("abc", "allowed forms"),
    ("ddimX", "expected ddimN with N in 1..100"),
    ("quad101", "expected quadN with N in 1..100"),
    (2.5, "allowed forms"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        ddm.space_timesteps(100, spec)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respacing_keeps_alpha_bar_and_maps_timesteps(schedule):
    d = ddm.make_diffusion(ddm.get_betas(schedule, 1000), "eps", "learned_range", "hybrid")
    kept = ddm.space_timesteps(1000, "ddim50")
    r = ddm.respace(d, kept)
    assert r.num_timesteps == 50 and (r.mean_type, r.var_type, r.loss_type) == ("eps", "learned_range", "hybrid")
    np.testing.assert_allclose(r.alphas_cumprod, np.asarray(d.alphas_cumprod)[kept], rtol=2e-6)
    np.testing.assert_array_equal(r.timestep_map, kept)
    # Respacing twice composes the maps back to original indices.
    rr = ddm.respace(r, np.array([0, 10, 49]))
    np.testing.assert_array_equal(rr.timestep_map, kept[[0, 10, 49]])
    np.testing.assert_allclose(rr.alphas_cumprod, np.asarray(d.alphas_cumprod)[kept[[0, 10, 49]]], rtol=2e-6)


def test_model_is_called_with_original_indices():
    d = ddm.respace(ddm.make_diffusion(ddm.get_betas("linear", 100)), ddm.space_timesteps(100, "ddim10"))
    seen = []
    ddm.training_losses(d, lambda x, t: seen.append(t) or jnp.zeros_like(x), jnp.zeros((3, 2, 2, 1)),
                        jnp.array([0, 1, 9]), jnp.zeros((3, 2, 2, 1)))
    np.testing.assert_array_equal(seen[0], [0, 10, 90])


def test_bad_respace_timesteps():
    d = ddm.make_diffusion(ddm.get_betas("cosine", 10))
    with pytest.raises(ValueError, match=r"strictly increasing indices in \[0, 10\)"):
        ddm.respace(d, [3, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        ddm.respace(d, [0, 10])
    with pytest.raises(ValueError, match="strictly increasing"):
        ddm.respace(d, [5])
