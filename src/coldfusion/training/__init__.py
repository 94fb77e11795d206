"""Training building blocks: batching, finetune, linear probe, evaluate."""

from coldfusion.training.batching import Encoded, encode
from coldfusion.training.evaluate import classification_metrics, evaluate, predict_logits
from coldfusion.training.finetune import FinetuneResult, FinetuneSettings, finetune
from coldfusion.training.probe import ProbeResult, ProbeSettings, extract_features, linear_probe

__all__ = [
    "Encoded", "FinetuneResult", "FinetuneSettings", "ProbeResult", "ProbeSettings", "classification_metrics",
    "encode", "evaluate", "extract_features", "finetune", "linear_probe", "predict_logits",
]
