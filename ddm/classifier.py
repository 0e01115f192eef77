"""A small CNN classifier of the embedded digits, trained by the project, used as an evaluation feature space.

Inception-v3 features mean nothing for 8x8 handwritten digits, so sample quality on the ``digits`` dataset is
measured in the feature space of this classifier instead, trained on the digits' "train" split at the image
size being evaluated:

    params, info = load_or_train(cache_dir, image_size=16)   # info: {"accuracy": test-split accuracy, ...}
    extract = make_extractor(params, image_size=16)
    features = extract(images_uint8)                         # {"pool": (N, 128), "logits": (N, 10)} float64

``extract`` has the same contract as the Inception-v3 extractor: ``"pool"`` is the penultimate layer (the
space of a Frechet distance), ``"logits"`` the class logits (for a classifier-based Inception-Score-like score).

NOT COMPARABLE TO PAPERS: a Frechet distance or score computed in this feature space is NOT FID or IS, and its
numbers are NOT comparable to the CIFAR-10 (or any other) FID / IS numbers reported in papers, which use
Inception-v3 features of 299x299 natural images. They are only comparable with each other: same image size,
same classifier (same seed, steps and cache), same number of samples and same reference split.

The network (``DigitsCNN``): ``log2(image_size) - 1`` stages of [3x3 conv, ReLU, 2x2 average pool] down to a
2x2 map, the conv at resolution r having ``STAGE_CHANNELS[r]`` channels (64 at 4x4, 32 at 8x8, 16 above, so the
larger sizes cost little more than 8x8); flatten (256); Dense(128) + ReLU (``"pool"``); Dense(10) (``"logits"``).
Training: AdamW (learning rate 3e-3 with cosine decay to 0, weight decay 1e-4) on batches of 128 drawn with
replacement, each image shifted by a random whole number of original (8x8) pixels in [-1, 1] on each axis with
background filled in; the batch of step ``s`` is a pure function of ``(seed, s)``. Test accuracy at 8x8 over
seeds 0-4: 0.98-0.99 (297 test images).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddm import data

NUM_CLASSES = 10
FEATURE_DIM = 128  # size of the "pool" features
DEFAULT_STEPS = 600
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
STAGE_CHANNELS = {32: 16, 16: 16, 8: 32, 4: 64}  # conv channels of the stage whose input is r x r pixels
CACHE_FORMAT = 1  # bumped when the network or the cache layout changes, so that old caches are retrained

Params = dict


class DigitsCNN(nn.Module):
    """[conv3x3 -> ReLU -> avgpool2] down to 2x2 -> flatten -> Dense(FEATURE_DIM) -> ReLU -> Dense(NUM_CLASSES).

    ``__call__(x)``: x float32 (B, S, S, 1) in [-1, 1], S a power of 2 in STAGE_CHANNELS
    -> (pool (B, FEATURE_DIM), logits (B, NUM_CLASSES)).
    """

    @nn.compact
    def __call__(self, x):
        while x.shape[1] > 2:
            x = nn.relu(nn.Conv(STAGE_CHANNELS[x.shape[1]], (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        pool = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return pool, nn.Dense(NUM_CLASSES)(pool)


def network(image_size: int) -> DigitsCNN:
    """The classifier for square images of side ``image_size`` (one of data.DIGITS_IMAGE_SIZES), down to 2x2."""
    if image_size not in data.DIGITS_IMAGE_SIZES:
        raise ValueError(f"data.image_size={image_size!r} has no digits classifier; "
                         f"choose one of {data.DIGITS_IMAGE_SIZES}")
    return DigitsCNN()


def init_params(image_size: int, seed: int = 0) -> Params:
    """Freshly initialised parameters of ``network(image_size)`` (a pytree of float32 arrays)."""
    x = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    return network(image_size).init(jax.random.PRNGKey(seed), x)["params"]


def split_arrays(image_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``split`` as uint8 images (N, S, S, 1) and int32 labels (N,)."""
    source = data.load_source(data.DIGITS, split, image_size=image_size)
    return np.asarray(source.images), np.asarray(source.labels, np.int32)


