"""Train and sample runs, composed from small builders over one config (see configs/default.py)."""
import json
import os
import signal
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's writers import TensorFlow; keep its banner quiet

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ddm import data
from ddm.checkpoint import Checkpointer, check_free_space
from ddm.diffusion import Diffusion, make_diffusion
from ddm.images import make_grid, save_png
from ddm.respacing import respace, space_timesteps
from ddm.schedules import get_betas
from ddm.timestep_sampling import get_timestep_sampler
from ddm.train import (backend_choices, create_train_state, ema_key, learning_rate_schedule, make_multi_step,
                       make_optimizer, make_sample_step, make_train_step, replicate, unreplicate)
from ddm.unet import ATTENTION_IMPLEMENTATIONS, UNet

RESPACINGS = {"uniform": "{}", "ddim": "ddim{}", "quad": "quad{}"}


def build_diffusion(config: ml_collections.ConfigDict) -> Diffusion:
    c = config.diffusion
    return make_diffusion(get_betas(c.schedule, c.num_timesteps), c.mean_type, c.var_type, c.loss_type)


def build_sampling_diffusion(config: ml_collections.ConfigDict, diffusion: Diffusion) -> Diffusion:
    """The diffusion respaced to ``sample.steps`` steps by ``sample.respacing``."""
    c = config.sample
    if c.respacing not in RESPACINGS:
        raise ValueError(f"unknown sample.respacing={c.respacing!r}; allowed: {', '.join(map(repr, RESPACINGS))}")
    if c.steps == diffusion.num_timesteps:
        return diffusion
    if not 1 < c.steps < diffusion.num_timesteps:
        raise ValueError(f"sample.steps={c.steps} must be in 2..{diffusion.num_timesteps} (diffusion.num_timesteps)")
    return respace(diffusion, space_timesteps(diffusion.num_timesteps, RESPACINGS[c.respacing].format(c.steps)))


def build_model(config: ml_collections.ConfigDict, channels: int) -> UNet:
    """The U-Net for images with ``channels`` channels; 2C outputs for a learned variance."""
    c = config.model
    if c.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown model.dtype={c.dtype!r}; allowed: 'float32', 'bfloat16'")
    if c.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown model.attention={c.attention!r}; allowed: "
                         f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
    if c.attention == "cudnn":
        if c.dtype != "bfloat16":
            raise ValueError(f"model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN's fused attention has "
                             f"no float32 kernel), got {c.dtype!r}: set --config.model.dtype=bfloat16 or "
                             f"--config.model.attention=xla")
        platform = jax.local_devices()[0].client.platform_version
        if "cuda" not in platform.lower():
            raise ValueError(f"model.attention='cudnn' runs on NVIDIA GPUs only, and this run's platform is "
                             f"{platform!r}: set --config.model.attention=xla")
    learned = config.diffusion.var_type in ("learned", "learned_range")
    return UNet(ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout,
                out_channels=2 * channels if learned else channels, resblock_updown=c.resblock_updown,
                num_heads=c.num_heads, num_head_channels=c.num_head_channels, scale_shift_norm=c.scale_shift_norm,
                num_classes=config.data.num_classes if c.class_conditional else None,
                dtype=jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32, attention=c.attention)


