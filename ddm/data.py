"""The input pipeline: random-access sources and deterministic, resumable batch iterators.

Data comes from ``tfds.data_source`` (array_record files, read by random access) or from the embedded
``digits`` dataset, and is batched by a ``grain.MapDataset``; TensorFlow is not in the input path.

Why random access rather than a ``tf.data`` stream:

- the batch for step ``s`` is a pure function of ``(seed, s)``: a resumed run asks for batches
  ``start_step, start_step + 1, ...`` and sees exactly what an uninterrupted run would have seen, with no
  iterator state to checkpoint (the step number in the train state is enough);
- no TensorFlow dependency (about 1.3 GB) just to read images;
- ``tfds.testing.mock_data`` works with ``tfds.data_source`` offline, so the TFDS path is tested without data.

Layout of a training batch (``train_batches``): the *global* batch of step ``s`` holds the examples at positions
``s * G .. (s + 1) * G - 1`` of an endless stream that visits the dataset once per epoch in an order drawn from
``(seed, epoch)``; each example is flipped horizontally with probability 1/2 by a counter-based RNG keyed by
``(seed, position in the stream)``. Process ``p`` of ``k`` takes the contiguous slice
``[p * G / k, (p + 1) * G / k)`` of it and reshapes it to ``(num_devices, per_device, ...)`` for ``jax.pmap``.
Neither the order nor the flips depend on the number of processes or devices, so the union over processes is the
same global batch on any topology. A batch may straddle two epochs.

Images are float32 NHWC in [-1, 1] (``x / 127.5 - 1``); ``to_uint8`` is the inverse.
"""
from __future__ import annotations

import collections
import functools
import itertools
import re
import sys
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np

DIGITS = "digits"
DIGITS_IMAGE_SIZES = (8, 16, 32)
DIGITS_DEFAULT_IMAGE_SIZE = 16
DIGITS_NUM_TEST = 297  # of sklearn's 1797 digits; the other 1500 are the train split
DIGITS_SPLIT_SEED = 0

# Distinct streams derived from the user's seed (numpy.random.SeedSequence([seed, purpose, ...])).
_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1

# Batches are assembled by this many threads, with this many finished batches buffered ahead (order is preserved).
DEFAULT_NUM_THREADS = 4
DEFAULT_PREFETCH_BATCHES = 4

Record = dict  # {'image': uint8 array (H, W, C), 'label': int}
Batch = dict  # {'image': float32 (D, B, H, W, C), 'label': int32 (D, B)[, 'mask': float32 (D, B)]}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not prepared on this machine (ddm never downloads data while it runs)."""


# ----------------------------------------------------------------------------------------------------------------
# Sources: random-access sequences of {'image': uint8 (H, W, C), 'label': int}.


class ArraySource(Sequence):
    """A random-access source over in-memory arrays: ``images`` uint8 (N, H, W, C), ``labels`` int (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images (N, H, W, C) and N labels, got images {images.dtype} "
                             f"{images.shape} and labels {np.shape(labels)}")
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.image_shape = tuple(int(d) for d in images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Record:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return f"ArraySource({len(self)} images of shape {self.image_shape})"


class TfdsSource(Sequence):
    """A ``tfds.data_source`` whose records are normalised to ``{'image': uint8 (H, W, C), 'label': int}``.

    Extra features are dropped; a 2-D image gets a channel axis; ``label`` is -1 when the dataset has none.
    """

    def __init__(self, data_source: Sequence, name: str, split: str, image_shape: tuple[int, int, int]):
        self.data_source, self.name, self.split, self.image_shape = data_source, name, split, image_shape

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> Record:
        record = self.data_source[index]
        image = np.asarray(record["image"], np.uint8)
        if image.ndim == 2:
            image = image[:, :, None]
        return {"image": image, "label": int(record.get("label", -1))}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}: {len(self)} images of shape {self.image_shape})"


def load_source(name: str, split: str, *, image_size: int | None = None, data_dir: str | None = None) -> Sequence:
    """A random-access sequence of records ``{'image': uint8 (H, W, C), 'label': int}``.

    ``name="digits"`` is the embedded dataset (scikit-learn's 8x8 handwritten digits, no download), resized to
    ``image_size`` (8, 16 or 32; default 16), one channel; splits "train" (1500) and "test" (297).
    Any other name is a TFDS dataset prepared in array_record format under ``data_dir`` (TFDS's default
    when None); TFDS images are never resized, so a given ``image_size`` must match the dataset's.

    Raises:
      DatasetNotFoundError: the TFDS dataset is unknown or not prepared (the message says how to prepare it).
      ValueError: unknown split, or ``image_size`` not available.
    """
    if name == DIGITS:
        return _load_digits(split, DIGITS_DEFAULT_IMAGE_SIZE if image_size is None else image_size)
    return _load_tfds(name, split, image_size=image_size, data_dir=data_dir)


def image_shape(source: Sequence) -> tuple[int, int, int]:
    """(H, W, C) of the images of ``source``."""
    shape = getattr(source, "image_shape", None)
    if shape is None:
        _check_nonempty(source)
        shape = np.shape(source[0]["image"])
    return tuple(int(d) for d in shape)


def digits_uint8(values: np.ndarray) -> np.ndarray:
    """sklearn's digit intensities 0..16 -> uint8 0..255 as round(v * 255 / 16), halves rounded up (8 -> 128)."""
    return ((np.asarray(values).astype(np.int64) * 255 + 8) // 16).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as read-only uint8 (N, S, S, 1) images (bicubic PIL resize from 8x8) and int64 labels."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    digits = load_digits()
    images = digits_uint8(digits.images)
    if image_size != 8:
        images = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BICUBIC))
                           for im in images])
    images, labels = images[..., None], digits.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(split: str) -> np.ndarray:
    """Sorted indices into sklearn's digits of ``split``: test = the first 297 of permutation(seed 0), train = rest."""
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(1797)
    splits = {"test": order[:DIGITS_NUM_TEST], "train": order[DIGITS_NUM_TEST:]}
    if split not in splits:
        raise ValueError(f"unknown split {split!r} of the digits dataset (data.split); available: {sorted(splits)}")
    return np.sort(splits[split])


