"""Evaluation of a trained run, the engine of ``--mode=eval``: the variational bound in bits/dim,
samples in large numbers (resumable), Frechet distance and score in a feature space, DDIM's
steps-vs-quality table, and the papers' figures. Every field used is documented in the ``eval``
section of configs/default.py.

Artifacts, all under ``<workdir>/eval/`` and written by process 0 only, each atomically:

- ``nll.json``: {total_bpd, prior_bpd, strided_bpd, strided_steps, num_examples, checkpoint_step, seconds};
- ``nll_terms.csv`` (columns t, vb_bpd, x0_mse, eps_mse; one row per timestep, means over the split) and
  ``nll_terms.png`` (vb term vs t, log y; IDDPM Fig. 2);
- ``samples/<sampler>_step<checkpoint step>_seed<seed>/shard_%05d.npz``: uint8 NHWC ``images``,
  ``eval.batch_size`` per shard, e.g. ``samples/ddim_eta0_uniform50_step1500_seed0/``; a restarted eval
  loads the shards already there instead of sampling them again;
- ``ref_stats_<space>_<split>.npz``: mu (D,), sigma (D, D), score_mean, score_std, num of the data split;
- ``table.csv`` (columns row, steps, fd, score_mean, score_std, num_samples), ``table.md`` (rows = eta
  or sigma-hat, columns = steps, cells = FD, as DDIM Table 1) and ``table.png`` (FD vs steps, log x);
- ``metrics.json`` (everything above in one place), ``timings.json`` (seconds per phase);
- the figures of ``ddm.figures``.

Timesteps are 0-based (t = 0 is the decoder term, the papers' t = 1). Bits/dim are per-example means
over the H * W * C dimensions, averaged over the examples of the split.
"""
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from ddm import data
from ddm.checkpoint import Checkpointer
from ddm.diffusion import Diffusion
from ddm.experiment import RESPACINGS, build_diffusion, build_model, build_sampling_diffusion, config_changes
from ddm.likelihood import bits_per_dim
from ddm.respacing import respace, space_timesteps
from ddm.sampling import ddim_sample, ddpm_sample
from ddm.train import AXIS, ema_key, replicate

EVAL_DIR = "eval"
FEATURE_SPACES = ("inception", "classifier")
KEY_STREAMS = {"samples": 2, "nll": 3, "figures": 4}  # fold_in(PRNGKey(seed), stream); --mode=sample uses seed + 1
SIGMA_HAT = "sigma-hat"  # the table row of DDPM ancestral sampling with the larger variance (DDIM Table 1)
# Fields that fix what the checkpoint's network computes; an eval config must agree with the training one.
MODEL_FIELDS = ("data.name", "data.image_size", "model.ch", "model.ch_mult", "model.num_res_blocks",
                "model.attn_resolutions", "model.resblock_updown", "model.num_heads", "model.num_head_channels",
                "model.scale_shift_norm", "model.class_conditional", "diffusion.num_timesteps",
                "diffusion.schedule", "diffusion.mean_type")


# ----------------------------------------------------------------------------------------------------------------
# Files.


def eval_dir(workdir: str) -> str:
    """``<workdir>/eval``: where every artifact of --mode=eval goes."""
    return os.path.join(workdir, EVAL_DIR)


