"""A labelled text-classification dataset with fixed train/validation/test splits."""

from dataclasses import dataclass

import numpy as np

from coldfusion.infra.runtime import derive_seed


@dataclass(frozen=True)
class Split:
    """Columnar examples: texts (and optional second texts for pair tasks) and int labels."""

    texts: list[str]
    labels: list[int]
    pairs: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.pairs is not None and len(self.pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.pairs)} second texts")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices) -> "Split":
        idx = [int(i) for i in indices]
        return Split(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
        )

    def head(self, n: int | None) -> "Split":
        """The first n examples (splits are already shuffled deterministically)."""
        return self if n is None or n >= len(self) else self.take(range(n))


@dataclass(frozen=True)
class Task:
    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    source: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def for_tuning(self, validation_examples: int) -> "Task":
        """The task with its test split replaced by the validation split, and a new validation
        split carved from the end of train: for choosing settings without seeing test."""
        n = len(self.train)
        cut = max(1, min(validation_examples, n // 2))
        return Task(self.name, self.label_names, train=self.train.take(range(n - cut)),
                    validation=self.train.take(range(n - cut, n)), test=self.validation, source=self.source)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def natural_label_order(values) -> list[str]:
    """Distinct labels as strings, numerically sorted when they are all integers."""
    distinct = {str(v) for v in values}
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def encode_labels(raw: list[str], label_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Map label strings to ids; label order is the given one, else natural (deterministic)."""
    names = label_names if label_names is not None else natural_label_order(raw)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(raw) - index.keys())
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in the label set {names}")
    return [index[r] for r in raw], list(names)


def split_pool(
    pool: Split, seed: int, test_fraction: float = 0.2, validation_fraction: float = 0.1
) -> tuple[Split, Split, Split]:
    """Shuffle one pool of examples with a fixed seed and cut it into train/validation/test."""
    order = np.random.RandomState(seed).permutation(len(pool))
    n_test = int(round(len(pool) * test_fraction))
    n_val = int(round(len(pool) * validation_fraction))
    test = pool.take(order[:n_test])
    validation = pool.take(order[n_test : n_test + n_val])
    train = pool.take(order[n_test + n_val :])
    return train, validation, test


def split_train_test(
    train_pool: Split, test: Split, seed: int, validation_fraction: float = 0.1
) -> tuple[Split, Split, Split]:
    """For corpora with an official test split: carve validation out of train; shuffle both."""
    order = np.random.RandomState(seed).permutation(len(train_pool))
    n_val = int(round(len(train_pool) * validation_fraction))
    test_order = np.random.RandomState(seed + 1).permutation(len(test))
    return train_pool.take(order[n_val:]), train_pool.take(order[:n_val]), test.take(test_order)


def complete_splits(
    name: str, train: Split, validation: Split | None, test: Split | None
) -> tuple[Split, Split, Split]:
    """Carve whichever of validation / test is missing out of train, deterministically."""
    if validation is not None and test is not None:
        return train, validation, test
    tr, va, te = split_pool(train, seed=derive_seed("split", name),
                            test_fraction=0.0 if test is not None else 0.2,
                            validation_fraction=0.0 if validation is not None else 0.1)
    return tr, validation if validation is not None else va, test if test is not None else te
