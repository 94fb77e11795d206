"""Honest evaluation: bodies x tasks x protocols (finetune, linear probe, few-shot) x seeds."""

from coldfusion.evaluation.config import EvalConfig, load_eval_config
from coldfusion.infra.lazy import lazy_exports

_LAZY = {"run_evaluation": "coldfusion.evaluation.run"}  # few_shot: import it from its module


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["EvalConfig", "load_eval_config", "run_evaluation"]