def _load_digits(split: str, image_size: int) -> ArraySource:
    if image_size not in DIGITS_IMAGE_SIZES:
        raise ValueError(f"data.image_size={image_size!r} is not available for the digits dataset; "
                         f"choose one of {DIGITS_IMAGE_SIZES}")
    images, labels = _digits_arrays(image_size)
    indices = digits_split_indices(split)
    return ArraySource(images[indices], labels[indices])


def _how_to_prepare(name: str, data_dir: str | None) -> str:
    dir_arg = "" if data_dir is None else f", data_dir={str(data_dir)!r}"
    dir_flag = "" if data_dir is None else f" --data_dir={data_dir}"
    build = f"import tensorflow_datasets as tfds; tfds.data_source({name!r}{dir_arg}, download=True)"
    return (f"To prepare it, on a machine with internet access and `pip install tensorflow-datasets tensorflow` "
            f"(TensorFlow is needed to build, not to read), run\n"
            f"    python -c \"{build}\"\n"
            f"or\n"
            f"    tfds build {name} --file_format=array_record{dir_flag}\n"
            f"then copy the data directory to this machine (the default TFDS data dir, or any directory given as "
            f"--config.data.data_dir).")


def _load_tfds(name: str, split: str, *, image_size: int | None, data_dir: str | None) -> TfdsSource:
    """The TFDS path. Never downloads: a dataset that is not prepared fails at once, with how to prepare it."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        where = data_dir or "the default TFDS data dir"
        raise DatasetNotFoundError(
            f"unknown dataset {name!r} (data.dataset): it is neither the embedded {DIGITS!r} dataset nor a TFDS "
            f"dataset (https://www.tensorflow.org/datasets/catalog) nor prepared under {where}") from None
    prepared = builder.is_prepared()
    if prepared:
        _check_split(name, split, builder.info.splits)
    try:
        # Under tfds.testing.mock_data the builder is not prepared but as_data_source is mocked, so try it first.
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
        if not prepared:
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} is not prepared: nothing found at {builder.data_dir} "
                f"(data_dir={data_dir or builder.data_dir_root}). ddm never downloads data while it runs. "
                + _how_to_prepare(name, data_dir)) from e
        if isinstance(e, NotImplementedError):  # prepared, but as tfrecord: no random access
            raise DatasetNotFoundError(
                f"TFDS dataset {name!r} at {builder.data_dir} is prepared in {builder.info.file_format} format, "
                f"which has no random access; ddm reads array_record. Prepare it again in another data_dir. "
                + _how_to_prepare(name, data_dir)) from e
        raise
    return TfdsSource(data_source, name, split, _tfds_image_shape(builder.info.features, name, image_size))


def _check_split(name: str, split: str, available) -> None:
    """Each split named in ``split`` (e.g. "train", "train[:90%]+test") must exist in the dataset."""
    for part in split.split("+"):
        base = re.sub(r"\[.*\]$", "", part.strip())
        if base not in available:
            raise ValueError(f"unknown split {base!r} of TFDS dataset {name!r} (data.split); "
                             f"available: {sorted(available)}")


def _tfds_image_shape(features, name: str, image_size: int | None) -> tuple[int, int, int]:
    if "image" not in features:
        raise ValueError(f"TFDS dataset {name!r} has no 'image' feature; its features are {sorted(features.keys())}")
    feature = features["image"]
    shape = tuple(feature.shape)
    if len(shape) == 2:
        shape += (1,)
    if np.dtype(feature.np_dtype) != np.uint8:
        raise ValueError(f"TFDS dataset {name!r} has {np.dtype(feature.np_dtype)} images; ddm reads uint8 images")
    if len(shape) != 3 or None in shape:
        raise ValueError(f"TFDS dataset {name!r} has images of variable or unusual shape {shape}; "
                         f"ddm needs a fixed (H, W, C) and does not resize TFDS data")
    if image_size is not None and shape[:2] != (image_size, image_size):
        fix = f"set data.image_size={shape[0]} (or None)" if shape[0] == shape[1] else "set data.image_size=None"
        raise ValueError(f"data.image_size={image_size} does not match TFDS dataset {name!r}, whose images are "
                         f"{shape[0]}x{shape[1]}; ddm does not resize TFDS data: {fix}")
    return tuple(int(d) for d in shape)


# ----------------------------------------------------------------------------------------------------------------
# Batches.


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]: x / 127.5 - 1."""
    return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] -> uint8: round((x + 1) * 127.5), clipped to [0, 255] (inverse of ``to_float``)."""
    x = np.asarray(images, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def train_batches(source: Sequence, *, global_batch_size: int, seed: int, start_step: int = 0,
                  random_flip: bool = True, num_devices: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, num_threads: int = DEFAULT_NUM_THREADS) -> Iterator[Batch]:
    """Endless iterator over this process's part of the training batches from step ``start_step`` on.

    Yields dicts of NumPy arrays: ``image`` float32 (num_devices, per_device, H, W, C) in [-1, 1] and
    ``label`` int32 (num_devices, per_device), with per_device = global_batch_size / (process_count * num_devices).
    The global batch of step ``s`` is a pure function of ``(seed, s)`` (see the module docstring), so starting
    at ``start_step`` gives exactly what an uninterrupted iterator yields from that step. ``num_devices``,
    ``process_index`` and ``process_count`` default to JAX's local device count and process index/count.
    ``num_threads`` threads assemble batches ahead of use (0: in the caller's thread); order is unaffected.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    ds = train_dataset(source, global_batch_size=global_batch_size, seed=seed, random_flip=random_flip,
                       num_devices=num_devices, process_index=process_index, process_count=process_count)
    return iter(ds[start_step:].to_iter_dataset(_read_options(num_threads)))


