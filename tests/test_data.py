"""Tests of the input pipeline: embedded digits, TFDS (mocked and a tiny prepared dataset), batches, resume."""
import contextlib
import signal
import socket
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddm import data


@contextlib.contextmanager
def deadline(seconds):
    """Fails the test instead of hanging if the block runs longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data pipeline tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def indexed_source(n, shape=(4, 6, 1), seed=0):
    """Random images whose label is their index, so batches show which examples they hold."""
    images = np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)
    return data.ArraySource(images, np.arange(n))


def flat(batch):
    """Merges the leading device axis into the batch axis."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits
    return load_digits()


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_dtypes_and_sizes(size):
    train, test = data.load_source("digits", "train", image_size=size), data.load_source("digits", "test",
                                                                                          image_size=size)
    assert (len(train), len(test)) == (1500, 297)
    for source in (train, test):
        assert data.image_shape(source) == (size, size, 1)
        record = source[0]
        assert set(record) == {"image", "label"}
        assert record["image"].dtype == np.uint8 and record["image"].shape == (size, size, 1)
        assert isinstance(record["label"], int)
        assert set(source.labels.tolist()) == set(range(10))
        assert source.images.min() == 0 and source.images.max() == 255


def test_digits_default_size_is_16():
    assert data.image_shape(data.load_source("digits", "train")) == (16, 16, 1)


def test_digits_8x8_equals_sklearn_exactly(sklearn_digits):
    for split in ("train", "test"):
        idx = data.digits_split_indices(split)
        source = data.load_source("digits", split, image_size=8)
        expected = np.floor(sklearn_digits.images[idx] * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]
        np.testing.assert_array_equal(source.images, expected)
        np.testing.assert_array_equal(source.labels, sklearn_digits.target[idx])
        assert [source[i]["label"] for i in range(5)] == sklearn_digits.target[idx[:5]].tolist()
    np.testing.assert_array_equal(data.digits_uint8(np.arange(17.0)),
                                  [0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207, 223, 239, 255])


def test_digits_splits_disjoint_deterministic_and_complete():
    train, test = data.digits_split_indices("train"), data.digits_split_indices("test")
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    np.testing.assert_array_equal(train, data.digits_split_indices("train"))
    np.testing.assert_array_equal(data.load_source("digits", "test").images,
                                  data.load_source("digits", "test").images)


def test_digits_errors():
    with pytest.raises(ValueError, match=r"data.image_size=12.*\(8, 16, 32\)"):
        data.load_source("digits", "train", image_size=12)
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        data.load_source("digits", "validation")


# ------------------------------------------------------------------------------------------------ pixels


def test_pixel_mapping_and_round_trip():
    u = np.arange(256, dtype=np.uint8)
    x = data.to_float(u)
    assert x.dtype == np.float32 and x[0] == -1.0 and x[255] == 1.0
    np.testing.assert_allclose(x, u / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(data.to_uint8(x), u)
    np.testing.assert_array_equal(data.to_uint8(jnp.asarray(x)), u)
    np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, -1.0, 0.0, 1.0, 1.5])), [0, 0, 128, 255, 255])
    assert data.to_uint8(x).dtype == np.uint8


