"""Uncertainty of accuracy differences: paired bootstrap over test examples."""

import numpy as np


def paired_bootstrap_gain(
    before: list[np.ndarray], after: list[np.ndarray], reps: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean over tasks of (accuracy after - accuracy before), with a bootstrap interval.

    `before[t]` and `after[t]` are 0/1 correctness of the same test examples of task t:
    one row, or one row per training seed (row s of both from seed s: seeds are paired).
    Test examples are resampled within each task, the same indices for both models, and
    so are seeds: the interval covers test-set sampling and, given several seeds, the
    variance over training seeds.
    """
    rng, seed_rng = np.random.RandomState(seed), np.random.RandomState(seed + 1)
    diffs = [np.atleast_2d(np.asarray(a, dtype=float)) - np.atleast_2d(np.asarray(b, dtype=float))
             for b, a in zip(before, after, strict=True)]
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.zeros(reps)
    for d in diffs:
        n_seeds, n = d.shape
        examples = rng.randint(0, n, size=(reps, n))
        if n_seeds == 1:
            boot += d[0][examples].mean(axis=1)
            continue
        seed_counts = np.stack([np.bincount(row, minlength=n_seeds)
                                for row in seed_rng.randint(0, n_seeds, size=(reps, n_seeds))])
        for lo in range(0, reps, 250):  # (reps, n) blocks keep memory small
            per_example = seed_counts[lo:lo + 250] @ d / n_seeds
            boot[lo:lo + 250] += np.take_along_axis(per_example, examples[lo:lo + 250], axis=1).mean(axis=1)
    boot /= len(diffs)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def correctness(bits: str) -> np.ndarray:
    """Decode the '0101...' strings stored in results.jsonl."""
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")
