"""Multitask samplers: distributions match their definitions; uncertainty and adaptive behave."""

import numpy as np
import pytest

from coldfusion.infra.errors import ColdFusionError
from coldfusion.multitask.samplers import Adaptive, make_sampler, most_uncertain, normalized_entropy

SIZES = [100, 400, 1600]


@pytest.mark.parametrize(("name", "params", "expected"), [
    ("proportional", {}, [100 / 2100, 400 / 2100, 1600 / 2100]),
    ("uniform", {}, [1 / 3, 1 / 3, 1 / 3]),
    ("temperature", {"temperature": 2.0}, [10 / 70, 20 / 70, 40 / 70]),  # sqrt of the sizes
    ("temperature", {"temperature": 1.0}, [100 / 2100, 400 / 2100, 1600 / 2100]),
])
def test_static_samplers_known_answers(name, params, expected):
    sampler = make_sampler(name, SIZES, **params)
    assert np.allclose(sampler.probabilities(), expected)
    # drawn counts follow the distribution (20,000 draws: 4 standard deviations is < 0.015)
    rng = np.random.default_rng(0)
    counts = np.bincount([sampler.draw(rng) for _ in range(20_000)], minlength=3) / 20_000
    assert np.allclose(counts, expected, atol=0.015)


def test_adaptive_starts_uniform_and_shifts_toward_the_helpful_task():
    sampler = Adaptive(SIZES, temperature=0.05, smoothing=0.3, explore=0.1)
    assert np.allclose(sampler.probabilities(), 1 / 3)
    rng = np.random.default_rng(1)
    # scripted toy: batches of task 1 lower the held-out loss by 0.1, the others do nothing
    for _ in range(200):
        task = sampler.draw(rng)
        sampler.update(task, 0.1 if task == 1 else 0.0)
    p = sampler.probabilities()
    # smoothed rewards converge to [0, 0.1, 0]: softmax([0, 2, 0]) mixed with 10% uniform
    expected = 0.9 * np.exp(2) / (np.exp(2) + 2) + 0.1 / 3
    assert p[1] == pytest.approx(expected, abs=1e-3) and p[1] > 0.7
    assert p.min() >= 0.1 / 3 - 1e-12  # exploration keeps every task alive
    # ... and moves away again when the task stops helping
    for _ in range(50):
        sampler.update(1, -0.1)
    assert sampler.probabilities()[1] < 1 / 3


def test_normalized_entropy():
    logits = np.array([[0.0, 0.0], [100.0, 0.0]])
    assert np.allclose(normalized_entropy(logits), [1.0, 0.0], atol=1e-6)
    assert np.allclose(normalized_entropy(np.zeros((1, 5))), [1.0])  # uniform over 5 classes is 1 too


def test_uncertainty_picks_the_highest_entropy_examples():
    binary = np.array([[5.0, -5.0], [0.1, 0.0], [2.0, 0.0]])  # certain, near-uniform, in between
    five = np.array([[0.0] * 5, [9.0, 0, 0, 0, 0]])  # uniform over 5 (entropy 1 after normalizing), certain
    assert most_uncertain([binary, five], 2) == [(1, 0), (0, 1)]
    assert most_uncertain([binary, five], 3) == [(1, 0), (0, 1), (0, 2)]


def test_bad_sampler_settings_are_clear_errors():
    with pytest.raises(ColdFusionError, match="unknown task sampler 'random'"):
        make_sampler("random", SIZES)
    with pytest.raises(ColdFusionError, match="temperature must be positive"):
        make_sampler("temperature", SIZES, temperature=0)
    with pytest.raises(ColdFusionError, match="sampler 'uniform'"):
        make_sampler("uniform", SIZES, temperature=2)
    with pytest.raises(ColdFusionError, match="every task needs training examples"):
        make_sampler("uniform", [10, 0])