def stream_key(config: ml_collections.ConfigDict, stream: str):
    """The PRNG key of one use of randomness (``KEY_STREAMS``), from ``config.seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), KEY_STREAMS[stream])


def is_writer() -> bool:
    """Only process 0 writes files."""
    return jax.process_index() == 0


def write_atomically(path: str, write) -> str:
    """Call ``write(file)`` on ``path + '.tmp'`` (binary), then rename it to ``path``: no partial file ever
    carries the final name. Does nothing on processes other than 0. Returns ``path``."""
    if is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            write(f)
        os.replace(path + ".tmp", path)
    return path


def write_json(path: str, obj) -> str:
    """``obj`` as indented JSON at ``path`` (atomically, process 0 only)."""
    return write_atomically(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_csv(path: str, header, rows) -> str:
    """A CSV file of a header and rows (sequences of values written with str), atomically."""
    def write(f):
        lines = [",".join(map(str, header))] + [",".join(map(str, row)) for row in rows]
        f.write(("\n".join(lines) + "\n").encode())
    return write_atomically(path, write)


def new_figure():
    """A matplotlib (figure, axes) drawn by the Agg canvas: no pyplot, no display, no global backend."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    fig = Figure(figsize=(6, 4))
    return fig, fig.subplots()


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as PNG, atomically."""
    return write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


# ----------------------------------------------------------------------------------------------------------------
# Config checks and the checkpoint.


def validate_eval(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Check the ``eval`` fields before any compute (``num_devices``: all processes' devices); errors name the
    field, the value and the fix."""
    ev, num_timesteps = config.eval, config.diffusion.num_timesteps
    if ev.batch_size < 1 or ev.batch_size % num_devices:
        raise ValueError(f"eval.batch_size={ev.batch_size} is not a positive multiple of the {num_devices} "
                         f"devices; use a multiple of {num_devices}")
    if ev.nll_strided_steps != 0 and not 2 <= ev.nll_strided_steps <= num_timesteps:
        raise ValueError(f"eval.nll_strided_steps={ev.nll_strided_steps} must be 0 (full bound only) or in "
                         f"2..{num_timesteps} (diffusion.num_timesteps)")
    if any(s < 2 for s in ev.table_steps):
        raise ValueError(f"eval.table_steps={tuple(ev.table_steps)} has step counts below 2; each must be >= 2")
    if any(eta < 0 for eta in ev.table_etas):
        raise ValueError(f"eval.table_etas={tuple(ev.table_etas)} has a negative eta; DDIM needs eta >= 0")
    for field in ("num_samples", "table_num_samples"):
        if ev[field] < 1:
            raise ValueError(f"eval.{field}={ev[field]} must be >= 1")
    if config.sample.method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sample.method={config.sample.method!r}; allowed: 'ddpm', 'ddim'")
    if config.sample.respacing not in RESPACINGS:
        raise ValueError(f"unknown sample.respacing={config.sample.respacing!r}; "
                         f"allowed: {', '.join(map(repr, RESPACINGS))}")
    for steps in (s for s in ev.table_steps if s < num_timesteps):
        try:
            space_timesteps(num_timesteps, RESPACINGS[config.sample.respacing].format(steps))
        except ValueError as e:
            raise ValueError(f"eval.table_steps has {steps}, which sample.respacing={config.sample.respacing!r} "
                             f"cannot keep of {num_timesteps} steps ({e}); change either field") from None


def config_mismatches(config: ml_collections.ConfigDict, saved: dict) -> list:
    """The ``MODEL_FIELDS`` (and ``diffusion.var_type``'s learned-or-fixed kind) in which ``config``
    differs from ``saved`` (a training run's config.json, as a dict), as "field=value (checkpoint: value)"."""
    out = [f"{field}={new!r} (checkpoint: {old!r})" for field, new, old in config_changes(config, saved, MODEL_FIELDS)]
    learned = lambda var_type: var_type in ("learned", "learned_range")
    saved_var = saved.get("diffusion", {}).get("var_type")
    if saved_var is not None and learned(saved_var) != learned(config.diffusion.var_type):
        out.append(f"diffusion.var_type={config.diffusion.var_type!r} (checkpoint: {saved_var!r}; a learned "
                   f"variance adds output channels)")
    return out


