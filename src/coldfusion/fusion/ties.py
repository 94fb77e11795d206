"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

The trim keeps each task vector's largest magnitudes over the whole tensor, so for a
large tensor the engine first finds each model's cut (`prepare`: as many models at once
as its buffer holds, a thread each, or one at a time with the threads sharing its scan)
and the merge, entry by entry, then runs slice by slice. When all models' tensors fit in
the engine's buffer, each is read once, cut, and merged from memory, on `workers`
threads. Both loops are compiled (ties_kernel.py), which is imported here only when TIES
runs, so other commands do not load numba.
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from coldfusion.fusion.parallel import parallel_map
from coldfusion.fusion.registry import register
from coldfusion.fusion.task_vectors import stack_float


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float, workers: int = 1) -> list:
    """Each model's MagnitudeCut of its whole task vector."""
    from coldfusion.fusion import ties_kernel

    return ties_kernel.magnitude_cuts(tensors, base, density, workers)


@register("ties", needs_base=True, elementwise=True, prepare=magnitude_cuts, compute_bound=True)
def fuse_ties(
    tensors: Sequence[torch.Tensor], weights: torch.Tensor, base: torch.Tensor,
    offset: int = 0, prepared: Sequence | None = None, workers: int = 1,
    density: Annotated[float, Field(gt=0, le=1)] = 0.2, scale: float = 1.0, normalize: bool = True,
) -> torch.Tensor:
    """Keep each task vector's top `density` magnitudes, elect signs, average agreeing entries."""
    from coldfusion.fusion.ties_kernel import model_cut, ties_merge

    models, flat_base = stack_float(tensors).flatten(1), base.flatten()
    if prepared is None:  # whole tensors, all in memory: cut each from the same read
        b = flat_base.float().contiguous().numpy()
        prepared = parallel_map(lambda row: model_cut(row.numpy(), b, density), models, workers)
    return ties_merge(models, flat_base, prepared, weights, offset, normalize, scale, workers=workers).view_as(base)
