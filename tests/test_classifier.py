"""The digits classifier: accuracy, the cache (written, reused, atomic, retrained when corrupt), the extractor.

One classifier (8x8, seed 0, the default steps) is trained per module and shared; the cache tests replace
``train_classifier`` by a fake that returns it, so they never train.
"""
import logging
import os

import jax
import numpy as np
import pytest

from ddm import classifier, data

IMAGE_SIZE = 8
MIN_ACCURACY = 0.97  # every seed tried reached 0.98-0.99 at DEFAULT_STEPS


@pytest.fixture(scope="module")
def trained():
    return classifier.train_classifier(IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def extract(trained):
    return classifier.make_extractor(trained[0], IMAGE_SIZE, batch_size=128)


@pytest.fixture
def fake_trainer(trained, monkeypatch):
    """Replace train_classifier by one that returns the shared classifier; returns its list of calls."""
    calls = []

    def train(image_size, seed=0, steps=classifier.DEFAULT_STEPS):
        calls.append((image_size, seed))
        return trained[0], dict(trained[1], seed=seed)

    monkeypatch.setattr(classifier, "train_classifier", train)
    return calls


def _forbid_training(monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("train_classifier was called although the cache is valid")

    monkeypatch.setattr(classifier, "train_classifier", train)


def _assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_test_accuracy(trained):
    _, info = trained
    assert info["accuracy"] >= MIN_ACCURACY, info
    assert info["steps"] == classifier.DEFAULT_STEPS
    assert info["seconds"] > 0
    assert (info["image_size"], info["seed"]) == (IMAGE_SIZE, 0)


def test_cache_written_then_reused(tmp_path, fake_trainer, monkeypatch, trained):
    params, info = classifier.load_or_train(str(tmp_path), IMAGE_SIZE)
    assert fake_trainer == [(IMAGE_SIZE, 0)]
    assert sorted(os.listdir(tmp_path)) == ["classifier_8px.json", "classifier_8px.msgpack"]
    _forbid_training(monkeypatch)
    loaded, loaded_info = classifier.load_or_train(str(tmp_path), IMAGE_SIZE)
    _assert_same_params(loaded, trained[0])
    assert loaded_info == info


def test_cache_of_another_seed_is_retrained(tmp_path, fake_trainer):
    classifier.load_or_train(str(tmp_path), IMAGE_SIZE, seed=0)
    _, info = classifier.load_or_train(str(tmp_path), IMAGE_SIZE, seed=1)
    assert fake_trainer == [(IMAGE_SIZE, 0), (IMAGE_SIZE, 1)]
    assert info["seed"] == 1


def test_atomic_write_leaves_no_tmp_file(tmp_path, monkeypatch, trained):
    classifier.save(str(tmp_path), IMAGE_SIZE, *trained)
    assert sorted(os.listdir(tmp_path)) == ["classifier_8px.json", "classifier_8px.msgpack"]

    def failing_replace(src, dst):
        raise OSError("disk full")

    other = tmp_path / "other"
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        classifier.save(str(other), IMAGE_SIZE, *trained)
    assert os.listdir(other) == []


@pytest.mark.parametrize("payload", [b"", b"\x00garbage\xff" * 10, "truncated", "wrong shapes"])
def test_corrupt_cache_is_retrained(tmp_path, fake_trainer, trained, caplog, monkeypatch, payload):
    path = classifier.cache_path(str(tmp_path), IMAGE_SIZE)
    if payload in ("truncated", "wrong shapes"):
        params = trained[0] if payload == "truncated" else jax.tree.map(lambda a: a[..., :1], trained[0])
        classifier.save(str(tmp_path), IMAGE_SIZE, params, trained[1])
        if payload == "truncated":
            with open(path, "rb") as f:
                payload = f.read()[:1000]
    if isinstance(payload, bytes):
        with open(path, "wb") as f:
            f.write(payload)
    with caplog.at_level(logging.WARNING):
        params, _ = classifier.load_or_train(str(tmp_path), IMAGE_SIZE)
    assert fake_trainer == [(IMAGE_SIZE, 0)]
    assert "retraining the digits classifier" in caplog.text
    _assert_same_params(params, trained[0])
    _forbid_training(monkeypatch)
    classifier.load_or_train(str(tmp_path), IMAGE_SIZE)  # the rewritten cache is valid


def test_extractor_shapes_dtypes_determinism(extract):
    images, _ = classifier.split_arrays(IMAGE_SIZE, "test")  # 297 images: 3 batches of 128, the last padded
    features = extract(images)
    assert features["pool"].shape == (297, classifier.FEATURE_DIM)
    assert features["logits"].shape == (297, classifier.NUM_CLASSES)
    assert features["pool"].dtype == features["logits"].dtype == np.float64
    again = extract(images)
    for key in ("pool", "logits"):
        np.testing.assert_array_equal(again[key], features[key])
        np.testing.assert_allclose(extract(images[130:135])[key], features[key][130:135], rtol=1e-5, atol=1e-6)
    empty = extract(images[:0])
    assert empty["pool"].shape == (0, classifier.FEATURE_DIM) and empty["logits"].shape == (0, 10)


def test_logits_give_the_reported_accuracy(trained, extract):
    images, labels = classifier.split_arrays(IMAGE_SIZE, "test")
    accuracy = np.mean(np.argmax(extract(images)["logits"], axis=-1) == labels)
    assert accuracy == pytest.approx(trained[1]["accuracy"])


def test_pool_features_separate_classes(extract):
    train_images, train_labels = classifier.split_arrays(IMAGE_SIZE, "train")
    test_images, test_labels = classifier.split_arrays(IMAGE_SIZE, "test")
    train_pool, test_pool = extract(train_images)["pool"], extract(test_images)["pool"]
    means = np.stack([train_pool[train_labels == k].mean(axis=0) for k in range(10)])
    distances = ((test_pool[:, None, :] - means[None]) ** 2).sum(axis=-1)
    assert np.mean(np.argmin(distances, axis=-1) == test_labels) >= 0.95


def test_wrong_image_shape_or_dtype_is_an_error(extract):
    images = np.zeros((4, 16, 16, 1), np.uint8)
    with pytest.raises(ValueError, match=r"data\.image_size=8.*\(N, 8, 8, 1\)"):
        extract(images)
    with pytest.raises(ValueError, match=r"data\.image_size=8"):
        extract(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8.*data.to_uint8"):
        extract(data.to_float(np.zeros((4, 8, 8, 1), np.uint8)))


def test_unknown_image_size_or_bad_batch_size_is_an_error(trained):
    with pytest.raises(ValueError, match=r"data\.image_size=12"):
        classifier.network(12)
    with pytest.raises(ValueError, match="batch_size=0"):
        classifier.make_extractor(trained[0], IMAGE_SIZE, batch_size=0)
