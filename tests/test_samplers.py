"""Multitask samplers: distributions match their definitions; MT-Uncertainty and MOMETAS
pick and learn as their publications say (known answers worked out by hand)."""

import numpy as np
import pytest

from coldfusion.infra.errors import ColdFusionError
from coldfusion.multitask.samplers import Mometas, make_sampler, most_uncertain, normalized_entropy

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


def test_mometas_draws_by_gumbel_max_from_its_softmax():
    sampler = Mometas(SIZES)
    assert np.allclose(sampler.probabilities(), 1 / 3)  # equal logits at start
    sampler.logits = np.log(np.array([0.2, 0.3, 0.5]))
    rng = np.random.default_rng(0)
    counts = np.bincount([sampler.draw(rng) for _ in range(20_000)], minlength=3) / 20_000
    assert np.allclose(counts, [0.2, 0.3, 0.5], atol=0.015)


def test_mometas_reward_is_the_summed_relative_drop_clipped_at_minus_one():
    sampler = Mometas(SIZES)
    previous, current = np.array([2.0, 1.0, 1.0]), np.array([1.5, 1.0005, 3.0])
    # task 0: (2 - 1.5) / 2 = 0.25; task 1: -0.0005, under 1e-3, counts 0; task 2: -2 clipped to -1
    assert sampler.reward(previous, current) == pytest.approx(0.25 + 0 - 1)


def test_mometas_update_is_one_sgd_step_of_reinforce_with_an_entropy_bonus():
    sampler = Mometas(SIZES, every=4, lr=0.1, entropy_weight=2.0)
    rng = np.random.default_rng(3)
    assert sampler.observe([1.0, 1.0, 1.0]) is None  # the first losses set the baseline only
    drawn = [sampler.draw(rng) for _ in range(4)]
    counts = np.bincount(drawn, minlength=3)
    reward = sampler.observe([0.8, 1.0, 0.5])  # drops 0.2, 0, 0.5
    assert reward == pytest.approx(0.7)
    # by hand at equal logits (p = 1/3): d/dz sum_i log p(a_i) = counts - 4 p; the entropy is
    # at its maximum, its gradient 0; SGD on the loss -R sum log p - 2 H moves the logits by
    # lr * R * (counts - 4/3)
    assert np.allclose(sampler.logits, 0.1 * 0.7 * (counts - 4 / 3))
    assert sampler.drawn == []  # a new window


def test_mometas_matches_torch_autograd_and_the_entropy_bonus_keeps_it_exploring():
    import torch

    sampler = Mometas(SIZES, every=3, lr=0.1, entropy_weight=2.0)
    sampler.logits = np.array([2.0, 0.0, -1.0])
    sampler.losses = np.array([1.0, 1.0, 1.0])
    sampler.drawn = [0, 0, 1]
    logits = torch.tensor(sampler.logits, requires_grad=True)
    log_p = torch.log_softmax(logits, 0)
    reward = 0.1 + 0.2 + 0.0  # the losses below
    loss = -reward * log_p[[0, 0, 1]].sum() - 2.0 * -(log_p.exp() * log_p).sum()
    torch.optim.SGD([logits], lr=0.1).zero_grad()
    loss.backward()
    expected = (logits - 0.1 * logits.grad).detach().numpy()
    sampler.observe([0.9, 0.8, 1.0])
    assert np.allclose(sampler.logits, expected)
    # with no reward at all, the bonus alone pulls a peaked distribution back toward uniform
    sampler = Mometas(SIZES, lr=0.1, entropy_weight=2.0)
    sampler.logits = np.array([3.0, 0.0, 0.0])
    sampler.observe([1.0, 1.0, 1.0])
    before = sampler.probabilities().max()
    for _ in range(20):
        sampler.observe([1.0, 1.0, 1.0])
    assert sampler.probabilities().max() < before - 0.1
    assert sampler.probabilities().min() > 0.05


def test_mometas_learns_to_favour_the_task_whose_batches_help():
    """Scripted training: only task 1's batches lower the validation losses (5% each). The
    reward has no baseline, so single runs are noisy; over 10 seeds task 1 wins clearly."""
    final = []
    for seed in range(10):
        sampler = Mometas(SIZES, every=20, lr=0.1, entropy_weight=2.0)
        rng = np.random.default_rng(seed)
        losses = np.ones(3)
        sampler.observe(losses)
        for _ in range(60):
            drawn = [sampler.draw(rng) for _ in range(20)]
            losses = losses * 0.95 ** drawn.count(1)
            sampler.observe(losses)
        final.append(sampler.probabilities())
    mean = np.mean(final, axis=0)
    assert mean[1] > 0.5 and mean[1] == mean.max()
    assert np.min(final) > 0.005  # the entropy bonus keeps every task drawn


def test_normalized_entropy():
    logits = np.array([[0.0, 0.0], [100.0, 0.0]])
    assert np.allclose(normalized_entropy(logits), [1.0, 0.0], atol=1e-6)
    assert np.allclose(normalized_entropy(np.zeros((1, 5))), [1.0])  # uniform over 5 classes is 1 too


def test_uncertainty_scales_each_task_by_its_mean_entropy():
    """By hand: task A (2 classes) has normalized entropies [1, H(0.75, 0.25) / ln 2 = 0.8113],
    mean 0.9056; task B (4 classes) [1, ~0], mean 0.5, so B's scores are scaled by 0.5 / 0.9056
    = 0.5521: A's second example (0.8113) now beats B's uniform one (0.5521)."""
    a = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    b = np.array([[0.0] * 4, [40.0, 0, 0, 0]])
    assert most_uncertain([a, b], 2) == [(0, 0), (0, 1)]
    assert most_uncertain([a, b], 3) == [(0, 0), (0, 1), (1, 0)]
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(2)
    assert h == pytest.approx(0.8113, abs=1e-4)
    # without the task scaling B's uniform example would tie A's first and beat its second
    assert normalized_entropy(b)[0] == pytest.approx(1.0)
    # ties go to the earlier task and row
    assert most_uncertain([np.zeros((2, 2)), np.zeros((2, 3))], 3) == [(0, 0), (0, 1), (1, 0)]


def test_bad_sampler_settings_are_clear_errors():
    with pytest.raises(ColdFusionError, match="unknown task sampler 'random'"):
        make_sampler("random", SIZES)
    with pytest.raises(ColdFusionError, match="temperature must be positive"):
        make_sampler("temperature", SIZES, temperature=0)
    with pytest.raises(ColdFusionError, match="sampler 'uniform'"):
        make_sampler("uniform", SIZES, temperature=2)
    with pytest.raises(ColdFusionError, match="every task needs training examples"):
        make_sampler("uniform", [10, 0])
    with pytest.raises(ColdFusionError, match="mometas sampler: need every >= 1"):
        make_sampler("mometas", SIZES, every=0)
