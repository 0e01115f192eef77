"""Frechet distance (FID) and Inception Score on extracted features, in float64 numpy.

FID   Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
      Equilibrium": the Frechet distance between Gaussians fitted to pool3 features,
      d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); computed as pytorch-fid / the TTUR code.
IS    Salimans et al. 2016, "Improved Techniques for Training GANs":
      exp(E_x KL(p(y|x) || p(y))), averaged over splits of the samples as their code.

The features come from any extractor with the `extract(images_uint8) -> {"pool", "logits"}`
contract (ddm.inception for the papers' numbers).
"""
import numpy as np
from scipy import linalg, special

FID_MIN_SAMPLES = 10_000  # fewer samples bias FID upwards noticeably
PAPER_NUM_SAMPLES = 50_000  # the sample count behind the papers' FID and IS tables
SINGULAR_EPS = 1e-6  # pytorch-fid's diagonal offset when sigma1 @ sigma2 has no finite square root
IMAGINARY_ATOL = 1e-3  # pytorch-fid: larger imaginary parts on the diagonal of sqrtm mean failure


def check_enough_samples(num: int, dim: int, field: str) -> None:
    """Raises ValueError unless `num` samples can give a non-singular covariance of `dim`-dim features.

    Args:
      num: number of samples (images) the statistics will be computed from.
      dim: feature dimension (2048 for Inception pool3).
      field: the config field that set `num`, named in the error.
    """
    if num <= dim:
        raise ValueError(
            f"{field}={num}: the covariance of {dim}-dim features needs more than {dim} samples (with fewer "
            f"it is singular and the Frechet distance is meaningless); set {field} to at least "
            f"{FID_MIN_SAMPLES:,} for FID ({PAPER_NUM_SAMPLES:,} to compare with the papers' numbers)")


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, as pytorch-fid (unbiased covariance).

    Args:
      features: (N, D) array, N >= 2.

    Returns:
      mu (D,) float64, sigma (D, D) float64.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature_statistics: expected (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SINGULAR_EPS) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)), with scipy's sqrtm;
    as pytorch-fid: if the square root is not finite, `eps` is added to both diagonals; a small
    imaginary part (numerical noise) is dropped, a large one raises ValueError.

    Args:
      mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances (e.g. from `feature_statistics`).

    Returns:
      The FID value (float, in squared feature units).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f"frechet_distance: sqrtm(sigma1 sigma2) has imaginary part "
                             f"{np.abs(covmean.imag).max():.3g}; the covariances are not valid (too few samples?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class logits, as the IS paper's code (also TTUR's).

    For each of `splits` consecutive, equal parts of the samples: exp(mean_x KL(p(y|x) || p(y))),
    p(y|x) = softmax(logits), p(y) = the part's mean of p(y|x).

    Args:
      logits: (N, K) class logits (Inception: K = 1008), N >= splits.
      splits: number of parts (10 in the paper).

    Returns:
      (mean, std) over the parts, float; 1 <= IS <= K.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or splits < 1 or len(logits) < splits:
        raise ValueError(f"inception_score: {logits.shape} logits cannot fill splits={splits}; pass (N, K) "
                         "logits with N >= splits (the paper: 50,000 samples, splits=10)")
    p_yx = special.softmax(logits, axis=1)
    n = len(p_yx)
    scores = []
    for i in range(splits):
        part = p_yx[i * n // splits:(i + 1) * n // splits]
        kl = special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()  # 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
