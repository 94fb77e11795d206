"""Uncertainty of accuracy differences: paired bootstrap over test examples."""

import numpy as np


def paired_bootstrap_gain(
    before: list[np.ndarray], after: list[np.ndarray], reps: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean over tasks of (accuracy after - accuracy before), with a bootstrap interval.

    `before[t]` and `after[t]` are 0/1 correctness of the same test examples of task t.
    Examples are resampled within each task, the same indices for both models (paired),
    so only test-set sampling noise is covered, not the variance over training seeds.
    """
    rng = np.random.RandomState(seed)
    diffs = [np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for b, a in zip(before, after, strict=True)]
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.zeros(reps)
    for d in diffs:
        boot += d[rng.randint(0, len(d), size=(reps, len(d)))].mean(axis=1)
    boot /= len(diffs)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def correctness(bits: str) -> np.ndarray:
    """Decode the '0101...' strings stored in results.jsonl."""
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")
