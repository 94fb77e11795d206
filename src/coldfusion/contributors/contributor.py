"""The contributor: holds one private task, finetunes the base it is sent, returns its update,
and scores each new base on its own task. The loop (local and Flower engines) and the
service's `contribute-loop` all drive this one class.

Its data never leaves it; what it sends is its finetuned body, encoded as it was told (the
full body, a delta, a sparse delta, a FISH-masked update or LoRA factors; encodings.py), its
example count, its statistics if asked (Fisher, Gram) and its evaluation numbers (accuracy,
macro-F1, per-example correctness bits). It may decline a round (`declines`), saying why.
"""

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from coldfusion.contributors.encodings import encoding_for
from coldfusion.contributors.heads import HeadStore
from coldfusion.encodings import FULL, EncodingSettings
from coldfusion.infra.runtime import derive_seed
from coldfusion.io.checkpoint import Tensors
from coldfusion.models.encoder import Classifier, Encoder
from coldfusion.tasks import Task
from coldfusion.training import Encoded, FinetuneSettings, encode
from coldfusion.training.finetune import finetune
from coldfusion.training.probe import ProbeProtocol
from coldfusion.training.statistics import diagonal_fisher, gram_matrices
from coldfusion.training.task_probe import TaskProbe


@dataclass
class ContributionResult:
    """What a contributor sends back for one iteration."""

    contributor: str
    task: str
    body: Tensors  # what is sent: the body, or its encoding (see `encoding`)
    num_examples: int
    metrics: dict = field(default_factory=dict)
    stats: dict[str, Tensors] = field(default_factory=dict)  # "fisher" / "gram" -> tensors by name
    encoding: dict = field(default_factory=lambda: dict(FULL))  # EncodingSettings.record() of `body`


class Contributor:
    def __init__(
        self, task: Task, encoder: Encoder, *, finetune_settings: FinetuneSettings, max_length: int,
        pooling: str, examples_per_iteration: int | None, validation_examples: int, keep_head: bool,
        seed: int, head: Tensors | None = None, statistics: str | None = None, statistics_examples: int = 128,
        encoding: EncodingSettings | None = None, head_store: HeadStore | None = None,
        device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32,
        evaluation: ProbeProtocol | None = None, last_round: int | None = None,
    ):
        self.task, self.encoder, self.settings = task, encoder, finetune_settings
        self.pooling, self.keep_head, self.seed = pooling, keep_head, seed
        self.max_length, self.last_round = max_length, last_round
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        self.examples_per_iteration = examples_per_iteration
        self.head = head  # kept across iterations when keep_head
        self.head_store = head_store  # where the head survives restarts (else it lives in memory only)
        self.evaluation = evaluation or ProbeProtocol()
        self._probe: TaskProbe | None = None
        self.statistics, self.statistics_examples = statistics, statistics_examples
        self.encoding = encoding or EncodingSettings()
        self.validation_examples = validation_examples
        # One fixed order of the private training set; iterations walk through it so each
        # sees fresh examples until the set is exhausted, then wrap around.
        self.order = np.random.RandomState(derive_seed(seed, "data", task.name)).permutation(len(task.train))

    # Tokenized on first use: a node asked only to score a base never needs them.
    @cached_property
    def train(self) -> Encoded:
        return encode(self.task.train, self.encoder.tokenizer, self.max_length)

    @cached_property
    def validation(self) -> Encoded:
        return encode(self.task.validation.head(self.validation_examples), self.encoder.tokenizer, self.max_length)

    @property
    def name(self) -> str:
        return self.task.name

    def examples_for(self, iteration: int) -> np.ndarray:
        n = self.examples_per_iteration or len(self.order)
        if n >= len(self.order):
            return self.order
        start = (iteration * n) % len(self.order)
        return np.take(self.order, range(start, start + n), mode="wrap")

    def declines(self, base: Tensors, iteration: int) -> str | None:
        """Why this contributor will not train on `base` in this round, or None."""
        if self.last_round is not None and iteration > self.last_round:
            return f"it trains in rounds up to {self.last_round} only (node config last-round)"
        expected = self.encoder.pretrained
        if base.keys() != expected.keys():
            unknown, absent = sorted(base.keys() - expected.keys()), sorted(expected.keys() - base.keys())
            return f"the base does not fit its model (unexpected {unknown[:3]}, absent {absent[:3]})"
        for name, value in base.items():
            if value.shape != expected[name].shape:
                shapes = f"{tuple(value.shape)}, not {tuple(expected[name].shape)}"
                return f"the base does not fit its model: {name} is {shapes}"
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"the base has non-finite values in {name}"
        return None

    def evaluate(self, body: Tensors, on_step=None) -> dict:
        """Score `body` by linear probing on this contributor's own task (see TaskProbe)."""
        if self._probe is None:  # tokenized once, on first use
            self._probe = TaskProbe(self.task, self.encoder, self.evaluation, self.max_length, self.pooling,
                                    self.device, self.compute_dtype)
        return self._probe.score(body, on_step)

    def num_evaluation_examples(self) -> int:
        e = self.evaluation
        return sum(min(n or len(s), len(s)) for n, s in ((e.train_examples, self.task.train),
                   (e.validation_examples, self.task.validation), (e.test_examples, self.task.test)))

    def contribute(self, base: Tensors, iteration: int, on_step=None) -> ContributionResult:
        if self.head_store is not None:  # the head after the last round it trained in before this one
            self.head = self.head_store.before(iteration)
        encoding = encoding_for(self.encoding)
        # A fresh head (and LoRA's A factors) depend only on these names, not on what else ran
        # in this process: engines that run contributors elsewhere, and resumed runs, agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "head", self.name, iteration))
            model = Classifier(self.encoder.new_body(base), self.task.num_labels, pooling=self.pooling)
            encoding.attach(model)
        if self.keep_head and self.head is not None:
            model.head.load_state_dict(self.head)
        model.place(self.device, self.compute_dtype)
        data = self.train.take(self.examples_for(iteration))
        encoding.before_training(model, data, derive_seed(self.seed, "fish", self.name, iteration),
                                 self.statistics_examples)
        try:
            result = finetune(model, data, self.validation, encoding.finetune_settings(self.settings),
                              seed=derive_seed(self.seed, "finetune", self.name, iteration), on_step=on_step)
        finally:
            encoding.after_training()
        self.head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}
        if self.head_store is not None:
            self.head_store.save(iteration, self.head)
        payload = encoding.payload(model, base)  # (LoRA folds its adapters in: the statistics see the body)
        stats = {}
        if self.statistics == "fisher":
            stats["fisher"] = diagonal_fisher(model, data, self.statistics_examples,
                                              seed=derive_seed(self.seed, "fisher", self.name, iteration))
        elif self.statistics == "gram":
            stats["gram"] = gram_matrices(model, data, self.statistics_examples)
        return ContributionResult(self.name, self.name, payload, len(data), result.summary(), stats,
                                  encoding.record())
