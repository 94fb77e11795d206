"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

The trim keeps each task vector's largest magnitudes over the whole tensor, so the
engine first finds each model's cut (`prepare`, one model at a time); the merge itself
is entry by entry and runs slice by slice.
"""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import MagnitudeCut, magnitude_cuts, sign_consensus_merge, task_vectors, trim


@register("ties", needs_base=True, elementwise=True, prepare=magnitude_cuts)
def fuse_ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    offset: int = 0, prepared: Sequence[MagnitudeCut] | None = None,
    density: float = 0.2, scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """Keep each task vector's top `density` magnitudes, elect signs, average agreeing entries."""
    cuts = prepared if prepared is not None else magnitude_cuts(tensors, base, density)
    deltas = trim(task_vectors(tensors, base).flatten(1), cuts, offset)
    merged = sign_consensus_merge(deltas, weights, normalize).view_as(base)
    return base.float() + scale * merged
