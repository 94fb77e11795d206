"""How good a predicted ranking is against the true scores (docs/METHODS.md section 4).

`true` maps each candidate to its measured score (e.g. the target's accuracy after
intertraining on that source); `predicted` is the candidates in predicted order, best first.
"""

import math
from collections.abc import Mapping, Sequence


def regret_at_k(true: Mapping[str, float], predicted: Sequence[str], k: int) -> float:
    """(best true score - best true score among the top k predicted) / best true score * 100."""
    _check(true, predicted)
    best = max(true.values())
    if best <= 0:
        raise ValueError(f"regret is relative to the best score, which must be positive (got {best})")
    return (best - max(true[c] for c in predicted[:k])) / best * 100


def ndcg(true: Mapping[str, float], predicted: Sequence[str], k: int | None = None) -> float:
    """Normalised discounted cumulative gain of the predicted order, the true scores as
    gains (sum of gain / log2(rank + 1) over the top k, over the same for the ideal order)."""
    _check(true, predicted)
    if min(true.values()) < 0:
        raise ValueError("NDCG needs non-negative gains: rank by scores (e.g. accuracy after intertraining), "
                         "not by gains over a baseline, which can be negative")
    k = len(predicted) if k is None else k
    dcg = lambda order: sum(true[c] / math.log2(rank + 2) for rank, c in enumerate(order[:k]))  # noqa: E731
    ideal = dcg(sorted(true, key=true.get, reverse=True))
    return dcg(list(predicted)) / ideal if ideal > 0 else 1.0


def _check(true: Mapping[str, float], predicted: Sequence[str]) -> None:
    if sorted(true) != sorted(predicted):
        raise ValueError(f"the predicted order must rank exactly the scored candidates: "
                         f"{sorted(set(true) ^ set(predicted))} differ")


def spearman(true: Mapping[str, float], predicted_scores: Mapping[str, float]) -> float:
    """Rank correlation of predicted scores with true scores (tied values share their mean rank)."""
    _check(true, list(predicted_scores))
    names = sorted(true)
    a, b = _ranks([true[n] for n in names]), _ranks([predicted_scores[n] for n in names])
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return cov / norm if norm > 0 else 0.0


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
