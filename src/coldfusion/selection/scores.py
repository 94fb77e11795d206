"""Cheap scores of how well a body suits a target, from frozen features (docs/METHODS.md 3-4).

Each returns (score, seconds it took); higher is better. None of them looks at the
target's test split, which the finetunes that confirm them are scored on.
"""

import time

import torch

from coldfusion.selection.features import Features
from coldfusion.selection.logme import logme
from coldfusion.training import ProbeSettings
from coldfusion.training.probe import probe_features


def logme_score(train: Features) -> tuple[float, float]:
    start = time.perf_counter()
    score = logme(train.values.double().numpy(), train.labels.numpy())
    return score, time.perf_counter() - start


def probe_score(train: Features, validation: Features, num_labels: int, settings: ProbeSettings) -> tuple[float, float]:
    """Validation accuracy of a logistic-regression head on the frozen features (its L2
    chosen on the same validation split: a score for ranking, not a test result)."""
    start = time.perf_counter()
    held_out = (validation.values, validation.labels)
    result = probe_features((train.values, train.labels), held_out, held_out, num_labels, settings)
    return result.validation_accuracy, time.perf_counter() - start


def semb_similarity(source: Features, target: Features) -> tuple[float, float]:
    """SEmb: cosine similarity of the two datasets' mean sentence embeddings."""
    start = time.perf_counter()
    score = float(torch.nn.functional.cosine_similarity(source.values.mean(0), target.values.mean(0), dim=0))
    return score, time.perf_counter() - start
