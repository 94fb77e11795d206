"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

The trim keeps each task vector's largest magnitudes over the whole tensor, so the
engine first finds each model's cut (`prepare`, one model at a time); the merge itself
is entry by entry and runs slice by slice. Both loops are compiled (ties_kernel.py),
which is imported here only when TIES runs, so other commands do not load numba.
"""

from collections.abc import Sequence

import torch

from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import stack_float


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float) -> list:
    """Each model's MagnitudeCut of its whole task vector."""
    from coldfusion.fusion import ties_kernel

    return ties_kernel.magnitude_cuts(tensors, base, density)


@register("ties", needs_base=True, elementwise=True, prepare=magnitude_cuts)
def fuse_ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    offset: int = 0, prepared: Sequence | None = None,
    density: float = 0.2, scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """Keep each task vector's top `density` magnitudes, elect signs, average agreeing entries."""
    from coldfusion.fusion.ties_kernel import ties_merge

    cuts = prepared if prepared is not None else magnitude_cuts(tensors, base, density)
    merged = ties_merge(stack_float(tensors).flatten(1), base.flatten(), cuts, weights, offset, normalize, scale)
    return merged.view_as(base)
