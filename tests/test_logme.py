"""LogME: the evidence it reports is the Bayesian linear model's log marginal likelihood at
a stationary point of (alpha, beta), and it ranks informative features above noise."""

import math

import numpy as np
import pytest

from coldfusion.selection.logme import _evidence, logme


def exact_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y | 0, I / beta + F F^T / alpha): the definition, by brute force."""
    n = f.shape[0]
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, log_det = np.linalg.slogdet(cov)
    return float(-0.5 * (y @ np.linalg.solve(cov, y) + log_det + n * math.log(2 * math.pi)))


def one_target(f, y):
    u, sigma, _ = np.linalg.svd(f, full_matrices=False)
    return _evidence(u.T @ y, float(y @ y), sigma ** 2, *f.shape, max_iter=1000, tol=1e-12)


@pytest.mark.parametrize("n, d", [(12, 3), (60, 8), (100, 40)])
def test_evidence_is_the_marginal_likelihood_at_a_stationary_point(n, d):
    rng = np.random.default_rng(n * d)
    f = rng.normal(size=(n, d))
    y = (f @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(float)
    per_example, alpha, beta = one_target(f, y)
    best = exact_log_evidence(f, y, alpha, beta)
    assert per_example * n == pytest.approx(best, rel=1e-9)
    for a, b in [(alpha * 1.05, beta), (alpha / 1.05, beta), (alpha, beta * 1.05), (alpha, beta / 1.05)]:
        assert exact_log_evidence(f, y, a, b) <= best + 1e-9  # the fixed point maximises the evidence


def test_hand_computed_one_feature_case():
    """N = 2, D = 1, F = [[2], [1]], y = [1, 0]: s = 5, u = 2/sqrt(5), and 1/5 of |y|^2 lies
    off the feature direction. At the fixed point alpha = gamma / m^2 and beta = (2 - gamma)
    / r, with m = 2b / (5b + a), r = 1/5 + 4a^2 / (5 (5b + a)^2), gamma = 5b / (5b + a);
    then the evidence, term by term."""
    f, y = np.array([[2.0], [1.0]]), np.array([1.0, 0.0])
    per_example, a, b = one_target(f, y)
    m = 2 * b / (5 * b + a)
    r = 0.2 + 4 * a ** 2 / (5 * (5 * b + a) ** 2)
    gamma = 5 * b / (5 * b + a)
    assert a == pytest.approx(gamma / m ** 2, rel=1e-6) and b == pytest.approx((2 - gamma) / r, rel=1e-6)
    by_hand = (0.5 * math.log(a) + math.log(b) - 0.5 * math.log(a + 5 * b) - b / 2 * r - a / 2 * m ** 2
               - math.log(2 * math.pi))
    assert per_example == pytest.approx(by_hand / 2, rel=1e-9)


def test_more_features_than_examples_give_a_finite_evidence():
    """N < D: y lies in the features' span; the value stays finite and is the marginal
    likelihood at the alpha and beta found."""
    rng = np.random.default_rng(5)
    f, y = rng.normal(size=(5, 8)), np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    per_example, alpha, beta = one_target(f, y)
    assert math.isfinite(per_example)
    assert per_example * 5 == pytest.approx(exact_log_evidence(f, y, alpha, beta), rel=1e-6)


def test_informative_features_score_higher_than_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=600)
    centres = rng.normal(size=(3, 32)) * 3
    informative = centres[labels] + rng.normal(size=(600, 32))
    noise = rng.normal(size=(600, 32))
    half = centres[labels] * 0.3 + rng.normal(size=(600, 32))
    assert logme(informative, labels) > logme(half, labels) > logme(noise, labels)


def test_invariant_to_the_order_of_examples_and_a_rotation_of_features():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=300)
    f = rng.normal(size=(300, 16)) + labels[:, None]
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    order = rng.permutation(300)
    score = logme(f, labels)
    assert logme(f[order], labels[order]) == pytest.approx(score, rel=1e-9)
    assert logme(f @ rotation, labels) == pytest.approx(score, rel=1e-7)
    # label names do not matter, only the partition
    assert logme(f, 5 - 3 * labels) == pytest.approx(score, rel=1e-12)


def test_rank_deficient_and_wide_features_stay_finite():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=50)
    base = rng.normal(size=(50, 4))
    duplicated = np.hstack([base, base, np.zeros((50, 3))])  # rank 4 of 11 columns
    wide = rng.normal(size=(50, 200))
    assert math.isfinite(logme(duplicated, labels)) and math.isfinite(logme(wide, labels))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least two classes"):
        logme(np.ones((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        logme(np.ones((4, 2)), np.zeros(3, dtype=int))
