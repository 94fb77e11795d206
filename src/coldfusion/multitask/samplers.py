"""Which task the next multitask batch comes from (docs/METHODS.md section 5).

Static samplers fix a distribution over tasks from their sizes; `mometas` learns one from
the drops of the tasks' validation losses (REINFORCE); `uncertainty` picks examples rather
than tasks (the most uncertain among candidate batches from every task, CA-MTL).
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

    def observe(self, losses: Sequence[float]) -> float | None:
        """The tasks' validation losses, every `every` steps (only `mometas` learns from them)."""
        return None

    every: int | None = None  # steps between validation losses; None: the sampler needs none


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


class Mometas(TaskSampler):
    """MOMETAS (Wu et al. 2022): a learned distribution over tasks. One logit per task,
    equal at start; each step's task is a hard Gumbel-softmax sample (the argmax of logits
    plus Gumbel noise, a draw from softmax(logits)). Every `every` steps the trainer reports
    each task's validation loss; the reward is the summed relative drop,
    `sum_t max((L_prev - L_new) / L_prev, -1)`, a drop under `tolerance` counting as 0, and
    the logits take one plain SGD step on REINFORCE with an entropy bonus,
    `-R * sum_i log p(a_i) - entropy_weight * H(p)` over the window's draws a_i.
    (The published code: every 100 steps, lr 0.1, entropy weight 2.)
    """

    def __init__(self, sizes: Sequence[int], every: int = 100, lr: float = 0.1, entropy_weight: float = 2.0,
                 tolerance: float = 1e-3):
        super().__init__(sizes)
        if every < 1 or lr <= 0 or entropy_weight < 0 or tolerance < 0:
            raise ColdFusionError("mometas sampler: need every >= 1, lr > 0, entropy_weight >= 0, tolerance >= 0")
        self.every, self.lr, self.entropy_weight, self.tolerance = every, lr, entropy_weight, tolerance
        self.logits = np.zeros(len(self.sizes))
        self.drawn: list[int] = []  # the tasks drawn since the last update
        self.losses: np.ndarray | None = None  # each task's validation loss at the last update

    def probabilities(self) -> np.ndarray:
        z = np.exp(self.logits - self.logits.max())
        return z / z.sum()

    def draw(self, rng: np.random.Generator) -> int:
        task = int(np.argmax(self.logits + rng.gumbel(size=len(self.logits))))
        self.drawn.append(task)
        return task

    def reward(self, previous: np.ndarray, current: np.ndarray) -> float:
        drop = np.maximum((previous - current) / previous, -1.0)
        return float(np.where(np.abs(drop) < self.tolerance, 0.0, drop).sum())

    def observe(self, losses: Sequence[float]) -> float | None:
        """The tasks' validation losses now; after the first call, one update of the logits.
        Returns the reward (None at the first call, which only sets the baseline losses)."""
        losses = np.asarray(losses, dtype=float)
        previous, self.losses = self.losses, losses
        if previous is None:
            self.drawn = []
            return None
        reward = self.reward(previous, losses)
        p = self.probabilities()
        # gradients of sum_i log p(a_i) and of H(p) = -sum p log p with respect to the logits
        counts = np.bincount(self.drawn, minlength=len(p)).astype(float)
        grad_log_p = counts - len(self.drawn) * p
        log_p = np.log(np.clip(p, 1e-300, None))
        grad_entropy = -p * (log_p + float(-(p * log_p).sum()))
        self.logits += self.lr * (reward * grad_log_p + self.entropy_weight * grad_entropy)  # descent on the loss
        self.drawn = []
        return reward


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of each row's softmax divided by log(classes): 0 = certain, 1 = uniform."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return entropy / math.log(logits.shape[1]) if logits.shape[1] > 1 else np.zeros(len(logits))


def uncertainty_scores(candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
    """CA-MTL's MT-Uncertainty score of every candidate example: its prediction's entropy over
    the largest entropy for its task's number of classes, times its task's mean such entropy
    over the largest task mean (tasks the model is unsure of overall get more of the batch)."""
    entropies = [normalized_entropy(np.asarray(logits, dtype=float)) for logits in candidates]
    means = np.array([h.mean() if len(h) else 0.0 for h in entropies])
    top = means.max() if len(means) else 0.0
    return [h * (mean / top if top > 0 else 0.0) for h, mean in zip(entropies, means, strict=True)]


def most_uncertain(candidates: Sequence[np.ndarray], batch_size: int) -> list[tuple[int, int]]:
    """CA-MTL's uncertainty sampling: from one candidate batch of logits per task, the
    (task, row) pairs of the `batch_size` examples with the highest `uncertainty_scores`.
    Ties go to the earlier task and row, so the choice is deterministic."""
    scored = [(-float(h), t, r) for t, scores in enumerate(uncertainty_scores(candidates))
              for r, h in enumerate(scores)]
    return [(t, r) for _, t, r in sorted(scored)[:batch_size]]


SAMPLERS = {"proportional": Proportional, "uniform": Uniform, "temperature": Temperature, "mometas": Mometas}


def make_sampler(name: str, sizes: Sequence[int], **params) -> TaskSampler:
    """A task sampler by name (`uncertainty` chooses examples, see `most_uncertain`)."""
    if name not in SAMPLERS:
        raise ColdFusionError(f"unknown task sampler '{name}'; available: {', '.join([*SAMPLERS, 'uncertainty'])}")
    try:
        return SAMPLERS[name](sizes, **params)
    except TypeError as exc:
        raise ColdFusionError(f"sampler '{name}': {exc}") from None