def random_shift(key, images, max_shift: int):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift]^2 pixels, filling with -1.

    images: float32 (B, S, S, C) in [-1, 1] (-1 is the digits' background) -> same shape.
    """
    size = images.shape[1]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (size, size, image.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _make_train_step(model: DigitsCNN, optimizer: optax.GradientTransformation, images, labels, seed: int,
                     max_shift: int) -> Callable:
    """A jitted ``step(params, opt_state, step) -> (params, opt_state, loss)`` on a batch drawn from (seed, step).

    images: float32 (N, S, S, 1) in [-1, 1] and labels: int32 (N,) of the whole train split, held on device.
    """
    base_key = jax.random.PRNGKey(seed)

    def loss_fn(params, x, y):
        _, logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, step_index):
        index_key, shift_key = jax.random.split(jax.random.fold_in(base_key, step_index))
        index = jax.random.randint(index_key, (BATCH_SIZE,), 0, images.shape[0])
        x = random_shift(shift_key, images[index], max_shift)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def accuracy(params: Params, image_size: int, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of uint8 images (N, S, S, 1) whose argmax logit equals the int label (N,)."""
    logits = make_extractor(params, image_size)(images)["logits"]
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def train_classifier(image_size: int, seed: int = 0, steps: int = DEFAULT_STEPS) -> tuple[Params, dict]:
    """Train ``network(image_size)`` on the digits' "train" split; evaluate it on the "test" split.

    Returns:
      params: the trained parameters.
      info: {"accuracy": test-split accuracy in [0, 1], "steps": steps, "seconds": wall-clock training seconds
        (compilation included, evaluation excluded), "image_size", "seed", "format": CACHE_FORMAT}.
    """
    if steps < 1:
        raise ValueError(f"train_classifier: steps={steps!r} must be at least 1")
    model = network(image_size)
    train_images, train_labels = split_arrays(image_size, "train")
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, steps)
    optimizer = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)
    start = time.perf_counter()
    params = init_params(image_size, seed)
    opt_state = optimizer.init(params)
    step = _make_train_step(model, optimizer, jnp.asarray(data.to_float(train_images)), jnp.asarray(train_labels),
                            seed, max_shift=image_size // 8)
    for i in range(steps):
        params, opt_state, _ = step(params, opt_state, i)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    test_images, test_labels = split_arrays(image_size, "test")
    info = {"accuracy": accuracy(params, image_size, test_images, test_labels), "steps": steps,
            "seconds": round(seconds, 2), "image_size": image_size, "seed": seed, "format": CACHE_FORMAT}
    return params, info


def cache_path(cache_dir: str, image_size: int) -> str:
    """``cache_dir/classifier_{image_size}px.msgpack``: params and info; a ``.json`` beside it repeats the info."""
    return os.path.join(cache_dir, f"classifier_{image_size}px.msgpack")


def _write_atomically(path: str, payload: bytes) -> None:
    """Write ``payload`` to a temporary file in the same directory, then rename it to ``path`` (atomic)."""
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                                   suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(cache_dir: str, image_size: int, params: Params, info: dict) -> str:
    """Write params + info atomically to ``cache_path(cache_dir, image_size)`` (and the info json); returns it."""
    os.makedirs(cache_dir, exist_ok=True)
    path = cache_path(cache_dir, image_size)
    state = {"params": flax.serialization.to_state_dict(jax.device_get(params)), "info": json.dumps(info)}
    _write_atomically(path, flax.serialization.msgpack_serialize(state))
    _write_atomically(os.path.splitext(path)[0] + ".json", (json.dumps(info, indent=2) + "\n").encode())
    return path


def _read(path: str, image_size: int, seed: int) -> tuple[Params, dict]:
    """Params and info from a cache file. Raises ValueError if it is unreadable or not of (image_size, seed)."""
    with open(path, "rb") as f:
        payload = f.read()
    template = jax.eval_shape(lambda: init_params(image_size, seed))
    try:
        state = flax.serialization.msgpack_restore(payload)
        info = json.loads(state["info"])
        params = flax.serialization.from_state_dict(template, state["params"])
        shapes = jax.tree.map(lambda t, a: t.shape == np.shape(a), template, params)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    expected = {"image_size": image_size, "seed": seed, "format": CACHE_FORMAT}
    found = {k: info.get(k) for k in expected} if isinstance(info, dict) else info
    if found != expected:
        raise ValueError(f"it was written for {found}, not {expected}")
    if not jax.tree.all(shapes):
        raise ValueError(f"its parameter shapes are not those of network({image_size})")
    return jax.tree.map(jnp.asarray, params), info


def load_or_train(cache_dir: str, image_size: int, seed: int = 0) -> tuple[Params, dict]:
    """The classifier cached in ``cache_dir`` for (image_size, seed), else a freshly trained and cached one.

    The file name holds the image size only: a cache file that cannot be read, or that was written for another
    seed or an older ``CACHE_FORMAT``, is retrained and overwritten, with a logged warning.
    """
    path = cache_path(cache_dir, image_size)
    if os.path.exists(path):
        try:
            params, info = _read(path, image_size, seed)
        except ValueError as e:
            logging.warning("retraining the digits classifier: cache %s is not usable: %s", path, e)
        else:
            logging.info("loaded the digits classifier (test accuracy %s) from %s", info.get("accuracy"), path)
            return params, info
    params, info = train_classifier(image_size, seed)
    save(cache_dir, image_size, params, info)
    logging.info("trained the digits classifier in %.1f s (test accuracy %.4f); cached in %s",
                 info["seconds"], info["accuracy"], path)
    return params, info


def make_extractor(params: Params, image_size: int, batch_size: int = 500) -> Callable[[np.ndarray], dict]:
    """``extract(images)``: uint8 (N, S, S, 1) -> {"pool": float64 (N, FEATURE_DIM), "logits": float64 (N, 10)}.

    S = ``image_size``. Images are fed in batches of ``batch_size`` (the last one padded), through one jitted
    function compiled once for that batch shape. The same contract as the Inception-v3 extractor.
    """
    if batch_size < 1:
        raise ValueError(f"make_extractor: batch_size={batch_size!r} must be at least 1")
    model = network(image_size)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    expected = (image_size, image_size, 1)

    def extract(images: np.ndarray) -> dict:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"classifier features: images of shape {images.shape} do not match data.image_size="
                             f"{image_size}: expected (N, {image_size}, {image_size}, 1); use the classifier of "
                             f"the images' size, or resize the images to {image_size}x{image_size}")
        if images.dtype != np.uint8:
            raise ValueError(f"classifier features: images of dtype {images.dtype}; expected uint8 (0..255): "
                             f"convert float images in [-1, 1] with data.to_uint8")
        pools, logits = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + expected, np.uint8)])
            pool, logit = jax.device_get(apply(params, data.to_float(padded)))
            pools.append(pool[:len(batch)])
            logits.append(logit[:len(batch)])
        if not pools:
            return {"pool": np.zeros((0, FEATURE_DIM)), "logits": np.zeros((0, NUM_CLASSES))}
        return {"pool": np.concatenate(pools).astype(np.float64), "logits": np.concatenate(logits).astype(np.float64)}

    return extract
