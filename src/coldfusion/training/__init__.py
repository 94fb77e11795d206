"""Training building blocks: batching, finetune, linear probe, evaluate."""

from coldfusion.training.settings import FinetuneSettings, ProbeProtocol, ProbeSettings

_LAZY = {
    "Encoded": "coldfusion.training.batching", "encode": "coldfusion.training.batching",
    "classification_metrics": "coldfusion.training.evaluate", "evaluate": "coldfusion.training.evaluate",
    "predict_logits": "coldfusion.training.evaluate",
    "FinetuneResult": "coldfusion.training.finetune", "finetune": "coldfusion.training.finetune",
    "ProbeResult": "coldfusion.training.probe", "extract_features": "coldfusion.training.probe",
    "linear_probe": "coldfusion.training.probe",
}


def __getattr__(name: str):
    """Import a submodule only when one of its names is used: configs and the CLI import
    this package's settings without paying for torch."""
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["FinetuneSettings", "ProbeProtocol", "ProbeSettings", *_LAZY]
