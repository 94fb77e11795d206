"""Training building blocks: batching, finetune, linear probe, evaluate.

The functions that share their module's name (`finetune`, `evaluate`) are imported from
their modules (`from coldfusion.training.finetune import finetune`): a package attribute
of that name is the submodule once it is loaded.
"""

from coldfusion.infra.lazy import lazy_exports
from coldfusion.training.settings import FinetuneSettings, ProbeProtocol, ProbeSettings

_LAZY = {
    "Encoded": "coldfusion.training.batching", "encode": "coldfusion.training.batching",
    "classification_metrics": "coldfusion.training.evaluate",
    "predict_logits": "coldfusion.training.evaluate",
    "FinetuneResult": "coldfusion.training.finetune",
    "ProbeResult": "coldfusion.training.probe", "extract_features": "coldfusion.training.probe",
    "linear_probe": "coldfusion.training.probe",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["FinetuneSettings", "ProbeProtocol", "ProbeSettings", *_LAZY]
