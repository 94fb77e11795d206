"""Few-shot training sets, drawn reproducibly per seed: k labelled examples per class, or
k per task stratified by class (the ColD Fusion publication's 100 examples per dataset)."""

import numpy as np

from coldfusion.infra.runtime import derive_seed
from coldfusion.tasks.task import Split


def stratified_counts(class_sizes: list[int], k: int) -> list[int]:
    """How many of k examples each class gets: in proportion to its size (largest remainder),
    at least one per class while k allows it, never more than a class has."""
    sizes = np.asarray(class_sizes, dtype=float)
    k = min(k, int(sizes.sum()))
    floor = np.minimum(1, sizes) if k >= len(sizes) else np.zeros_like(sizes)
    share = floor + (k - floor.sum()) * sizes / sizes.sum()
    counts = np.minimum(np.floor(share), sizes)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):  # largest remainders first
        if counts.sum() >= k:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
    while counts.sum() < k:  # a capped class left some over: give them to classes with room
        counts[int(np.argmax(sizes - counts))] += 1
    return [int(c) for c in counts]


def few_shot(split: Split, k: int, seed: int, per: str = "class") -> Split:
    """`per` "class": k examples of every class (all of a class that has fewer); "task": k
    examples in all, stratified by class. Drawn with `seed`, in a seed-shuffled order; the
    same (split, k, seed, per) always gives the same examples."""
    rng = np.random.RandomState(derive_seed(seed, "few_shot", k) if per == "class"
                                else derive_seed(seed, "few_shot", k, per))
    labels = np.asarray(split.labels)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == label) for label in classes]
    counts = ([min(k, len(m)) for m in members] if per == "class"
              else stratified_counts([len(m) for m in members], k))
    chosen = []
    for m, n in zip(members, counts, strict=True):
        chosen.extend(rng.choice(m, size=n, replace=False))
    return split.take(rng.permutation(np.asarray(chosen, dtype=int)))