def test_train_batches_are_in_range_with_device_axis():
    source = data.load_source("digits", "train")
    batch = next(data.train_batches(source, global_batch_size=16, seed=0, num_devices=2))
    assert batch["image"].shape == (2, 8, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 8) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    default = next(data.train_batches(source, global_batch_size=16, seed=0))
    n = jax.local_device_count()
    assert default["image"].shape == (n, 16 // n, 16, 16, 1)


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_batches_and_threads_do_not_matter():
    source = indexed_source(50)
    a = take(data.train_batches(source, global_batch_size=8, seed=3, num_devices=2), 12)
    b = take(data.train_batches(source, global_batch_size=8, seed=3, num_devices=2, num_threads=0), 12)
    assert_batches_equal(a, b)


def test_resume_at_start_step_gives_exactly_the_same_batches():
    source = indexed_source(50)
    full = take(data.train_batches(source, global_batch_size=8, seed=3, num_devices=2), 20)
    for k in (1, 6, 13):  # 13 * 8 = 104 straddles the boundary of epochs 1 and 2
        resumed = take(data.train_batches(source, global_batch_size=8, seed=3, start_step=k, num_devices=2), 20 - k)
        assert_batches_equal(resumed, full[k:])
    random_access = data.train_dataset(source, global_batch_size=8, seed=3, num_devices=2)
    assert_batches_equal([random_access[13], random_access[2]], [full[13], full[2]])


def test_different_seed_gives_different_batches():
    source = indexed_source(50)
    a = next(data.train_batches(source, global_batch_size=16, seed=0, num_devices=1))
    b = next(data.train_batches(source, global_batch_size=16, seed=1, num_devices=1))
    assert not np.array_equal(a["label"], b["label"])


def test_each_epoch_is_a_fresh_permutation():
    n, size = 60, 12
    source = indexed_source(n)
    batches = take(data.train_batches(source, global_batch_size=size, seed=5, num_devices=1), 3 * n // size)
    labels = np.concatenate([flat(b)["label"] for b in batches]).reshape(3, n)
    for epoch in labels:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    assert not np.array_equal(labels[0], np.arange(n))


def test_flip_flips_about_half_and_is_reproducible():
    source = data.load_source("digits", "train")
    kwargs = dict(global_batch_size=100, seed=7, num_devices=1)
    plain = [flat(b) for b in take(data.train_batches(source, random_flip=False, **kwargs), 15)]
    flipped = [flat(b) for b in take(data.train_batches(source, **kwargs), 15)]
    again = [flat(b) for b in take(data.train_batches(source, **kwargs), 15)]
    assert_batches_equal(flipped, again)
    num_flipped = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p["label"], f["label"])  # flipping does not change the order
        for x, y in zip(p["image"], f["image"]):
            is_same, is_mirror = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
            assert is_same or is_mirror
            num_flipped += is_mirror and not is_same
    assert 0.45 < num_flipped / 1500 < 0.55


# ------------------------------------------------------------------------------------------------ topology


@pytest.mark.parametrize("num_devices", [1, 2])
def test_processes_take_disjoint_contiguous_slices_of_the_global_batch(num_devices):
    source = indexed_source(48)  # 3 batches an epoch: no batch straddles two epochs, so labels are distinct
    kwargs = dict(global_batch_size=16, seed=2, start_step=2)
    whole = take(data.train_batches(source, num_devices=1, process_index=0, process_count=1, **kwargs), 4)
    parts = [take(data.train_batches(source, num_devices=num_devices, process_index=p, process_count=2, **kwargs), 4)
             for p in range(2)]
    for step, batch in enumerate(whole):
        halves = [flat(parts[p][step]) for p in range(2)]
        assert parts[0][step]["image"].shape == (num_devices, 8 // num_devices, 4, 6, 1)
        assert not set(halves[0]["label"].tolist()) & set(halves[1]["label"].tolist())
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), flat(batch)[k])


def test_bad_batch_size_errors():
    source = indexed_source(10)
    with pytest.raises(ValueError) as e:
        data.train_batches(source, global_batch_size=10, seed=0, num_devices=4)
    assert "global_batch_size=10" in str(e.value) and "1 * 4 = 4" in str(e.value) and "8 or 12" in str(e.value)
    with pytest.raises(ValueError, match=r"2 \* 4 = 8.*global_batch_size=8 or 16"):
        data.train_batches(source, global_batch_size=12, seed=0, num_devices=4, process_index=1, process_count=2)
    with pytest.raises(ValueError, match=r"global_batch_size=4$"):
        data.train_batches(source, global_batch_size=3, seed=0, num_devices=4)
    with pytest.raises(ValueError, match="positive integer"):
        data.train_batches(source, global_batch_size=0, seed=0, num_devices=1)
    with pytest.raises(ValueError, match=r"batch_size=5 is not divisible.*batch_size=4 or 6"):
        data.eval_batches(source, batch_size=5, num_devices=2)
    with pytest.raises(ValueError, match="seed"):
        data.train_batches(source, global_batch_size=2, seed=-1, num_devices=1)


def test_empty_source_error():
    empty = data.ArraySource(np.zeros((0, 4, 4, 1), np.uint8), np.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        data.train_batches(empty, global_batch_size=2, seed=0, num_devices=1)
    with pytest.raises(ValueError, match="empty"):
        data.eval_batches(empty, batch_size=2, num_devices=1)


# ------------------------------------------------------------------------------------------------ eval


@pytest.mark.parametrize("process_count,num_devices", [(1, 1), (1, 2), (2, 2)])
def test_eval_batches_cover_every_example_once(process_count, num_devices):
    n, batch_size = 37, 8
    source = indexed_source(n)
    per_process = [list(data.eval_batches(source, batch_size=batch_size, num_devices=num_devices,
                                          process_index=p, process_count=process_count)) for p in range(process_count)]
    seen = []
    for batches in per_process:
        assert len(batches) == 5  # ceil(37 / 8) on every process
        for b in batches:
            per_device = batch_size // process_count // num_devices
            assert b["image"].shape == (num_devices, per_device, 4, 6, 1)
            assert b["mask"].shape == b["label"].shape == (num_devices, per_device)
            assert b["mask"].dtype == np.float32 and set(np.unique(b["mask"])) <= {0.0, 1.0}
            b = flat(b)
            real = b["label"][b["mask"] == 1]
            seen.extend(real.tolist())
            np.testing.assert_array_equal(b["image"][b["mask"] == 1], data.to_float(source.images[real]))
    assert sorted(seen) == list(range(n))
    assert sum(float(b["mask"].sum()) for batches in per_process for b in batches) == n
    if process_count == 1:
        assert seen == list(range(n))  # fixed order


# ------------------------------------------------------------------------------------------------ devices


def test_prefetch_to_device_shards_the_leading_axis_for_pmap():
    n = jax.local_device_count()
    source = data.load_source("digits", "test", image_size=8)
    host = take(data.train_batches(source, global_batch_size=4 * n, seed=0), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_device = list(data.prefetch_to_device(iter(host), size=2))
        sums = [jax.pmap(lambda x: x.sum())(b["image"]) for b in on_device]
    assert len(on_device) == 3
    for h, d, s in zip(host, on_device, sums):
        assert isinstance(d["image"], jax.Array) and len(d["image"].addressable_shards) == n
        assert {sh.data.shape for sh in d["image"].addressable_shards} == {(1, 4, 8, 8, 1)}
        assert {sh.device for sh in d["image"].addressable_shards} == set(jax.local_devices())
        np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])
        np.testing.assert_allclose(np.asarray(s), h["image"].sum(axis=(1, 2, 3, 4)), rtol=1e-6)
    bad = {"image": np.zeros((n + 1, 2, 8, 8, 1), np.float32)}
    with pytest.raises(ValueError, match=f"num_devices={n}"):
        next(data.prefetch_to_device(iter([bad])))