def shape_mismatches(expected, found) -> list:
    """Parameter paths whose shapes differ between two trees (or that only one has), as readable lines."""
    flat = lambda tree: {jax.tree_util.keystr(path): np.shape(leaf)
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    expected, found = flat(expected), flat(found)
    return [f"{path}: {expected.get(path, 'absent')} here, {found.get(path, 'absent')} in the checkpoint"
            for path in sorted(set(expected) | set(found)) if expected.get(path) != found.get(path)]


def load_params(config: ml_collections.ConfigDict, workdir: str, model, image_shape) -> tuple:
    """The latest checkpoint's EMA parameters (``optim.ema_rates[0]``) and its step.

    The network of ``config`` must be the one trained: the fields of ``MODEL_FIELDS`` are compared with
    ``<workdir>/config.json`` and every parameter shape with the model's on ``image_shape`` (H, W, C).
    Raises FileNotFoundError without a checkpoint, ValueError (naming the fields) on a mismatch.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    checkpointer = Checkpointer(workdir) if os.path.isdir(directory) else None
    step = None if checkpointer is None else checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: train first with --mode=train and the same "
                                f"--workdir={workdir}")
    saved_config = os.path.join(workdir, "config.json")
    if os.path.exists(saved_config):
        with open(saved_config) as f:
            mismatches = config_mismatches(config, json.load(f))
        if mismatches:
            raise ValueError(f"the config does not match the checkpoint's ({saved_config}): "
                             f"{'; '.join(mismatches)}; evaluate with the training config's values")
    state = checkpointer.restore_latest()  # as saved, no optimizer template; an unreadable one falls back
    checkpointer.close()
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {directory} (see the warnings above): train again with "
                                f"--mode=train and the same --workdir={workdir}")
    step = int(state["step"])
    key = ema_key(config.optim.ema_rates[0])
    if key not in state["ema_params"]:
        raise ValueError(f"optim.ema_rates[0]={config.optim.ema_rates[0]} has no EMA copy in checkpoint step {step}; "
                         f"it has rates {sorted(state['ema_params'])}: put one of them first in optim.ema_rates")
    params = state["ema_params"][key]
    mismatches = shape_mismatches(param_shapes(config, model, image_shape), params)
    if mismatches:
        raise ValueError(f"the checkpoint's parameters do not fit the model of this config (model.*, "
                         f"diffusion.var_type, data.name's channels): {'; '.join(mismatches[:5])}; evaluate with "
                         f"the training config")
    return params, int(step)


def param_shapes(config, model, image_shape):
    """The parameter tree of ``model`` on images of ``image_shape`` (H, W, C), as shapes (nothing computed)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if config.model.class_conditional else None
    init = lambda: model.init({"params": jax.random.PRNGKey(0)}, x, jnp.zeros((1,), jnp.int32), y, train=False)
    return jax.eval_shape(init)["params"]


# ----------------------------------------------------------------------------------------------------------------
# The variational bound.


def make_nll_step(model, diffusion: Diffusion, clip_denoised: bool, conditional: bool):
    """A pmapped ``step(params, batch, key) -> sums`` of the bound over one eval batch.

    ``batch``: image (D, B, H, W, C) float in [-1, 1], label (D, B), mask (D, B), index (D, B) int32, the
    example's position in the split. Example i draws its noise from ``fold_in(key, i)``, so the bound of an
    example does not depend on the batch size or the device count. Returns mask-weighted sums over the
    batch of all devices: total_bpd, prior_bpd (scalars), vb, x0_mse, eps_mse (T,), count.
    """

    def per_example(params, x0, label, key):
        labels = label[None] if conditional else None
        model_fn = lambda x, t: model.apply({"params": params}, x, t, labels, train=False).astype(jnp.float32)
        out = bits_per_dim(diffusion, model_fn, x0[None], key, clip_denoised)
        return {name: out[name][0] for name in ("total_bpd", "prior_bpd", "vb", "x0_mse", "eps_mse")}

    def step(params, batch, key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
        out = jax.vmap(per_example, in_axes=(None, 0, 0, 0))(params, batch["image"], batch["label"], keys)
        sums = {name: jnp.tensordot(batch["mask"], value, axes=1) for name, value in out.items()}
        sums["count"] = jnp.sum(batch["mask"])
        return jax.lax.psum(sums, AXIS)

    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None))


def batch_indices(batch_index: int, batch_size: int, num_devices: int) -> np.ndarray:
    """Positions in the split of this process's part of eval batch ``batch_index``, laid out (D, B / D) as
    ``data.eval_batches`` lays out its batches (padding positions run past the split's end)."""
    per_process = batch_size // jax.process_count()
    start = batch_index * batch_size + jax.process_index() * per_process
    return np.arange(start, start + per_process, dtype=np.int32).reshape(num_devices, -1)


