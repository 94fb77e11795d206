"""Score a body on one task by linear probing, with the task's splits tokenized once.

Whoever holds the task runs it: a contributor on its own data (only the numbers leave
its node), or the server on its own evaluation suite.
"""

import torch

from coldfusion.io.checkpoint import Tensors
from coldfusion.models.encoder import Classifier, Encoder
from coldfusion.tasks import Task
from coldfusion.training.batching import encode
from coldfusion.training.probe import ProbeProtocol, extract_features, probe_features

SPLITS = ("train", "validation", "test")


class TaskProbe:
    def __init__(self, task: Task, encoder: Encoder, protocol: ProbeProtocol, max_length: int, pooling: str,
                 device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32):
        self.task, self.encoder, self.protocol = task, encoder, protocol
        self.pooling, self.device, self.compute_dtype = pooling, torch.device(device), compute_dtype
        sizes = (protocol.train_examples, protocol.validation_examples, protocol.test_examples)
        self.splits = {split: encode(getattr(task, split).head(n), encoder.tokenizer, max_length)
                       for split, n in zip(SPLITS, sizes, strict=True)}

    def num_examples(self) -> int:
        return sum(len(d) for d in self.splits.values())

    def score(self, body: Tensors, on_step=None) -> dict:
        """Test accuracy and macro-F1, the chosen L2 and its validation accuracy, and which test
        examples it got right (a 0/1 string, for paired bootstraps): numbers only."""
        model = Classifier(self.encoder.new_body(body), self.task.num_labels, pooling=self.pooling)
        model.place(self.device, self.compute_dtype)
        features = {}
        for split, data in self.splits.items():
            features[split] = (extract_features(model, data, self.protocol.probe.batch_size), data.labels)
            if on_step:
                on_step(len(data))
        result = probe_features(features["train"], features["validation"], features["test"], self.task.num_labels,
                                self.protocol.probe)
        return {**result.test, "l2": result.l2, "validation_accuracy": result.validation_accuracy,
                "test_correct": "".join("1" if c else "0" for c in result.test_correct)}