# ------------------------------------------------------------------------------------------------ TFDS


def test_tfds_cifar10_through_mock_data(no_network):
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.load_source("cifar10", "train", image_size=32)
        assert len(source) == 24 and data.image_shape(source) == (32, 32, 3)
        record = source[5]
        assert set(record) == {"image", "label"}
        assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
        assert isinstance(record["label"], int) and 0 <= record["label"] < 10
        batches = take(data.train_batches(source, global_batch_size=8, seed=0, num_devices=2), 4)
        resumed = take(data.train_batches(source, global_batch_size=8, seed=0, start_step=3, num_devices=2), 1)
        assert batches[0]["image"].shape == (2, 4, 32, 32, 3) and batches[0]["label"].shape == (2, 4)
        assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0
        assert_batches_equal(resumed, batches[3:])
        with pytest.raises(ValueError, match=r"data.image_size=16 .*32x32.*data.image_size=32"):
            data.load_source("cifar10", "train", image_size=16)


class DdmTestTinyGray(tfds.core.GeneratorBasedBuilder):
    """A prepared-on-disk TFDS dataset with 2-D images, an extra feature and no label; built without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(4, 4), dtype=np.uint8), "extra": np.int32}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((4, 4), 10 * i, np.uint8), "extra": i}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    """Array_record files of ``ddm_test_tiny_gray``, read back by name like data copied from another machine."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with tfds.core.registered.skip_registration():
        builder_cls = type("DdmTestTinyGray", (DdmTestTinyGray,), {"name": "ddm_test_tiny_gray"})
    builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_prepared_dataset_is_normalised(tiny_data_dir, no_network):
    source = data.load_source("ddm_test_tiny_gray", "train", data_dir=tiny_data_dir, image_size=4)
    assert len(source) == 6 and data.image_shape(source) == (4, 4, 1)
    values = sorted(int(source[i]["image"][0, 0, 0]) for i in range(6))
    assert values == [0, 10, 20, 30, 40, 50]
    record = source[0]
    assert set(record) == {"image", "label"} and record["label"] == -1
    assert record["image"].shape == (4, 4, 1) and record["image"].dtype == np.uint8
    assert len(data.load_source("ddm_test_tiny_gray", "train[:50%]+validation", data_dir=tiny_data_dir)) == 6
    batch = next(data.eval_batches(source, batch_size=4, num_devices=2))
    assert batch["image"].shape == (2, 2, 4, 4, 1) and (batch["label"] == -1).all()


def test_tfds_errors_name_the_field(tiny_data_dir, no_network):
    with pytest.raises(ValueError, match=r"unknown split 'test'.*\['train', 'validation'\]"):
        data.load_source("ddm_test_tiny_gray", "test", data_dir=tiny_data_dir)
    with pytest.raises(ValueError, match=r"data.image_size=8 .*4x4"):
        data.load_source("ddm_test_tiny_gray", "train", data_dir=tiny_data_dir, image_size=8)


def test_unprepared_dataset_fails_fast_without_network(tmp_path, no_network):
    start = time.time()
    with deadline(30), pytest.raises(data.DatasetNotFoundError) as e:
        data.load_source("cifar10", "train", data_dir=str(tmp_path))
    assert time.time() - start < 10
    message = str(e.value)
    assert str(tmp_path) in message and "prepare" in message and "array_record" in message
    assert isinstance(e.value, FileNotFoundError)


def test_unknown_dataset_name(tmp_path, no_network):
    with deadline(30), pytest.raises(data.DatasetNotFoundError, match="unknown dataset 'no_such_dataset_xyz'"):
        data.load_source("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
