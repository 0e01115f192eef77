"""The train state, the data-parallel train step and the data-parallel sample step: optax Adam with warmup and clipping, EMA of
the parameters, the diffusion loss, and K steps per host call under ``jax.pmap``.

Parallelism lives here (and in ``make_sample_fn``): ``pmap`` over local devices with axis name
``"batch"``; gradients, metrics and the timestep sampler's (t, loss) pairs cross devices.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddm.diffusion import Diffusion
from ddm.losses import training_losses
from ddm.sampling import ddim_sample, ddpm_sample
from ddm.timestep_sampling import TimestepSampler

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: step, parameters, optimizer state, EMA copies (one per rate,
    keyed by the rate's string), the timestep sampler's state, and the base PRNG key."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: dict
    sampler_state: Any
    key: jax.Array


def learning_rate_schedule(learning_rate: float, warmup_steps: int) -> optax.Schedule:
    """Step -> learning rate: linear from 0 to ``learning_rate`` over ``warmup_steps``, then constant."""
    if warmup_steps <= 0:  # optax's linear schedule with 0 transition steps stays at its start value
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)


# On accelerators, global_norm concatenates the leaves of at most this many elements before it sums
# their squares.
NORM_CONCAT_MAX_SIZE = 2 ** 18


def global_norm(tree) -> jax.Array:
    """The L2 norm of all of ``tree``'s leaves together (``optax.tree.norm``'s): on CPU one reduction
    per leaf, elsewhere one for the leaves of at most NORM_CONCAT_MAX_SIZE elements concatenated and
    one per larger leaf (``lax.platform_dependent``).

    XLA makes a kernel (on a GPU two, for a large leaf) of each leaf's sum of squares, and the U-Net's
    biases, norm scales and small kernels are 286 of its 328 leaves (7.0M of 35.7M parameters):
    compiled for an H100, the DDPM train step has 285 fewer kernels per step with them concatenated
    (1947 instead of 2232), for 0.07 GB more read and written (``benchmarks/gpu_hlo.py --arms
    ddm,leaf_norms``). A larger leaf keeps its own reduction, which costs less than copying it into
    the concatenation. On 2 CPU cores, where a kernel costs little, the concatenation made the train
    step 1.01x slower (float32, batch 8; ``benchmarks/variant_ab.py --arms ddm,leaf_norms``).
    """
    leaves = jax.tree_util.tree_leaves(tree)

    def per_leaf(*leaves):
        return jnp.sqrt(sum((jnp.sum(jnp.square(leaf)) for leaf in leaves), jnp.zeros((), jnp.float32)))

    def small_leaves_concatenated(*leaves):
        small = [jnp.ravel(leaf) for leaf in leaves if leaf.size <= NORM_CONCAT_MAX_SIZE]
        large = [leaf for leaf in leaves if leaf.size > NORM_CONCAT_MAX_SIZE]
        return per_leaf(*large, *([jnp.concatenate(small)] if small else []))

    return jax.lax.platform_dependent(*leaves, cpu=per_leaf, default=small_leaves_concatenated)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / ||updates||), their global L2 norm: the result of
    ``optax.clip_by_global_norm`` (to float32 rounding; the same empty state), as one multiply by a
    scalar per element.

    XLA fuses that multiply into Adam's two moment updates, where optax's per-element select and
    divide is materialised as a pass of its own: the DDPM CIFAR-10 update (clip, Adam, EMA) reads and
    writes 2.0 GB instead of 2.6 GB (XLA's cost analysis), 14 passes over the 35.7M parameters instead
    of 18. On 2 CPU cores the update alone took 104 ms instead of 116 ms, about 0.6% of the train step,
    which ``benchmarks/variant_ab.py --steps train --arms ddm,optax_clip`` times whole.
    """

    def update_fn(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / global_norm(updates))  # 1 for a zero norm (max_norm / 0 = inf)
        return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(learning_rate: float, warmup_steps: int, grad_clip: float, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam with a linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, after global-norm
    clipping of the gradients at ``grad_clip`` (<= 0: no clipping)."""
    adam = optax.adam(learning_rate_schedule(learning_rate, warmup_steps), b1=beta1, b2=beta2, eps=eps)
    return optax.chain(clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


def ema_key(rate: float) -> str:
    return str(rate)


def create_train_state(model, optimizer, sampler: TimestepSampler, key, image_shape, ema_rates,
                       num_classes=None) -> TrainState:
    """Initialise the parameters on a batch of one image of ``image_shape`` (H, W, C)."""
    init_key, state_key = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    y = None if num_classes is None else jnp.zeros((1,), jnp.int32)
    params = jax.jit(lambda k: model.init({"params": k}, x, jnp.zeros((1,), jnp.int32), y, train=False)["params"])(init_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params={ema_key(r): params for r in ema_rates}, sampler_state=sampler.init(),
                      key=state_key)


def update_ema(ema_params: dict, params, ema_rates) -> dict:
    """ema <- rate * ema + (1 - rate) * params, for each rate."""
    return {ema_key(r): jax.tree_util.tree_map(lambda e, p: r * e + (1.0 - r) * p, ema_params[ema_key(r)], params)
            for r in ema_rates}


def mean_over_devices(tree):
    """``lax.pmean`` over the ``"batch"`` axis; with one device, ``tree`` itself (XLA:CPU would
    still copy it through an all-reduce: 29 ms per DDPM CIFAR-10 step for the gradients)."""
    return tree if jax.lax.axis_size(AXIS) == 1 else jax.lax.pmean(tree, AXIS)


def make_train_step(model, diffusion: Diffusion, sampler: TimestepSampler, optimizer, ema_rates,
                    compute_dtype=jnp.float32) -> Callable:
    """One optimizer step on one device's batch {"image": (B, H, W, C), "label": (B,)}; call it under
    ``pmap(axis_name="batch")``.

    The timesteps, their weights and the noise are drawn for the whole global batch from
    ``fold_in(state.key, step)`` and each device takes its slice, so a step's update does not depend
    on how the batch is split over devices (1 device and 2 devices give the same parameters).
    Dropout, which lives inside the model, uses ``fold_in(step key, device)``.
    Returns (new state, metrics averaged over devices, plus ``finite``: whether the loss and the
    gradient norm are finite, and ``step``: the step number the update made).
    """

    def step_fn(state: TrainState, batch):
        x0 = batch["image"].astype(jnp.float32)
        labels = batch["label"] if getattr(model, "num_classes", None) else None
        device, num_devices, per_device = jax.lax.axis_index(AXIS), jax.lax.axis_size(AXIS), x0.shape[0]
        t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step), 3)
        t, weights = sampler.sample(state.sampler_state, t_key, per_device * num_devices)
        noise = jax.random.normal(noise_key, (per_device * num_devices,) + x0.shape[1:], jnp.float32)
        mine = lambda a: jax.lax.dynamic_slice_in_dim(a, device * per_device, per_device)
        t, weights, noise = mine(t), mine(weights), mine(noise)
        dropout_key = jax.random.fold_in(dropout_key, device)

        def loss_fn(params):
            def model_fn(x, t):
                return model.apply({"params": params}, x.astype(compute_dtype), t, labels, train=True,
                                   rngs={"dropout": dropout_key}).astype(jnp.float32)
            losses = training_losses(diffusion, model_fn, x0, t, noise)
            return jnp.mean(losses["loss"] * weights), losses

        grads, losses = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = mean_over_devices(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        sampler_state = sampler.update(state.sampler_state, jax.lax.all_gather(t, AXIS),
                                       jax.lax.all_gather(losses["loss"], AXIS))
        metrics = {name: jnp.mean(value) for name, value in losses.items()}
        metrics["grad_norm"] = global_norm(grads)
        metrics = mean_over_devices(metrics)
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        metrics["step"] = state.step + 1
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=update_ema(state.ema_params, params, ema_rates),
                                  sampler_state=sampler_state)
        return new_state, metrics

    return step_fn


def backend_choices(devices=None) -> dict:
    """``make_multi_step``'s ``unroll`` and ``donate`` for the platform of ``devices`` (default: the
    local devices): unrolled and not donated on CPU, a loop over donated state on accelerators."""
    cpu = list(devices or jax.local_devices())[0].platform == "cpu"
    return {"unroll": cpu, "donate": not cpu}


def make_multi_step(step_fn: Callable, unroll: bool = False, donate: bool = True, devices=None) -> Callable:
    """K steps in one call (score_sde's pattern): batches carry a leading K axis per device,
    ``lax.scan`` runs them on device, and the metrics of the last step come back, or those of the
    first step whose loss or gradient norm was not finite (metrics ``finite`` and ``step`` say which). Pmapped over the
    local devices (or ``devices``), with the state donated where ``donate``.

    ``unroll=True`` unrolls the K steps. XLA:CPU runs the U-Net's weight-gradient convolutions
    about 10x slower inside a while loop than in straight-line code (measured: 4.4 s against
    0.35 s per step of the digits U-Net), so CPU runs unroll; accelerators keep the loop.

    ``donate=False`` is for CPU runs. XLA:CPU fuses the Adam update into both the new parameters
    and the EMA, so each donated state leaf is read after its buffer would be overwritten, and XLA
    copies every leaf first (659 argument copies in a K=2 call of the DDPM CIFAR-10 step); without
    donation the call is 1.05x faster (``benchmarks/cpu_update_ab.py``) for one more state in host
    memory. ``backend_choices`` gives both settings for a platform.
    """

    def multi_step(state, batches):
        if jax.tree_util.tree_leaves(batches)[0].shape[0] == 1:
            # Even unrolled, a length-1 scan lowers to a while loop, with the slow CPU layout.
            return step_fn(state, jax.tree_util.tree_map(lambda b: b[0], batches))
        state, metrics = jax.lax.scan(step_fn, state, batches, unroll=unroll)
        finite = metrics["finite"]
        shown = jnp.where(jnp.all(finite), finite.shape[0] - 1, jnp.argmin(finite))
        return state, jax.tree_util.tree_map(lambda m: m[shown], metrics)

    return jax.pmap(multi_step, axis_name=AXIS, donate_argnums=(0,) if donate else (), devices=devices)


def replicate(tree, devices=None):
    """One copy of ``tree`` per local device along a new leading axis, sharded for ``pmap``.

    The mesh axis is named like the pmap axis: that is the sharding pmap gives its outputs, so the
    state that goes back in keeps the same sharding and the step is compiled once, not twice.
    """
    devices = list(devices or jax.local_devices())
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(np.broadcast_to(np.asarray(a), (len(devices),) + np.shape(a)), sharding), tree)


def unreplicate(tree):
    """The first device's copy of a replicated tree."""
    return jax.tree_util.tree_map(lambda a: a[0], tree)


def make_sample_step(model, diffusion: Diffusion, method: str, eta: float, clip_denoised: bool,
                     per_device_shape, num_classes=None) -> Callable:
    """A pmapped ``sample(params, key) -> images`` that draws ``per_device_shape`` (B, H, W, C)
    samples on each local device (its key folded with the device index) with DDPM or DDIM over
    ``diffusion``'s (respaced) steps. Class-conditional models get uniformly random labels."""
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sample.method={method!r}; allowed: 'ddpm', 'ddim'")

    def sample(params, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        label_key, key = jax.random.split(key)
        labels = None if num_classes is None else jax.random.randint(label_key, per_device_shape[:1], 0, num_classes)
        model_fn = lambda x, t: model.apply({"params": params}, x, t, labels, train=False).astype(jnp.float32)
        if method == "ddpm":
            return ddpm_sample(diffusion, model_fn, key, per_device_shape, clip_denoised=clip_denoised)
        return ddim_sample(diffusion, model_fn, key, per_device_shape, eta=eta, clip_denoised=clip_denoised)

    return jax.pmap(sample, axis_name=AXIS)
