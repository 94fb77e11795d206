"""How a body is scored on a task (docs/METHODS.md section 1): finetune, linear probe, few-shot.

Each protocol starts from the same body, trains what it trains with a seed, and scores
the test split; it returns the metrics and which test examples it got right (for paired
confidence intervals across bodies).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from coldfusion.evaluation.config import ProtocolSettings
from coldfusion.evaluation.few_shot import few_shot
from coldfusion.infra.runtime import Compute, derive_seed
from coldfusion.models.encoder import Classifier
from coldfusion.tasks.task import Task
from coldfusion.training import encode
from coldfusion.training.evaluate import classification_metrics, predict_logits
from coldfusion.training.finetune import finetune
from coldfusion.training.probe import linear_probe


@dataclass
class Score:
    metrics: dict[str, float]
    correct: np.ndarray  # 0/1 per test example, in test-split order
    details: dict


def _test_score(model: Classifier, test, details: dict) -> Score:
    predictions = predict_logits(model, test).argmax(-1).numpy()
    labels = np.asarray(test.labels)
    return Score(classification_metrics(predictions, labels), (predictions == labels).astype(np.uint8), details)


def run_protocol(protocol: str, new_body, task: Task, splits: dict, seed: int, settings: ProtocolSettings,
                 tokenizer, max_length: int, pooling: str, compute: Compute | None = None,
                 prepare: Callable[[Classifier], None] | None = None) -> Score:
    """Score a fresh copy of the body (`new_body()`) on `task` with `protocol` and `seed`.

    `splits` holds the task's encoded train / validation / test examples. Seeds are
    derived from (seed, protocol, task): independent across tasks, and the same for
    every body, so bodies are compared on the same head initialisation and few-shot draw.
    `compute`: where the model runs and in which precision (default: CPU, fp32). `prepare`
    changes the fresh model before it trains (adapter settings attach a LoRA adapter).
    """
    seed = derive_seed(seed, protocol, task.name)
    torch.manual_seed(seed)
    model = Classifier(new_body(), task.num_labels, pooling=pooling)
    if prepare is not None:
        prepare(model)
    if compute is not None:
        model.place(compute.device, compute.dtype)
    if protocol == "linear_probe":
        result = linear_probe(model, splits["train"], splits["validation"], splits["test"], task.num_labels,
                              settings.probe)
        return Score(result.test, np.asarray(result.test_correct, dtype=np.uint8),
                     {"l2": result.l2, "validation_accuracy": result.validation_accuracy})
    if protocol == "finetune":
        result = finetune(model, splits["train"], splits["validation"], settings.finetune, seed=seed)
        return _test_score(model, splits["test"], {"steps": result.steps, "train_examples": len(splits["train"])})
    if protocol == "few_shot":
        s = settings.few_shot
        train = encode(few_shot(task.train, s.k, seed, s.per), tokenizer, max_length)
        validation = (encode(few_shot(task.validation, s.validation_k, seed), tokenizer, max_length)
                      if s.validation_k else None)
        result = finetune(model, train, validation, s.finetune, seed=seed)
        return _test_score(model, splits["test"], {"steps": result.steps, "train_examples": len(train),
                                                   "few_shot_per": s.per})
    raise ValueError(f"unknown protocol {protocol}")
