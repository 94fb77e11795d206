"""Fusion operators over named tensors, one module each, behind a registry."""

from coldfusion.fusion import (  # noqa: F401  (importing registers the operators)
    average,
    dare,
    fisher,
    norm_clipping,
    regmean,
    robust,
    task_arithmetic,
    ties,
    weighted,
)
from coldfusion.fusion.registry import REGISTRY, Operator, get_operator, register
from coldfusion.fusion.streaming import fuse_files

__all__ = ["REGISTRY", "Operator", "fuse_files", "get_operator", "register"]
