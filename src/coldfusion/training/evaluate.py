"""Predictions and classification metrics (accuracy, macro-F1)."""

import numpy as np
import torch

from coldfusion.models.encoder import Classifier
from coldfusion.training.batching import Encoded, collate, device_of, length_bucketed_batches
from coldfusion.training.precision import cast_to


def classification_metrics(predictions, labels) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in labels or predictions (as sklearn)."""
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if len(y) == 0:
        raise ValueError("cannot score an empty split")
    f1s = []
    for c in np.union1d(p, y):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(p == y)), "macro_f1": float(np.mean(f1s))}


@torch.inference_mode()
def predict_logits(model: Classifier, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out, device = torch.empty((len(data), model.head.out_features)), device_of(model)
    with cast_to(model, model.compute_dtype):
        for idx in length_bucketed_batches(data.lengths, batch_size, rng=None):
            out[torch.as_tensor(idx)] = model(**collate(data, idx, device)).float().cpu()
    model.train(was_training)
    return out


def evaluate(model: Classifier, data: Encoded, batch_size: int = 64) -> dict[str, float]:
    logits = predict_logits(model, data, batch_size)
    return classification_metrics(logits.argmax(-1).numpy(), data.labels.numpy())