def build_optimizer(config: ml_collections.ConfigDict):
    o = config.optim
    return make_optimizer(o.learning_rate, o.warmup_steps, o.grad_clip, o.beta1, o.beta2, o.eps)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Check what can be checked before any compute, with errors that name the field and the fix."""
    t = config.train
    k = t.steps_per_call
    if k < 1:
        raise ValueError(f"train.steps_per_call={k} must be >= 1")
    for field in ("num_steps", "log_every", "checkpoint_every", "sample_every", "keep_period"):
        value = t[field]
        if value % k:
            raise ValueError(f"train.{field}={value} must be a multiple of train.steps_per_call={k}; "
                             f"e.g. {max(k, value - value % k)}")
    for field, size in (("train.batch_size", t.batch_size), ("sample.batch_size", config.sample.batch_size),
                        ("sample.grid_size", config.sample.grid_size)):
        if size % num_devices:
            raise ValueError(f"{field}={size} is not divisible by the {num_devices} local devices; "
                             f"use a multiple of {num_devices}")
    downsamplings = len(config.model.ch_mult) - 1
    if config.data.image_size % 2 ** downsamplings:
        raise ValueError(f"data.image_size={config.data.image_size} is not divisible by 2**{downsamplings} "
                         f"(model.ch_mult={tuple(config.model.ch_mult)} downsamples {downsamplings} times)")


# Config fields that fix the shapes (or the meaning) of the saved train state.
ARCHITECTURE_FIELDS = ("data.name", "data.image_size", "model.ch", "model.ch_mult", "model.num_res_blocks",
                       "model.attn_resolutions", "model.resblock_updown", "model.num_heads", "model.num_head_channels",
                       "model.scale_shift_norm", "model.class_conditional", "diffusion.var_type",
                       "diffusion.num_timesteps", "diffusion.timestep_sampler", "optim.ema_rates")


def config_changes(config: ml_collections.ConfigDict, saved: dict, fields) -> list[tuple[str, object, object]]:
    """(field, value in ``config``, value in ``saved``) for each of ``fields`` ("section.name") that differs
    from ``saved`` (a run's config.json as a dict; tuples there are lists). Fields ``saved`` lacks are skipped."""
    current = json.loads(config.to_json())
    changed = []
    for field in fields:
        section, name = field.split(".")
        if name in saved.get(section, {}) and current[section][name] != saved[section][name]:
            changed.append((field, current[section][name], saved[section][name]))
    return changed


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Fail before any compute if ``config`` changed an ARCHITECTURE_FIELDS value against the run already
    in ``workdir`` (its config.json), naming each field, both values and the fix."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        changed = config_changes(config, json.load(f), ARCHITECTURE_FIELDS)
    if changed:
        listed = "; ".join(f"{f}={n!r} (the run in the workdir has {o!r})" for f, n, o in changed)
        fix = " ".join(f"--config.{f}={_flag_value(o)}" for f, _, o in changed)
        raise ValueError(f"the config changed the architecture against {path}: {listed}. Use a new --workdir, "
                         f"or go back to the run's values: {fix}")


def _flag_value(value) -> str:
    """``value`` as ml_collections' flag parser reads it back."""
    if isinstance(value, list):
        return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def check_finite(metrics, checkpointer: Checkpointer) -> None:
    """Stop with ``FloatingPointError`` if the pmapped step's metrics say a loss or gradient was not finite,
    naming the step, the loss and the last checkpoint (a non-finite state is never saved)."""
    m = jax.device_get(unreplicate(metrics))
    if bool(m["finite"]):
        return
    checkpointer.wait()
    last = checkpointer.latest_step()
    resume = f"the last good checkpoint is step {last} in {checkpointer.directory}" if last is not None else \
        "no checkpoint was written"
    raise FloatingPointError(f"non-finite training at step {int(m['step'])}: loss={float(m['loss'])}, "
                             f"grad_norm={float(m['grad_norm'])}; {resume}. Lower optim.learning_rate, "
                             f"set optim.grad_clip, or check the data")


class PreemptionWatch:
    """Whether to stop and checkpoint now because the job is being preempted.

    One process: a SIGTERM handler (installed inside ``with``, the previous one restored after) sets a
    flag. Several processes: JAX's preemption sync service (which catches SIGTERM itself) makes every
    process agree on the same step, so all of them save it together.
    """

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.signalled = False
        self.previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False

    def _handle(self, signum, frame):
        self.signalled = True

    def stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.checkpointer.reached_preemption(step)
        return self.signalled


def restore_or_create(config, model, optimizer, sampler, image_shape, checkpointer):
    """The latest checkpointed train state, or a fresh one from ``config.seed``."""
    num_classes = config.data.num_classes if config.model.class_conditional else None
    create = lambda: create_train_state(model, optimizer, sampler, jax.random.PRNGKey(config.seed), image_shape,
                                        tuple(config.optim.ema_rates), num_classes)
    if checkpointer.latest_step() is None:
        return create()
    return checkpointer.restore_latest(jax.eval_shape(create))


def stack_steps(batches, k: int):
    """Group k consecutive per-step batches (devices, B, ...) into (devices, k, B, ...) for the K-step scan."""
    while True:
        group = [next(batches) for _ in range(k)]
        yield jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=1), *group)


