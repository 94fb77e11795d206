"""Honest evaluation: bodies x tasks x protocols (finetune, linear probe, few-shot) x seeds."""

from coldfusion.evaluation.config import EvalConfig, load_eval_config

_LAZY = {"few_shot": "coldfusion.evaluation.few_shot", "run_evaluation": "coldfusion.evaluation.run"}


def __getattr__(name: str):
    """Import the protocols only when used: a config is checked without loading torch."""
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["EvalConfig", "few_shot", "load_eval_config", "run_evaluation"]
