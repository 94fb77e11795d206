"""Norm clipping: scale down each update whose whole-model delta norm exceeds a bound, then average.

The defence of federated learning against boosted updates (Sun et al. 2019, "Can you
really backdoor federated learning?"): a contributor can move the fused model by at most
C / n, however far it moved its own. The norm is over the whole body (every tensor), as
in those papers; the engine measures it once per model before fusing (`needs_norms`).
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import add_task_vectors, mixing_weights


@register("norm_clipping", needs_base=True, elementwise=True, needs_norms=True)
def fuse_norm_clipping(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor, norms: torch.Tensor,
    clip: Annotated[float, Field(gt=0)] | None = None,
) -> torch.Tensor:
    """b + sum_i w_i min(1, C / ||m_i - b||) (m_i - b), weights summing to 1; C: `clip`, default the median norm."""
    bound = float(norms.median()) if clip is None else clip  # torch: the lower middle value for an even count
    factors = torch.where(norms > bound, bound / norms.clamp(min=1e-30), torch.ones_like(norms))
    return add_task_vectors(tensors, (mixing_weights(weights, normalize=True) * factors).tolist(), base)