def generate(sample_step, params, key, num: int, batch_size: int, progress: bool = False) -> np.ndarray:
    """``num`` uint8 samples (N, H, W, C) from a pmapped sample step, ``batch_size`` per call."""
    out = []
    for i in tqdm(range(-(-num // batch_size)), desc="sampling", disable=not progress):
        keys = replicate(jax.random.fold_in(key, i))
        images = sample_step(params, keys)
        out.append(data.to_uint8(np.asarray(images).reshape((-1,) + images.shape[2:])))
    return np.concatenate(out)[:num]


def save_sample_grid(images: np.ndarray, path: str) -> str:
    scale = max(1, 128 // images.shape[1])  # small images are enlarged so a person can see them
    return save_png(make_grid(images), path, scale=scale)


def train(config: ml_collections.ConfigDict, workdir: str):
    """Train from scratch or resume from ``workdir``; log, checkpoint and write sample grids.
    Returns the final (unreplicated) train state."""
    num_devices = jax.local_device_count()
    validate(config, num_devices)
    source = data.load_source(config.data.name, "train", image_size=config.data.image_size,
                              data_dir=config.data.data_dir)
    image_shape = data.image_shape(source)
    diffusion = build_diffusion(config)
    sample_diffusion = build_sampling_diffusion(config, diffusion)
    model = build_model(config, image_shape[-1])
    sampler = get_timestep_sampler(config.diffusion.timestep_sampler, config.diffusion.num_timesteps)
    o = config.optim
    optimizer = build_optimizer(config)
    check_workdir_config(config, workdir)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, config.train.keep_period)
    if jax.process_index() == 0:  # several hosts share the workdir; one writes, atomically: the others read it
        config_path = os.path.join(workdir, "config.json")
        with open(config_path + ".tmp", "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(config_path + ".tmp", config_path)
    state = restore_or_create(config, model, optimizer, sampler, image_shape, checkpointer)
    check_free_space(workdir, state)
    start = int(state.step)
    t = config.train
    if start:
        logging.info("resuming from step %d in %s", start, checkpointer.directory)
    multi_step = make_multi_step(make_train_step(model, diffusion, sampler, optimizer, tuple(o.ema_rates),
                                                 jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32),
                                 **backend_choices())
    num_classes = config.data.num_classes if config.model.class_conditional else None
    grid_shape = (config.sample.grid_size // num_devices,) + tuple(image_shape)
    sample_step = make_sample_step(model, sample_diffusion, config.sample.method, config.sample.eta,
                                   config.sample.clip_denoised, grid_shape, num_classes)
    batches = data.prefetch_to_device(stack_steps(
        data.train_batches(source, global_batch_size=t.batch_size, seed=config.seed, start_step=start,
                           random_flip=config.data.random_flip), t.steps_per_call))
    # clu's writers import TensorFlow, so only the training loop imports them: the builders above then
    # load on machines without TensorFlow (the benchmarks on an accelerator image, a notebook).
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer, every_steps=t.log_every)
    lr = learning_rate_schedule(o.learning_rate, o.warmup_steps)
    p_state = replicate(state)
    del state
    ema = ema_key(o.ema_rates[0])
    preemption = PreemptionWatch(checkpointer)
    previous = None
    with preemption, tqdm(total=t.num_steps, initial=start, desc="train", unit="step",
                          disable=jax.process_index() > 0) as progress:
        for step in range(start + t.steps_per_call, t.num_steps + 1, t.steps_per_call):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                p_state, metrics = multi_step(p_state, next(batches))
            if previous is not None:  # the previous call's flag: reading it does not wait for this call
                check_finite(previous, checkpointer)
            previous = metrics
            progress.update(t.steps_per_call)
            for done in range(step - t.steps_per_call + 1, step + 1):  # clu wants every step reported
                report(done)
            last = step == t.num_steps
            stop = preemption.stop(step)
            if step % t.log_every == 0 or step % t.checkpoint_every == 0 or last or stop:
                check_finite(metrics, checkpointer)
            if step % t.log_every == 0:
                scalars = {k: float(v) for k, v in jax.device_get(unreplicate(metrics)).items()
                           if k not in ("finite", "step")}
                scalars["learning_rate"] = float(lr(step))
                writer.write_scalars(step, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}")
            if step % t.checkpoint_every == 0 or last or stop:
                checkpointer.save(step, jax.device_get(unreplicate(p_state)))
            if stop:
                logging.warning("preempted (SIGTERM): saved checkpoint %d in %s; rerun the same command to resume",
                                step, checkpointer.directory)
                break
            if (t.sample_every and step % t.sample_every == 0) or last:
                images = generate(sample_step, p_state.ema_params[ema], jax.random.PRNGKey(config.seed),
                                  config.sample.grid_size, config.sample.grid_size)
                if jax.process_index() == 0:  # every host runs the pmapped sampler; one writes
                    path = save_sample_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
                    logging.info("step %d: sample grid %s", step, path)
                writer.write_images(step, {"samples": make_grid(images)[None]})
    checkpointer.close()
    writer.flush()
    return jax.device_get(unreplicate(p_state))


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Write ``sample.num_samples`` samples from the latest checkpoint's EMA parameters to
    ``<workdir>/samples.npz`` (uint8 NHWC array ``images``) and a grid to ``samples.png``."""
    num_devices = jax.local_device_count()
    validate(config, num_devices)
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, config.train.keep_period)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first with --mode=train "
                                f"and the same --workdir")
    check_workdir_config(config, workdir)
    channels = 1 if config.data.name == "digits" else 3
    image_shape = (config.data.image_size, config.data.image_size, channels)
    model = build_model(config, channels)
    diffusion = build_sampling_diffusion(config, build_diffusion(config))
    sampler = get_timestep_sampler(config.diffusion.timestep_sampler, config.diffusion.num_timesteps)
    o = config.optim
    optimizer = build_optimizer(config)
    state = restore_or_create(config, model, optimizer, sampler, image_shape, checkpointer)
    checkpointer.close()
    s = config.sample
    num_classes = config.data.num_classes if config.model.class_conditional else None
    sample_step = make_sample_step(model, diffusion, s.method, s.eta, s.clip_denoised,
                                   (s.batch_size // num_devices,) + image_shape, num_classes)
    params = replicate(state.ema_params[ema_key(o.ema_rates[0])])
    images = generate(sample_step, params, jax.random.PRNGKey(config.seed + 1), s.num_samples, s.batch_size,
                      progress=True)
    path = os.path.join(workdir, "samples.npz")
    if jax.process_index() == 0:  # every host runs the pmapped sampler; one writes
        with open(path + ".tmp", "wb") as f:  # no partial file under the final name
            np.savez(f, images=images)
        os.replace(path + ".tmp", path)
        save_sample_grid(images[: s.grid_size], os.path.join(workdir, "samples.png"))
    logging.info("wrote %d samples (step %d, %s, %d steps) to %s", len(images), int(state.step), s.method, s.steps, path)
    return path
