"""Honest evaluation: bodies x tasks x protocols (finetune, linear probe, few-shot) x seeds."""

from coldfusion.evaluation.config import EvalConfig, load_eval_config
from coldfusion.evaluation.few_shot import few_shot
from coldfusion.evaluation.run import run_evaluation

__all__ = ["EvalConfig", "few_shot", "load_eval_config", "run_evaluation"]
