"""Regret@k and NDCG: known answers."""

import math

import pytest

from coldfusion.selection.ranking_quality import ndcg, regret_at_k

TRUE = {"a": 80.0, "b": 90.0, "c": 60.0, "d": 85.0}


def test_regret_known_answers():
    assert regret_at_k(TRUE, ["b", "a", "c", "d"], 1) == 0.0
    assert regret_at_k(TRUE, ["a", "c", "b", "d"], 1) == pytest.approx((90 - 80) / 90 * 100)
    assert regret_at_k(TRUE, ["a", "c", "b", "d"], 2) == pytest.approx((90 - 80) / 90 * 100)
    assert regret_at_k(TRUE, ["a", "c", "b", "d"], 3) == 0.0
    assert regret_at_k(TRUE, ["c", "a", "d", "b"], 3) == pytest.approx(5 / 90 * 100)


def test_ndcg_known_answers():
    ideal = ["b", "d", "a", "c"]
    assert ndcg(TRUE, ideal) == pytest.approx(1.0)
    worst = ideal[::-1]
    dcg = lambda order: sum(TRUE[c] / math.log2(i + 2) for i, c in enumerate(order))  # noqa: E731
    assert ndcg(TRUE, worst) == pytest.approx(dcg(worst) / dcg(ideal))
    assert ndcg(TRUE, ["d", "b", "a", "c"], k=1) == pytest.approx(85 / 90)
    assert ndcg(TRUE, worst) < ndcg(TRUE, ["d", "b", "c", "a"]) < 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="exactly the scored candidates"):
        regret_at_k(TRUE, ["a", "b"], 1)
    with pytest.raises(ValueError, match="non-negative gains"):
        ndcg({"a": -1.0, "b": 2.0}, ["a", "b"])
    with pytest.raises(ValueError, match="must be positive"):
        regret_at_k({"a": -1.0, "b": 0.0}, ["a", "b"], 1)


def test_spearman_known_answers_and_ties():
    from coldfusion.selection.ranking_quality import spearman

    true = {"a": 3.0, "b": 2.0, "c": 1.0}
    assert spearman(true, {"a": 30, "b": 20, "c": 10}) == pytest.approx(1.0)
    assert spearman(true, {"a": 1, "b": 2, "c": 3}) == pytest.approx(-1.0)
    # ties share the mean rank: predicted ranks 0.5, 0.5, 2 against 2, 1, 0 -> Pearson of those
    assert spearman(true, {"a": 1, "b": 1, "c": 5}) == pytest.approx(-0.8660254, abs=1e-6)
    assert spearman(true, {"a": 1, "b": 1, "c": 1}) == 0.0
