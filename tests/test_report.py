import numpy as np
import pytest

from coldfusion.collab.report import summary_markdown
from coldfusion.evaluation.stats import correctness, paired_bootstrap_gain


def test_bootstrap_of_identical_models_is_zero():
    x = np.random.RandomState(0).randint(0, 2, size=300)
    gain, lo, hi = paired_bootstrap_gain([x], [x])
    assert gain == lo == hi == 0.0


def test_bootstrap_known_gain_and_interval():
    before = np.zeros(1000)
    after = np.zeros(1000)
    after[:100] = 1  # +10 points, every change in the same direction
    gain, lo, hi = paired_bootstrap_gain([before], [after])
    assert gain == pytest.approx(0.10)
    # binomial standard error sqrt(.1*.9/1000) = 0.0095 -> interval about +-1.9 points
    assert 0.075 < lo < 0.085 and 0.115 < hi < 0.125


def test_bootstrap_averages_tasks():
    a0, a1 = np.zeros(50), np.ones(50)
    gain, lo, hi = paired_bootstrap_gain([a0, a1], [a1, a1])  # +100 on task 1, 0 on task 2
    assert gain == pytest.approx(0.5) and lo == hi == pytest.approx(0.5)


def test_correctness_decoding():
    assert correctness("0110").tolist() == [0, 1, 1, 0]


def rows_with(bits_before: str, bits_after: str) -> list[dict]:
    def probe(it, bits):
        return {"kind": "probe", "iteration": it, "task": "t", "accuracy": correctness(bits).mean(),
                "test_correct": bits}
    return [probe(0, bits_before), {"kind": "fusion", "iteration": 1, "method": "average"}, probe(1, bits_after)]


def test_summary_verdicts():
    n = 400
    clear_win = summary_markdown(rows_with("0" * n, "1" * (n // 4) + "0" * (3 * n // 4)), "run")
    assert "the fused base beats the pretrained one" in clear_win and "+25.0 [" in clear_win
    noise = summary_markdown(rows_with("01" * (n // 2), "10" * (n // 2)), "run")
    assert "is not distinguishable from the pretrained one" in noise
    loss = summary_markdown(rows_with("1" * n, "0" * (n // 4) + "1" * (3 * n // 4)), "run")
    assert "is worse than the pretrained one" in loss


def test_bootstrap_over_seeds_covers_seed_variance():
    zeros, ones = np.zeros(400), np.ones(400)
    # every seed agrees: no uncertainty
    assert paired_bootstrap_gain([np.stack([zeros, zeros])], [np.stack([ones, ones])]) == (1.0, 1.0, 1.0)
    # seeds disagree completely (one seed all right, the other all wrong): the interval spans it
    gain, lo, hi = paired_bootstrap_gain([np.stack([zeros, zeros])], [np.stack([ones, zeros])])
    assert gain == 0.5 and lo == 0.0 and hi == 1.0