def train_dataset(source: Sequence, *, global_batch_size: int, seed: int, random_flip: bool = True,
                  num_devices: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
    """The random-access form of ``train_batches``: element ``s`` is this process's part of the batch of step s."""
    num_devices, process_index, process_count = _topology(num_devices, process_index, process_count)
    per_process = _per_process_batch_size(global_batch_size, num_devices, process_count, "global_batch_size")
    _check_nonempty(source)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ds = grain.MapDataset.source(_ShuffledEpochs(source, int(seed)))
    if random_flip:
        flip_seed = int(np.random.SeedSequence([int(seed), _FLIP_STREAM]).generate_state(1)[0])
        ds = ds.random_map(_random_flip, seed=flip_seed)
    # Element j of the per-process batching holds stream positions [j * P, (j + 1) * P); j = s * k + p is the
    # contiguous slice of process p in the global batch of step s.
    ds = ds.batch(per_process, drop_remainder=True)[process_index::process_count]
    return ds.map(functools.partial(_device_layout, num_devices=num_devices))


def eval_batches(source: Sequence, *, batch_size: int, num_devices: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int = DEFAULT_NUM_THREADS) -> Iterator[Batch]:
    """Finite iterator over the whole ``source`` once, in order, for evaluation.

    ``batch_size`` is global (all processes and devices), as in ``train_batches``; batch ``b`` covers source
    indices ``[b * batch_size, (b + 1) * batch_size)``, of which each process takes its contiguous slice, so the
    processes see disjoint shards and all of them yield ceil(N / batch_size) batches. Positions past the end are
    filled with real examples (from the start of the source) and ``mask`` is 0 there: a float32
    (num_devices, per_device) array, 1 for real examples. Layout as in ``train_batches``.
    """
    num_devices, process_index, process_count = _topology(num_devices, process_index, process_count)
    per_process = _per_process_batch_size(batch_size, num_devices, process_count, "batch_size")
    n = _check_nonempty(source)
    total = -(-n // batch_size) * batch_size
    ds = grain.MapDataset.source(source).repeat(-(-total // n))[:total]
    ds = ds.map_with_index(lambda i, record: {**record, "mask": np.float32(i < n)})
    ds = ds.batch(per_process)[process_index::process_count]
    ds = ds.map(functools.partial(_device_layout, num_devices=num_devices))
    return iter(ds.to_iter_dataset(_read_options(num_threads)))


def prefetch_to_device(iterator: Iterator[Batch], size: int = 2, devices: Sequence[jax.Device] | None = None):
    """Yields the batches of ``iterator`` as ``jax.Array``s sharded along their leading axis over ``devices``.

    ``devices`` defaults to ``jax.local_devices()`` (the order ``jax.pmap`` uses); the leading axis must have one
    entry per device. ``jax.device_put`` is asynchronous, so keeping ``size`` batches in flight lets the host
    read and transfer the next batches while the devices compute.
    """
    iterator = iter(iterator)
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)),
                                          jax.sharding.PartitionSpec("devices"))

    def put(x):
        if np.shape(x)[:1] != (len(devices),):
            raise ValueError(f"batch leaf of shape {np.shape(x)} has no leading axis of size {len(devices)} "
                             f"(one entry per device); make the batches with num_devices={len(devices)}")
        return jax.device_put(x, sharding)

    queue = collections.deque()

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(jax.tree_util.tree_map(put, batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


class _ShuffledEpochs:
    """Endless random-access stream: item i is ``source[perm_e[i mod n]]`` with e = i // n, perm_e drawn from
    ``(seed, e)``.

    Our own per-epoch permutation rather than ``grain.MapDataset.shuffle``: grain's index_shuffle costs about
    5 ms per index on a 10-example dataset (0.4 ms at 128, 43 us at 1500), and its per-epoch seed is
    ``seed + epoch``, which makes epoch 1 of seed 0 equal epoch 0 of seed 1. A permutation costs O(n) per epoch
    (about 50 ms for 1.28M examples); the last few are cached.
    """

    def __init__(self, source: Sequence, seed: int):
        self._source, self._seed, self._n = source, seed, len(source)
        self.permutation = functools.lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, _SHUFFLE_STREAM, epoch]).permutation(self._n)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> Record:
        epoch, offset = divmod(int(index), self._n)
        return self._source[int(self.permutation(epoch)[offset])]


def _random_flip(record: Record, rng: np.random.Generator) -> Record:
    """Flips the image left-right with probability 1/2 (grain seeds ``rng`` from the flip seed and stream index)."""
    if rng.random() < 0.5:
        return {**record, "image": record["image"][:, ::-1]}
    return record


def _device_layout(batch: dict[str, np.ndarray], *, num_devices: int) -> Batch:
    """uint8 images -> float32 [-1, 1], labels -> int32, and a leading device axis on every array."""
    out = {"image": to_float(batch["image"]), "label": np.asarray(batch["label"], np.int32)}
    if "mask" in batch:
        out["mask"] = np.asarray(batch["mask"], np.float32)
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in out.items()}


