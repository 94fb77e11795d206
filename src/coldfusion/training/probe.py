"""Linear probe: freeze the body, embed each split once, fit a logistic-regression head.

The head is fit by full-batch L-BFGS on standardized features for each L2 strength of
a small grid; the strength with the best validation accuracy is scored on test.
"""

from dataclasses import dataclass

import numpy as np
import torch

from coldfusion.models.encoder import Classifier
from coldfusion.training.batching import Encoded, collate, device_of, length_bucketed_batches
from coldfusion.training.evaluate import classification_metrics
from coldfusion.training.precision import cast_to
from coldfusion.training.settings import ProbeProtocol, ProbeSettings  # noqa: F401 (re-exported)


@dataclass
class ProbeResult:
    test: dict[str, float]
    validation_accuracy: float
    l2: float
    test_correct: np.ndarray  # per test example: was it right? (for paired comparisons)


@torch.inference_mode()
def extract_features(model: Classifier, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    out, device = torch.empty((len(data), model.head.in_features)), device_of(model)
    with cast_to(model, model.compute_dtype):
        for idx in length_bucketed_batches(data.lengths, batch_size, rng=None):
            out[torch.as_tensor(idx)] = model.embed(**collate(data, idx, device)).float().cpu()
    return out


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float, max_iter: int):
    """Multinomial logistic regression (weights, bias) by L-BFGS; deterministic."""
    w = torch.zeros((x.shape[1], num_labels), requires_grad=True)
    b = torch.zeros(num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_features(
    train: tuple[torch.Tensor, torch.Tensor], validation: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor], num_labels: int, settings: ProbeSettings,
) -> ProbeResult:
    """Fit on train features for each L2 in the grid, select on validation, score test."""
    mean, std = train[0].mean(0), train[0].std(0).clamp(min=1e-6)
    norm = lambda x: (x - mean) / std  # noqa: E731
    best = None
    for l2 in settings.l2_grid:
        w, b = fit_logistic_regression(norm(train[0]), train[1], num_labels, l2, settings.max_iter)
        acc = classification_metrics((norm(validation[0]) @ w + b).argmax(-1), validation[1])["accuracy"]
        if best is None or acc > best[0]:
            best = (acc, l2, w, b)
    acc, l2, w, b = best
    predictions = (norm(test[0]) @ w + b).argmax(-1)
    test_metrics = classification_metrics(predictions, test[1])
    return ProbeResult(test=test_metrics, validation_accuracy=acc, l2=l2, test_correct=(predictions == test[1]).numpy())


def linear_probe(
    model: Classifier, train: Encoded, validation: Encoded, test: Encoded, num_labels: int,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    s = settings or ProbeSettings()
    feats = {name: (extract_features(model, d, s.batch_size), d.labels)
             for name, d in (("train", train), ("validation", validation), ("test", test))}
    return probe_features(feats["train"], feats["validation"], feats["test"], num_labels, s)
