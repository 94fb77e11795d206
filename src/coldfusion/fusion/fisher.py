"""Fisher merging (Matena & Raffel 2022): a per-entry average weighted by diagonal Fisher."""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from coldfusion.fusion.registry import register


@register("fisher", needs_stats="fisher", elementwise=True)
def fuse_fisher(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, stats: Sequence[torch.Tensor],
    floor: Annotated[float, Field(gt=0)] = 1e-6,
) -> torch.Tensor:
    """sum_i w_i F_i m_i / sum_i w_i F_i, with every Fisher entry floored at `floor`."""
    num, den = None, None
    for w, t, f in zip(weights.tolist(), tensors, stats, strict=True):  # one model at a time
        wf = f.float().clamp(min=floor) * w
        num = wf * t.float() if num is None else num.add_(wf * t.float())
        den = wf if den is None else den.add_(wf)
    return num / den
