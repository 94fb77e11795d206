"""Element-wise robust aggregates for untrusted contributors (weights are ignored)."""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import stack_float


@register("median", elementwise=True)
def fuse_median(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Element-wise median (the mean of the two middle values when n is even)."""
    ordered = stack_float(tensors).sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@register("trimmed_mean", elementwise=True)
def fuse_trimmed_mean(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.2,
) -> torch.Tensor:
    """Element-wise mean after dropping the floor(trim * n) largest and smallest values."""
    ordered = stack_float(tensors).sort(dim=0).values
    n = ordered.shape[0]
    k = min(int(trim * n), (n - 1) // 2)
    return ordered[k : n - k].mean(0)