def bound_means(nll_step, params, source, batch_size: int, key, desc: str = "nll") -> dict:
    """Means over the examples of ``source`` of the sums of ``nll_step`` (see ``make_nll_step``), padded
    examples excluded: {name: float or (T,) float64 array, "num_examples": int}. ``params`` replicated."""
    num_devices = jax.local_device_count()
    totals = {}
    batches = data.eval_batches(source, batch_size=batch_size, num_devices=num_devices)
    for b, batch in enumerate(tqdm(batches, total=-(-len(source) // batch_size), desc=desc,
                                   disable=not is_writer())):
        batch["index"] = batch_indices(b, batch_size, num_devices)
        for name, value in nll_step(params, batch, key).items():  # psum'd: every device holds the total
            totals[name] = totals.get(name, 0.0) + np.asarray(value.addressable_data(0)[0], np.float64)
    count = totals.pop("count")
    return {**{name: value / count for name, value in totals.items()}, "num_examples": int(round(float(count)))}


def strided_diffusion(diffusion: Diffusion, steps: int) -> Diffusion:
    """IDDPM's strided bound: ``steps`` evenly spread steps (alpha-bar kept); ``steps`` = T is the full one."""
    if steps == diffusion.num_timesteps:
        return diffusion
    return respace(diffusion, space_timesteps(diffusion.num_timesteps, steps))


def write_nll_terms(means: dict, directory: str) -> tuple:
    """``nll_terms.csv`` (t, vb_bpd, x0_mse, eps_mse) and ``nll_terms.png`` (vb term vs t, log y)."""
    t = np.arange(len(means["vb"]))
    rows = [(i, f"{means['vb'][i]:.8g}", f"{means['x0_mse'][i]:.8g}", f"{means['eps_mse'][i]:.8g}") for i in t]
    csv_path = write_csv(os.path.join(directory, "nll_terms.csv"), ("t", "vb_bpd", "x0_mse", "eps_mse"), rows)
    fig, ax = new_figure()
    ax.plot(t, means["vb"])
    ax.set_yscale("log")
    ax.set_xlabel("diffusion step t (0 = decoder)")
    ax.set_ylabel("loss term (bits/dim)")
    ax.set_title("terms of the variational bound")
    return csv_path, save_figure(fig, os.path.join(directory, "nll_terms.png"))


def evaluate_nll(config, model, params, diffusion: Diffusion, source, step: int, directory: str) -> dict:
    """The full bound in bits/dim over ``source`` and the strided one over ``eval.nll_strided_steps``, with
    predicted x0 clipped to [-1, 1] as ``sample.clip_denoised`` says (improved-diffusion clips); writes
    nll.json, nll_terms.csv and nll_terms.png under ``directory``. ``params`` replicated."""
    start = time.time()
    ev = config.eval
    key = stream_key(config, "nll")
    conditional = config.model.class_conditional
    full = bound_means(make_nll_step(model, diffusion, config.sample.clip_denoised, conditional),
                       params, source, ev.batch_size, key)
    strided_bpd = None
    if ev.nll_strided_steps == diffusion.num_timesteps:
        strided_bpd = full["total_bpd"]
    elif ev.nll_strided_steps:
        strided = make_nll_step(model, strided_diffusion(diffusion, ev.nll_strided_steps),
                                config.sample.clip_denoised, conditional)
        strided_bpd = bound_means(strided, params, source, ev.batch_size, key, desc="strided nll")["total_bpd"]
    write_nll_terms(full, directory)
    result = {"total_bpd": float(full["total_bpd"]), "prior_bpd": float(full["prior_bpd"]),
              "strided_bpd": None if strided_bpd is None else float(strided_bpd),
              "strided_steps": ev.nll_strided_steps, "num_examples": full["num_examples"],
              "checkpoint_step": step, "seconds": round(time.time() - start, 2)}
    write_json(os.path.join(directory, "nll.json"), result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Sampling.


def make_sample_fn(model, method: str, clip_denoised: bool, per_device_shape, num_classes=None):
    """A pmapped ``sample(params, diffusion, eta, key) -> images`` float (D, B, H, W, C) in [-1, 1].

    ``diffusion`` and ``eta`` are arguments, so the settings of a table share one compilation per step
    count. Each device folds its index into ``key``. A model with a learned variance is used through its
    mean channels only when ``diffusion`` has a fixed variance (sigma-hat). Class-conditional models get
    uniformly random labels.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sample.method={method!r}; allowed: 'ddpm', 'ddim'")
    channels = per_device_shape[-1]

    def sample(params, diffusion, eta, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        label_key, key = jax.random.split(key)
        labels = None if num_classes is None else jax.random.randint(label_key, per_device_shape[:1], 0, num_classes)

        def model_fn(x, t):
            out = model.apply({"params": params}, x, t, labels, train=False).astype(jnp.float32)
            return out if diffusion.learned_variance else out[..., :channels]

        if method == "ddpm":
            return ddpm_sample(diffusion, model_fn, key, per_device_shape, clip_denoised=clip_denoised)
        return ddim_sample(diffusion, model_fn, key, per_device_shape, eta=eta, clip_denoised=clip_denoised)

    return jax.pmap(sample, axis_name=AXIS, in_axes=(0, None, None, 0))


def shard_path(directory: str, index: int) -> str:
    """``directory/shard_%05d.npz``: the samples of sampler call ``index``."""
    return os.path.join(directory, f"shard_{index:05d}.npz")


def shards_present(directory: str, num_shards: int) -> np.ndarray:
    """Which of the shards 0..num_shards-1 are in ``directory``, as process 0 sees them (all processes must
    agree: the sampler is one program over every device)."""
    present = np.array([os.path.exists(shard_path(directory, i)) for i in range(num_shards)], dtype=np.int32)
    if jax.process_count() > 1:
        present = np.asarray(multihost_utils.broadcast_one_to_all(present))
    return present.astype(bool)


def gather_images(images) -> np.ndarray:
    """uint8 (N, H, W, C) of every device of every process from this process's float (D, B, H, W, C)."""
    images = np.asarray(images if jax.process_count() == 1 else multihost_utils.process_allgather(images))
    return data.to_uint8(images.reshape((-1,) + images.shape[-3:]))


def load_shard(path: str, batch_size: int) -> np.ndarray:
    """The uint8 images of a shard, which must hold ``batch_size`` (eval.batch_size) of them."""
    with np.load(path) as f:
        images = f["images"]
    if len(images) != batch_size:
        raise ValueError(f"{path} holds {len(images)} samples but eval.batch_size={batch_size}: delete "
                         f"{os.path.dirname(path)} or evaluate with eval.batch_size={len(images)}")
    return images


def sample_shards(sample_step, params, key, num: int, batch_size: int, directory: str, desc: str = "sampling"):
    """``num`` uint8 samples (num, H, W, C), ``batch_size`` (global) per call of ``sample_step(params, keys)``
    (keys replicated over the local devices; it returns float (D, B, H, W, C) in [-1, 1]).

    Resumable: shard i (the images of call i, keyed by ``fold_in(key, i)``) is written atomically to
    ``directory/shard_%05d.npz`` (uint8 ``images``), and a shard already there is loaded instead of
    sampled, so an interrupted run, restarted, returns exactly what an uninterrupted one would.
    """
    shards = []
    present = shards_present(directory, -(-num // batch_size))
    for i in tqdm(range(len(present)), desc=desc, disable=not is_writer()):
        path = shard_path(directory, i)
        if present[i]:
            images = load_shard(path, batch_size)
        else:
            images = gather_images(sample_step(params, replicate(jax.random.fold_in(key, i))))
            write_atomically(path, lambda f, images=images: np.savez(f, images=images))
        shards.append(images)
    return np.concatenate(shards)[:num]


# ----------------------------------------------------------------------------------------------------------------
# Feature spaces and metrics.


def resolve_feature_space(config: ml_collections.ConfigDict) -> str:
    """``eval.feature_space``, with "auto" resolved: the digits classifier for digits, else Inception."""
    space = config.eval.feature_space
    if space == "auto":
        return "classifier" if config.data.name == data.DIGITS else "inception"
    if space not in FEATURE_SPACES:
        raise ValueError(f"unknown eval.feature_space={space!r}; allowed: 'auto', "
                         f"{', '.join(map(repr, FEATURE_SPACES))}")
    if space == "classifier" and config.data.name != data.DIGITS:
        raise ValueError(f"eval.feature_space='classifier' is trained on the digits only, but data.name="
                         f"{config.data.name!r}: use eval.feature_space='inception' (or 'auto')")
    return space


def load_extractor(config: ml_collections.ConfigDict, space: str, directory: str):
    """``extract(images uint8 NHWC) -> {"pool": (N, D), "logits": (N, K)}`` of the feature space. Inception
    reads ``eval.inception_path`` (its loader's error if missing); the classifier is trained once and
    cached under ``directory/classifier``."""
    if space == "inception":
        from ddm import inception  # pylint: disable=import-outside-toplevel
        return inception.make_extractor(inception.load_params(config.eval.inception_path))
    from ddm import classifier  # pylint: disable=import-outside-toplevel
    params, info = classifier.load_or_train(os.path.join(directory, "classifier"), config.data.image_size)
    logging.info("digits classifier: test accuracy %.4f", info["accuracy"])
    return classifier.make_extractor(params, config.data.image_size)


def feature_summary(extract, images: np.ndarray) -> dict:
    """mu (D,), sigma (D, D) of the pool features and the score (mean, std over 10 splits) of the logits."""
    from ddm import metrics  # pylint: disable=import-outside-toplevel
    features = extract(images)
    mu, sigma = metrics.feature_statistics(features["pool"])
    score_mean, score_std = metrics.inception_score(features["logits"])
    return {"mu": mu, "sigma": sigma, "score_mean": float(score_mean), "score_std": float(score_std),
            "num": len(images)}


def reference_statistics(extract, source, path: str) -> dict:
    """``feature_summary`` of every image of ``source``, computed once and cached at ``path`` (npz)."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {"mu": f["mu"], "sigma": f["sigma"], "score_mean": float(f["score_mean"]),
                    "score_std": float(f["score_std"]), "num": int(f["num"])}
    images = np.stack([source[i]["image"] for i in range(len(source))])
    stats = feature_summary(extract, images)
    write_atomically(path, lambda f: np.savez(f, **stats))
    return stats


def sample_metrics(extract, images: np.ndarray, reference: dict) -> dict:
    """{fd, score_mean, score_std, num_samples}: the Frechet distance of ``images`` to ``reference`` in the
    pool space, and the score of their logits."""
    from ddm import metrics  # pylint: disable=import-outside-toplevel
    stats = feature_summary(extract, images)
    fd = metrics.frechet_distance(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"])
    return {"fd": float(fd), "score_mean": stats["score_mean"], "score_std": stats["score_std"],
            "num_samples": len(images)}


# ----------------------------------------------------------------------------------------------------------------
# DDIM's steps-vs-quality table.


@dataclasses.dataclass(frozen=True)
class Setting:
    """A sampler over ``steps`` steps kept by ``respacing`` (all T steps: the diffusion itself): DDIM with
    ``eta``, or DDPM ancestral sampling with the diffusion's variance or, with ``sigma_hat``, the larger
    variance sqrt(beta) of the respaced process (DDIM Table 1's sigma-hat row)."""
    method: str
    steps: int
    respacing: str
    eta: float = 0.0
    sigma_hat: bool = False


def setting_diffusion(diffusion: Diffusion, setting: Setting) -> Diffusion:
    """The diffusion ``setting`` samples from: ``diffusion`` respaced, fixed_large for sigma-hat."""
    num_timesteps = diffusion.num_timesteps
    spaced = diffusion if setting.steps == num_timesteps else respace(
        diffusion, space_timesteps(num_timesteps, RESPACINGS[setting.respacing].format(setting.steps)))
    return dataclasses.replace(spaced, var_type="fixed_large") if setting.sigma_hat else spaced


def setting_tag(setting: Setting, num_timesteps: int, var_type: str, clip_denoised: bool) -> str:
    """The name of a setting's sample directory; equal samplers get equal names, so the sample.* setting and
    the table cell that is the same sampler share their shards."""
    kind = (f"ddim_eta{setting.eta:g}" if setting.method == "ddim"
            else f"ddpm_{'fixed_large' if setting.sigma_hat else var_type}")
    spacing = "all" if setting.steps == num_timesteps else setting.respacing
    return f"{kind}_{spacing}{setting.steps}" + ("" if clip_denoised else "_noclip")


def table_cells(table_steps, table_etas, respacing: str, num_timesteps: int) -> tuple:
    """([(row label, Setting)], skipped steps): DDIM per (eta, steps), then sigma-hat per steps, for the
    step counts up to ``num_timesteps``; larger ones are skipped. Rows are "eta=<eta>" and "sigma-hat"."""
    kept = [int(s) for s in table_steps if s <= num_timesteps]
    skipped = [int(s) for s in table_steps if s > num_timesteps]
    cells = [(f"eta={eta:g}", Setting("ddim", s, respacing, float(eta))) for eta in table_etas for s in kept]
    return cells + [(SIGMA_HAT, Setting("ddpm", s, respacing, sigma_hat=True)) for s in kept], skipped


def table_markdown(results: list, rows: list, steps: list) -> str:
    """DDIM Table 1's layout: one row per eta (then sigma-hat), one column per step count, FD in the cells."""
    fd = {(r["row"], r["steps"]): r["fd"] for r in results}
    lines = ["| row | " + " | ".join(f"S={s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{fd[row, s]:.2f}" for s in steps) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(results: list, directory: str, feature_space: str) -> dict:
    """table.csv, table.md and table.png (FD vs steps, one line per row, log x) under ``directory``."""
    rows = list(dict.fromkeys(r["row"] for r in results))
    steps = sorted({r["steps"] for r in results})
    header = ("row", "steps", "fd", "score_mean", "score_std", "num_samples")
    paths = {"table_csv": write_csv(os.path.join(directory, "table.csv"), header,
                                    [tuple(f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in header)
                                     for r in results])}
    md = table_markdown(results, rows, steps)
    paths["table_md"] = write_atomically(os.path.join(directory, "table.md"), lambda f: f.write(md.encode()))
    fig, ax = new_figure()
    for row in rows:
        points = sorted((r["steps"], r["fd"]) for r in results if r["row"] == row)
        ax.plot(*zip(*points), marker="o", label=row)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps S")
    ax.set_ylabel(f"Frechet distance ({feature_space} features)")
    ax.legend()
    paths["table_png"] = save_figure(fig, os.path.join(directory, "table.png"))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The whole evaluation.


def sample_dir(directory: str, tag: str, step: int, seed: int) -> str:
    """Where the shards of one sampling setting go; the checkpoint step and the seed are part of the name, so
    a newer checkpoint never reuses older samples."""
    return os.path.join(directory, "samples", f"{tag}_step{step}_seed{seed}")


def make_setting_sampler(config, model, params, image_shape, step: int, directory: str):
    """``sample(setting, diffusion, num) -> uint8 (num, H, W, C)``: ``num`` samples of a ``Setting`` over its
    ``diffusion`` (see ``setting_diffusion``) with the replicated ``params``, ``eval.batch_size`` per call,
    resumable under ``directory/samples`` (see ``sample_dir``, ``setting_tag``)."""
    num_classes = config.data.num_classes if config.model.class_conditional else None
    shape = (config.eval.batch_size // jax.device_count(),) + tuple(image_shape)
    clip = config.sample.clip_denoised
    sample_fns = {m: make_sample_fn(model, m, clip, shape, num_classes) for m in ("ddpm", "ddim")}
    key = stream_key(config, "samples")

    def sample(setting: Setting, diffusion: Diffusion, num: int) -> np.ndarray:
        tag = setting_tag(setting, config.diffusion.num_timesteps, config.diffusion.var_type, clip)
        step_fn = lambda p, keys: sample_fns[setting.method](p, diffusion, setting.eta, keys)
        return sample_shards(step_fn, params, key, num, config.eval.batch_size,
                             sample_dir(directory, tag, step, config.seed), desc=tag)

    return sample


def run_figures(config, workdir: str, diffusion: Diffusion, model, params, source) -> dict:
    """``ddm.figures.write_figures`` with the unreplicated EMA ``params`` and the first images of ``source``;
    {} if that module is absent. A class-conditional model draws every figure as class 0."""
    try:
        from ddm import figures  # pylint: disable=import-outside-toplevel
    except ModuleNotFoundError as e:
        if e.name != "ddm.figures":
            raise
        logging.warning("ddm.figures is not available: no figures written")
        return {}
    num = min(len(source), max(2 * figures.FIGURE_ROWS, config.eval.reconstruction_examples))
    images = np.stack([source[i]["image"] for i in range(num)])
    conditional = config.model.class_conditional

    def model_fn(x, t):
        labels = jnp.zeros(x.shape[:1], jnp.int32) if conditional else None
        return model.apply({"params": params}, x, t, labels, train=False).astype(jnp.float32)

    return figures.write_figures(config, workdir, diffusion, model_fn, images, stream_key(config, "figures"))


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluate the latest checkpoint of ``workdir`` (EMA params): the bound, the sample.* setting's FD and
    score over ``eval.num_samples`` samples, the steps-vs-quality table, the figures. Writes the files of
    the module docstring under ``<workdir>/eval`` and returns what metrics.json holds.

    Cheap failures come first: a missing checkpoint, a mismatched config, missing Inception weights and too
    few samples for the feature dimension all raise before the bound or any sampling is computed.
    """
    timings, clock = {}, time.time()

    def lap(phase):
        nonlocal clock
        timings[phase] = round(time.time() - clock, 2)
        clock = time.time()

    validate_eval(config, jax.device_count())
    ev, directory = config.eval, eval_dir(workdir)
    source = data.load_source(config.data.name, ev.split, image_size=config.data.image_size,
                              data_dir=config.data.data_dir)
    image_shape = data.image_shape(source)
    model = build_model(config, image_shape[-1])
    params, step = load_params(config, workdir, model, image_shape)
    diffusion = build_diffusion(config)
    sample_diffusion = build_sampling_diffusion(config, diffusion)
    s = config.sample
    cells, skipped = table_cells(ev.table_steps, ev.table_etas, s.respacing, diffusion.num_timesteps)
    for steps in skipped:
        logging.info("table: steps=%d skipped, more than diffusion.num_timesteps=%d", steps, diffusion.num_timesteps)
    space = resolve_feature_space(config)
    extract = load_extractor(config, space, directory)
    lap("load")

    from ddm import metrics  # pylint: disable=import-outside-toplevel
    reference = reference_statistics(extract, source, os.path.join(directory, f"ref_stats_{space}_{ev.split}.npz"))
    dim = len(reference["mu"])
    metrics.check_enough_samples(ev.num_samples, dim, "eval.num_samples")
    if cells:
        metrics.check_enough_samples(ev.table_num_samples, dim, "eval.table_num_samples")
    lap("reference")

    replicated = replicate(params)
    nll = evaluate_nll(config, model, replicated, diffusion, source, step, directory)
    lap("nll")

    sample_setting = make_setting_sampler(config, model, replicated, image_shape, step, directory)
    setting = Setting(s.method, s.steps, s.respacing, float(s.eta))
    sample_result = sample_metrics(extract, sample_setting(setting, sample_diffusion, ev.num_samples), reference)
    lap("samples")

    table = []
    for row, cell in cells:
        images = sample_setting(cell, setting_diffusion(diffusion, cell), ev.table_num_samples)
        table.append({"row": row, "steps": cell.steps, **sample_metrics(extract, images, reference)})
    table_paths = write_table(table, directory, space) if table else {}
    lap("table")

    figure_paths = run_figures(config, workdir, diffusion, model, params, source) if is_writer() else {}
    lap("figures")

    results = {"checkpoint_step": step, "feature_space": space, "split": ev.split, "nll": nll,
               "reference": {"score_mean": reference["score_mean"], "score_std": reference["score_std"],
                             "num": reference["num"]},
               "sample": {"method": s.method, "steps": s.steps, "eta": float(s.eta), **sample_result},
               "table": table, "table_skipped_steps": skipped, "files": {**table_paths, **figure_paths},
               "timings": timings}
    write_json(os.path.join(directory, "timings.json"), timings)
    write_json(os.path.join(directory, "metrics.json"), results)
    logging.info("eval of step %d: NLL %.4f bits/dim (strided %s), %s FD %.4f, score %.3f +- %.3f over %d "
                 "samples; table of %d cells; %.1f s", step, nll["total_bpd"], nll["strided_bpd"], space,
                 sample_result["fd"], sample_result["score_mean"], sample_result["score_std"], ev.num_samples,
                 len(table), sum(timings.values()))
    return results
