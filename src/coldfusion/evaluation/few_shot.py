"""Few-shot training sets: k labelled examples per class, drawn reproducibly per seed."""

import numpy as np

from coldfusion.infra.runtime import derive_seed
from coldfusion.tasks.task import Split


def few_shot(split: Split, k: int, seed: int) -> Split:
    """k examples of every class (all of a class that has fewer), drawn with `seed`, in a
    seed-shuffled order. The same (split, k, seed) always gives the same examples."""
    rng = np.random.RandomState(derive_seed(seed, "few_shot", k))
    labels = np.asarray(split.labels)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.extend(rng.choice(members, size=min(k, len(members)), replace=False))
    return split.take(rng.permutation(np.asarray(chosen, dtype=int)))
