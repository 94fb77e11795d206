"""Fuse safetensors files name by name, so memory does not grow with the number of models.

Files are memory-mapped (safe_open); each contributed tensor is read only when the
operator indexes it, and only the fused output is kept.
"""

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from coldfusion.checkpoint import Tensors
from coldfusion.errors import ColdFusionError
from coldfusion.fusion.registry import get_operator

# safetensors dtype names of the floating-point tensors that operators fuse
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class LazyTensors(Sequence):
    """The same-named tensor of every file, read from disk on access."""

    def __init__(self, handles, name: str):
        self.handles, self.name = handles, name

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.handles[i].get_tensor(self.name)


def _check_same_keys(paths: Sequence[Path], key_sets: list[set[str]]) -> None:
    reference = key_sets[0]
    for path, keys in zip(paths[1:], key_sets[1:], strict=True):
        if keys != reference:
            missing, extra = sorted(reference - keys), sorted(keys - reference)
            raise ColdFusionError(
                f"{path} does not have the same tensors as {paths[0]}: missing {missing[:3]}, extra {extra[:3]}"
            )


def fuse_files(
    paths: Sequence[Path],
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: Path | None = None,
    stats: Sequence[Path] | None = None,
    **params,
) -> Tensors:
    """Fuse the bodies stored at `paths` with a registered operator.

    `stats[i]` is contributor i's statistics file (Fisher or Gram matrices) for the
    operators that need one.
    """
    if not paths:
        raise ColdFusionError("nothing to fuse: no contributions")
    op = get_operator(method)
    params = op.check_params(params)
    if op.wants_name:
        params["name"] = ""  # set per tensor below
    if op.needs_base and base is None:
        raise ColdFusionError(f"fusion method '{method}' needs a base model")
    if op.needs_stats and (stats is None or len(stats) != len(paths)):
        raise ColdFusionError(
            f"fusion method '{method}' needs {op.needs_stats} statistics from every contributor "
            f"(computed on its own data); got {0 if stats is None else len(stats)} for {len(paths)} contributions")
    w = torch.ones(len(paths)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if len(w) != len(paths) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ColdFusionError(f"fusion weights must be {len(paths)} non-negative numbers with a positive sum")
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        base_handle = stack.enter_context(safe_open(str(base), framework="pt")) if base else None
        key_sets = [set(h.keys()) for h in handles]
        _check_same_keys(list(paths), key_sets)
        stat_handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in stats or []]
        stat_keys = [set(h.keys()) for h in stat_handles]
        if stat_handles:
            _check_same_keys(list(stats), stat_keys)
        fused = {}
        for name in sorted(key_sets[0]):
            tensors = LazyTensors(handles, name)
            dtype = FLOAT_DTYPES.get(handles[0].get_slice(name).get_dtype())
            if dtype is None:  # integer buffers (ids) must agree; never averaged
                first = tensors[0]
                if any(not torch.equal(first, tensors[i]) for i in range(1, len(tensors))):
                    raise ColdFusionError(f"non-float tensor '{name}' differs between contributions")
                fused[name] = first
                continue
            extra = {"base": base_handle.get_tensor(name)} if op.needs_base else {}
            if op.needs_stats:
                has_stats = name in stat_keys[0]
                if op.needs_stats == "fisher" and not has_stats:
                    raise ColdFusionError(f"{stats[0]} has no Fisher entry for tensor '{name}'")
                extra["stats"] = LazyTensors(stat_handles, name) if has_stats else None
            if op.wants_name:
                params["name"] = name
            fused[name] = op.fuse(tensors, w, **extra, **params).to(dtype)
    return fused
