"""FID and Inception Score against closed forms (and pytorch-fid's Frechet distance where installed)."""
import sys
import types

import numpy as np
import pytest

from ddm import metrics


def random_rotation(dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    features = np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32)
    mu, sigma = metrics.feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0))
    centred = features.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / 99)


def test_distance_of_a_set_to_itself_is_zero():
    mu, sigma = metrics.feature_statistics(np.random.default_rng(1).normal(size=(2000, 32)))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_distance_between_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_distance_between_gaussians_with_commuting_full_covariances():
    rng = np.random.default_rng(3)
    q = random_rotation(16, seed=3)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_distance_is_computed_in_float64():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=4).astype(np.float32), (rng.normal(size=4) * 1e-4).astype(np.float32)
    s = np.diag(rng.uniform(1.0, 2.0, 4)).astype(np.float32)
    shifted = mu1 + mu2  # float32
    got = metrics.frechet_distance(mu1, s, shifted, s)
    assert isinstance(got, float)
    # |mu1 - mu2|^2 ~ 3e-8: float32 traces and sqrtm (~1e-7 absolute error) would swamp it.
    expected = np.sum((shifted.astype(np.float64) - mu1.astype(np.float64)) ** 2)
    assert got == pytest.approx(expected, rel=0, abs=1e-13)


def test_distance_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # pytorch-fid's call
@pytest.mark.parametrize("num", [3000, 40])  # 40 < 64 features: singular covariances
def test_distance_matches_pytorch_fid(num):
    # CUDA torchvision wheel on CPU torch in this venv: skip its fake-op registrations (see test_inception).
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import pytorch_fid.fid_score as fid_score
    rng = np.random.default_rng(5)
    stats1 = metrics.feature_statistics(rng.normal(size=(num, 64)))
    stats2 = metrics.feature_statistics(rng.normal(size=(num, 64)) * 1.1 + 0.1)
    expected = fid_score.calculate_frechet_distance(*stats1, *stats2)
    assert metrics.frechet_distance(*stats1, *stats2) == pytest.approx(expected, rel=1e-12)


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 1008)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_equally_used_classes_is_their_number():
    num_classes, splits = 7, 5
    labels = np.tile(np.arange(num_classes), 3 * splits)  # each split: every class 3 times
    logits = 1e4 * np.eye(1008)[labels]  # p(y|x) one-hot up to exp(-1e4) = 0
    mean, std = metrics.inception_score(logits, splits=splits)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_lies_between_one_and_the_number_of_classes():
    mean, std = metrics.inception_score(np.random.default_rng(6).normal(size=(500, 10)) * 3, splits=10)
    assert 1.0 < mean < 10.0 and std > 0.0


def test_inception_score_needs_a_sample_per_split():
    with pytest.raises(ValueError, match="splits=10"):
        metrics.inception_score(np.zeros((5, 1008)), splits=10)


def test_too_few_samples_names_the_config_field():
    with pytest.raises(ValueError, match=r"eval\.num_samples=2048: .*2048-dim.*more than 2048.*10,000.*50,000"):
        metrics.check_enough_samples(2048, 2048, "eval.num_samples")
    metrics.check_enough_samples(2049, 2048, "eval.num_samples")