def _topology(num_devices, process_index, process_count) -> tuple[int, int, int]:
    num_devices = jax.local_device_count() if num_devices is None else num_devices
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if num_devices < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"invalid topology: num_devices={num_devices}, process_index={process_index}, "
                         f"process_count={process_count}")
    return int(num_devices), int(process_index), int(process_count)


def _per_process_batch_size(batch_size: int, num_devices: int, process_count: int, field: str) -> int:
    """``batch_size / process_count``, after checking that every device gets the same whole number of examples."""
    shards = process_count * num_devices
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"{field} must be a positive integer, got {batch_size!r}")
    if batch_size % shards:
        lower, upper = batch_size // shards * shards, (batch_size // shards + 1) * shards
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"{field}={batch_size} is not divisible by process_count * num_devices = "
                         f"{process_count} * {num_devices} = {shards}; every device needs the same number of "
                         f"examples: use {field}={nearest}")
    return batch_size // process_count


def _check_nonempty(source: Sequence) -> int:
    n = len(source)
    if n == 0:
        raise ValueError(f"the data source {source!r} is empty (0 examples): check data.dataset and data.split")
    return n


def _read_options(num_threads: int) -> grain.ReadOptions:
    if num_threads <= 0:
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(DEFAULT_PREFETCH_BATCHES, num_threads))
