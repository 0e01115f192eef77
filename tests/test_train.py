"""The train state and the pmapped train step: device-count invariance, one compile, EMA, sampler state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddm
from ddm import train
from ddm.unet import UNet

T = 50
SHAPE = (8, 8, 1)
GLOBAL_BATCH = 8
RATES = (0.9, 0.5)


def batches(num_devices, steps, k):
    """``steps`` global batches grouped k per call, laid out (devices, k, per-device batch, ...)."""
    images = np.random.default_rng(0).uniform(-1, 1, (steps // k, k, GLOBAL_BATCH) + SHAPE).astype(np.float32)
    images = images.reshape((steps // k, k, num_devices, GLOBAL_BATCH // num_devices) + SHAPE).swapaxes(1, 2)
    return [{"image": x, "label": np.zeros(x.shape[:3], np.int32)} for x in images]


def run(num_devices, steps=2, k=1, sampler_name="uniform", var_type="fixed_large", loss_type="mse",
        dtype=jnp.float32):
    """Train ``steps`` steps on ``num_devices`` devices; returns (final state, last metrics, trace count)."""
    learned = var_type in ("learned", "learned_range")
    model = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 out_channels=2 if learned else 1, dtype=dtype)
    diffusion = ddm.make_diffusion(ddm.get_betas("cosine", T), "eps", var_type, loss_type)
    sampler = ddm.get_timestep_sampler(sampler_name, T)
    optimizer = train.make_optimizer(1e-3, warmup_steps=2, grad_clip=1.0)
    state = train.create_train_state(model, optimizer, sampler, jax.random.PRNGKey(0), SHAPE, RATES)
    step_fn = train.make_train_step(model, diffusion, sampler, optimizer, RATES, dtype)
    traces = []

    def counted(state, batch):
        traces.append(1)  # Python runs only while tracing: one entry per (re)compile
        return step_fn(state, batch)

    devices = jax.local_devices()[:num_devices]
    multi = train.make_multi_step(counted, unroll=True, devices=devices)
    p_state = train.replicate(state, devices)
    for batch in batches(num_devices, steps, k):
        p_state, metrics = multi(p_state, batch)
    return p_state, metrics, len(traces), state


@pytest.fixture(scope="module")
def one_and_two():
    assert jax.local_device_count() == 2
    return run(1), run(2)


def test_two_devices_give_the_same_update_as_one(one_and_two):
    (s1, m1, _, _), (s2, m2, _, _) = one_and_two
    np.testing.assert_allclose(m1["loss"][0], m2["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"][0], m2["grad_norm"][0], rtol=1e-4)
    # Adam divides by sqrt(v): near-zero gradients turn summation-order noise into relative noise,
    # so parameters agree to 1e-5 absolute, 1% of one early step (lr 1e-3 after warmup).
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree_util.tree_map(close, train.unreplicate(s1).params, train.unreplicate(s2).params)
    jax.tree_util.tree_map(close, train.unreplicate(s1).ema_params, train.unreplicate(s2).ema_params)
    # Every replica holds the same state.
    jax.tree_util.tree_map(lambda a: np.testing.assert_array_equal(a[0], a[1]), s2.params)


def test_step_is_traced_once_and_counts_steps(one_and_two):
    (s1, m1, traces1, _), (s2, _, traces2, _) = one_and_two
    assert traces1 == 1 and traces2 == 1  # two calls, one trace
    assert int(s1.step[0]) == 2 and int(s2.step[1]) == 2
    assert set(m1) == {"loss", "mse", "grad_norm", "finite", "step"} and np.isfinite(m1["loss"][0])
    assert bool(m1["finite"][0]) and int(m1["step"][0]) == 2


def test_ema_follows_its_formula(one_and_two):
    (s1, _, _, initial), _ = one_and_two
    state = train.unreplicate(s1)
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])
    p, p0 = flat(state.params), flat(initial.params)
    fast, slow = flat(state.ema_params["0.5"]), flat(state.ema_params["0.9"])
    # Two steps from ema = p0: ema = r^2 p0 + r (1 - r) p1 + (1 - r) p2, so a fast EMA is nearer p.
    assert np.abs(fast - p).sum() < np.abs(slow - p).sum() and np.abs(slow - p0).sum() > 0
    np.testing.assert_allclose(train.update_ema({"0.5": {"w": jnp.array(2.0)}}, {"w": jnp.array(4.0)}, (0.5,))["0.5"]["w"], 3.0)


def test_importance_sampler_hybrid_loss_and_bfloat16_in_k_step_calls():
    p_state, metrics, traces, _ = run(2, steps=4, k=2, sampler_name="loss_second_moment", var_type="learned_range",
                                      loss_type="hybrid", dtype=jnp.bfloat16)
    assert traces == 1 and int(p_state.step[0]) == 4
    counts = np.asarray(p_state.sampler_state["counts"])
    np.testing.assert_array_equal(counts[0], counts[1])  # every replica holds the same sampler state
    assert counts[0].sum() == 4 * GLOBAL_BATCH  # (t, loss) pairs of both devices, every step (none full yet)
    assert set(metrics) == {"loss", "mse", "vb", "grad_norm", "finite", "step"} and np.isfinite(metrics["vb"][0])
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(p_state.params)} == {"float32"}


def test_optimizer_warmup_and_clipping():
    opt = train.make_optimizer(1.0, warmup_steps=4, grad_clip=1e-3)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    updates, state = opt.update({"w": jnp.array([100.0, 0.0, 0.0])}, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)  # learning rate 0 at step 0 of the warmup
    updates, _ = opt.update({"w": jnp.array([100.0, 0.0, 0.0])}, state, params)
    np.testing.assert_allclose(updates["w"][0], -0.25, rtol=1e-3)  # lr 1/4, Adam's first step is lr * sign


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_by_global_norm_matches_optax(max_norm):
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))  # 3.71: clips at 0.5 and 3, not at 1e6
    clip, optax_clip = train.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    ours, state = clip.update(grads, clip.init(grads))
    theirs, _ = optax_clip.update(grads, optax_clip.init(grads))
    for name in grads:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6)
        np.testing.assert_allclose(ours[name], grads[name] * min(1.0, max_norm / norm), rtol=1e-6)
    assert state == optax_clip.init(grads)  # checkpoints keep their structure
    zeros, _ = train.clip_by_global_norm(1.0).update({"w": jnp.zeros(3)}, state)
    np.testing.assert_array_equal(zeros["w"], 0.0)  # a zero gradient stays zero (no 0 / 0)


def test_global_norm_is_optax_norm_with_the_small_leaves_in_one_reduction_off_cpu():
    rng = np.random.default_rng(0)
    large = train.NORM_CONCAT_MAX_SIZE + 1
    tree = {"kernel": jnp.asarray(rng.standard_normal(large), jnp.float32),
            "small": [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4), (5,), (2, 2, 2))],
            "at_the_limit": jnp.asarray(rng.standard_normal(train.NORM_CONCAT_MAX_SIZE), jnp.float32)}
    np.testing.assert_allclose(train.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)
    norm = jax.jit(lambda t: train.global_norm(t))
    lowered = {p: jax.export.export(norm, platforms=[p])(tree).mlir_module() for p in ("cuda", "tpu", "cpu")}
    for p in ("cuda", "tpu"):  # the 4 small leaves concatenated, and the large kernel
        assert lowered[p].count("stablehlo.concatenate") == 1 and lowered[p].count("stablehlo.reduce(") == 2
    assert "concatenate" not in lowered["cpu"] and lowered["cpu"].count("stablehlo.reduce(") == 5
    assert float(train.global_norm({})) == 0.0 and float(train.global_norm({"w": jnp.zeros(3)})) == 0.0


def test_clip_by_global_norm_is_fused_into_adam():
    """optax's clip materialises the clipped gradients; ours scales inside Adam's moment updates, so
    the update (clip, Adam, EMA) reads and writes less (XLA's cost analysis of the compiled update)."""
    params = {f"w{i}": jnp.ones((4, train.NORM_CONCAT_MAX_SIZE // 4 + 1), jnp.float32) for i in range(4)}

    def bytes_accessed(clip):  # (leaves global_norm does not concatenate: the clip's own bytes)
        optimizer = optax.chain(clip(1.0), optax.adam(1e-3))

        def update(params, opt_state, ema, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, train.update_ema({"0.9": ema}, params, (0.9,))

        compiled = jax.jit(update).lower(params, optimizer.init(params), params, params).compile()
        analysis = compiled.cost_analysis()
        return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["bytes accessed"]

    ours, theirs = bytes_accessed(train.clip_by_global_norm), bytes_accessed(optax.clip_by_global_norm)
    assert ours < 0.85 * theirs, (ours, theirs)


def test_learning_rate_schedule():
    assert [float(train.learning_rate_schedule(2.0, 4)(s)) for s in (0, 1, 4, 100)] == [0.0, 0.5, 2.0, 2.0]
    assert [float(train.learning_rate_schedule(2.0, 0)(s)) for s in (0, 100)] == [2.0, 2.0]


def test_cpu_runs_unroll_and_do_not_donate():
    assert train.backend_choices(jax.devices("cpu")[:1]) == {"unroll": True, "donate": False}
    cpu = jax.local_devices()[0].platform == "cpu"
    assert train.backend_choices() == {"unroll": cpu, "donate": not cpu}


@pytest.mark.parametrize("donate", [True, False])
def test_multi_step_donates_the_state_only_when_asked(donate):
    step_fn = lambda state, batch: ({"w": state["w"] + jnp.sum(batch)}, {"finite": jnp.bool_(True)})
    devices = jax.local_devices()[:1]
    multi = train.make_multi_step(step_fn, unroll=True, donate=donate, devices=devices)
    state = train.replicate({"w": np.ones(3, np.float32)}, devices)
    new, _ = multi(state, np.ones((1, 1, 2), np.float32))
    np.testing.assert_array_equal(new["w"][0], np.full(3, 3.0))
    assert state["w"].is_deleted() == donate


def test_mean_over_devices_is_no_all_reduce_on_one_device():
    mean = lambda x: train.mean_over_devices({"g": x})["g"]
    for n in (1, 2):
        x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
        p = jax.pmap(mean, axis_name=train.AXIS, devices=jax.local_devices()[:n])
        np.testing.assert_allclose(p(x), np.broadcast_to(x.mean(0), x.shape))
        assert ("all-reduce" in p.lower(x).compile().as_text()) == (n == 2)
