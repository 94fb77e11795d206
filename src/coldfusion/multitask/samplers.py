"""Which task the next multitask batch comes from (docs/METHODS.md section 5).

Static samplers fix a distribution over tasks from their sizes; `adaptive` learns one
from rewards (a bandit); `uncertainty` picks examples rather than tasks (the most
uncertain among candidate batches from every task, CA-MTL).
"""

import math
from collections.abc import Sequence

import numpy as np

from coldfusion.infra.errors import ColdFusionError


class TaskSampler:
    """A distribution over tasks; `draw` picks the next batch's task."""

    def __init__(self, sizes: Sequence[int]):
        if not sizes or any(n <= 0 for n in sizes):
            raise ColdFusionError(f"every task needs training examples; sizes {list(sizes)}")
        self.sizes = np.asarray(sizes, dtype=float)

    def probabilities(self) -> np.ndarray:
        raise NotImplementedError

    def draw(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.sizes), p=self.probabilities()))

    def update(self, task: int, reward: float) -> None:
        """Feedback after training on a batch of `task` (only `adaptive` uses it)."""


class Proportional(TaskSampler):
    """p_t proportional to the task's number of training examples."""

    def probabilities(self) -> np.ndarray:
        return self.sizes / self.sizes.sum()


class Uniform(TaskSampler):
    """Every task equally often, whatever its size."""

    def probabilities(self) -> np.ndarray:
        return np.full(len(self.sizes), 1.0 / len(self.sizes))


class Temperature(TaskSampler):
    """p_t proportional to size^(1/T): T = 1 is proportional, T -> infinity uniform."""

    def __init__(self, sizes: Sequence[int], temperature: float = 2.0):
        super().__init__(sizes)
        if temperature <= 0:
            raise ColdFusionError(f"sampler temperature must be positive, not {temperature}")
        self.temperature = temperature

    def probabilities(self) -> np.ndarray:
        scaled = self.sizes ** (1.0 / self.temperature)
        return scaled / scaled.sum()


class Adaptive(TaskSampler):
    """A bandit over tasks (MOMETAS-style, EXP3 flavour): a task's reward is the drop in
    held-out loss its batch brought; probabilities are a softmax of exponentially
    smoothed rewards, mixed with `explore` of the uniform distribution so no task starves.
    """

    def __init__(self, sizes: Sequence[int], temperature: float = 0.1, smoothing: float = 0.3,
                 explore: float = 0.1):
        super().__init__(sizes)
        if temperature <= 0 or not 0 < smoothing <= 1 or not 0 <= explore <= 1:
            raise ColdFusionError("adaptive sampler: need temperature > 0, smoothing in (0, 1], explore in [0, 1]")
        self.temperature, self.smoothing, self.explore = temperature, smoothing, explore
        self.rewards = np.zeros(len(self.sizes))

    def probabilities(self) -> np.ndarray:
        logits = self.rewards / self.temperature
        soft = np.exp(logits - logits.max())
        soft /= soft.sum()
        return (1 - self.explore) * soft + self.explore / len(self.sizes)

    def update(self, task: int, reward: float) -> None:
        if math.isfinite(reward):
            self.rewards[task] += self.smoothing * (reward - self.rewards[task])


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of each row's softmax divided by log(classes): 0 = certain, 1 = uniform."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return entropy / math.log(logits.shape[1]) if logits.shape[1] > 1 else np.zeros(len(logits))


def most_uncertain(candidates: Sequence[np.ndarray], batch_size: int) -> list[tuple[int, int]]:
    """CA-MTL's uncertainty sampling: from one candidate batch of logits per task, the
    (task, row) pairs of the `batch_size` examples with the highest normalized entropy.
    Ties go to the earlier task and row, so the choice is deterministic."""
    scored = [(-float(h), t, r) for t, logits in enumerate(candidates)
              for r, h in enumerate(normalized_entropy(np.asarray(logits, dtype=float)))]
    return [(t, r) for _, t, r in sorted(scored)[:batch_size]]


SAMPLERS = {"proportional": Proportional, "uniform": Uniform, "temperature": Temperature, "adaptive": Adaptive}


def make_sampler(name: str, sizes: Sequence[int], **params) -> TaskSampler:
    """A task sampler by name (`uncertainty` chooses examples, see `most_uncertain`)."""
    if name not in SAMPLERS:
        raise ColdFusionError(f"unknown task sampler '{name}'; available: {', '.join([*SAMPLERS, 'uncertainty'])}")
    try:
        return SAMPLERS[name](sizes, **params)
    except TypeError as exc:
        raise ColdFusionError(f"sampler '{name}': {exc}") from None
