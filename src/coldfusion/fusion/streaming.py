"""Fuse checkpoints name by name, slice by slice, so memory does not grow with the number of models.

Checkpoints are safetensors (one file or shards); each contributed tensor is read from
disk only when the operator indexes it. `fuse_stream` yields the fused result a slice
at a time (for writing straight to disk); `fuse_readers` / `fuse_files` collect it.
A compute-bound operator's slices (TIES) are read and fused on as many threads as torch
may use (parallel.py), a slice per thread, so one thread reads while another computes.
"""

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from functools import partial
from pathlib import Path

import torch

from coldfusion.fusion.parallel import budget, ordered_map, parallel_map
from coldfusion.fusion.registry import Operator, get_operator
from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.faults import failpoint
from coldfusion.infra.runtime import torch_threads
from coldfusion.io.checkpoint import Tensors
from coldfusion.io.tensorfile import FLOAT_DTYPES, SafetensorsReader

# Entries per slice for elementwise operators: SLICE x SLICE_MODELS over all the models
# (4 MB of float32, which stays in a core's cache), and at least SLICE per model: memory
# is flat in the number of models, and fewer models take longer slices (less overhead).
SLICE, SLICE_MODELS = 1 << 16, 16
# An operator with a `prepare` step (TIES) gets a tensor whole, all models at once, when
# they fit in this much memory: then each model is read once, not twice. Otherwise the
# same buffer holds the models that `prepare` reads, as many at once as fit.
HOLD_BYTES = 64 << 20


class LazyTensors(Sequence):
    """The same-named tensor (or flat slice [start, stop) of it) of every checkpoint, read on access."""

    fresh = True  # every access reads into a buffer of its own, which the operator may overwrite

    def __init__(self, readers, name: str, span: tuple[int, int] | None = None, scratch: torch.Tensor | None = None,
                 workers: int = 1):
        """`scratch` (flat float32), when large enough, holds `stacked()`: the engine reuses
        one buffer across tensors, because a fresh one of tens of MB is returned to the
        system when freed and its pages are faulted in again for the next tensor.
        `stacked()` reads `workers` models at a time."""
        self.readers, self.name, self.span, self.scratch, self.workers = readers, name, span, scratch, workers

    def __len__(self) -> int:
        return len(self.readers)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def read_into(self, i: int, out: torch.Tensor) -> torch.Tensor:
        """Model i's tensor (or slice), flat, as float32 in `out` (read straight into it
        when the file stores float32): a reused buffer saves allocating and faulting pages."""
        reader = self.readers[i]
        if reader.dtype(self.name) == "F32":
            return reader.read(self.name, *(self.span or (0, None)), out=out)
        return out.copy_(self[i].view(-1))

    def streamed(self) -> Iterator[torch.Tensor]:
        """Each model's tensor (or slice) in turn, float32, read into one buffer that the
        next one overwrites (the first row of `scratch` when that is large enough)."""
        shape = self._shape()
        buffer = self._buffer(math.prod(shape))
        for i in range(len(self)):
            yield self.read_into(i, buffer).view(shape)

    def stacked(self) -> torch.Tensor:
        """All of them in one float32 (n, ...) tensor."""
        shape = self._shape()
        out = self._buffer(len(self) * math.prod(shape)).view(len(self), *shape)
        parallel_map(lambda i: self.read_into(i, out[i].view(-1)), range(len(self)), self.workers)
        return out

    def _shape(self) -> tuple[int, ...]:
        """The shape of one model's tensor, or of the slice (flat)."""
        return self.readers[0].shape(self.name) if self.span is None else (self.span[1] - self.span[0],)

    def _buffer(self, size: int) -> torch.Tensor:
        """`size` float32 entries: the start of `scratch` when it is large enough, else new ones."""
        fits = self.scratch is not None and self.scratch.numel() >= size
        return self.scratch[:size] if fits else torch.empty(size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        reader = self.readers[i]
        return reader.get_tensor(self.name) if self.span is None else reader.read(self.name, *self.span)


def _check_same_keys(readers: Sequence[SafetensorsReader]) -> None:
    reference = readers[0].keys()
    for reader in readers[1:]:
        keys = reader.keys()
        if keys != reference:
            missing, extra = sorted(reference - keys), sorted(keys - reference)
            raise ColdFusionError(f"{reader.label} does not have the same tensors as {readers[0].label}: "
                                  f"missing {missing[:3]}, extra {extra[:3]}")


def _check_same_shape(name: str, readers: Sequence[SafetensorsReader]) -> None:
    # Slices are flat: without this, two layouts with the same size would fuse silently.
    shape = readers[0].shape(name)
    for reader in readers[1:]:
        if reader.shape(name) != shape:
            raise ColdFusionError(f"tensor '{name}' has shape {list(reader.shape(name))} in {reader.label} but "
                                  f"{list(shape)} in {readers[0].label}; only same-architecture models can be fused")


def output_layout(readers: Sequence[SafetensorsReader], names: set[str]) -> dict[str, tuple[torch.dtype, tuple]]:
    """dtype and shape of every fused tensor, in the order `fuse_stream` yields them."""
    return {n: readers[0].layout(n) for n in sorted(names)}


def fuse_stream(
    readers: Sequence[SafetensorsReader],
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: SafetensorsReader | None = None,
    stats: Sequence[SafetensorsReader] | None = None,
    names: set[str] | None = None,
    norms: Sequence[float] | None = None,
    **params,
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """Yield (name, offset, flat fused values) for the tensors `names` (default: all; then
    every checkpoint must have the same ones), in name order, offsets increasing.

    `norms` are the models' delta norms over all their tensors, for the operators that
    need them; when not given, they are measured first (one more read of every model).
    Arguments are checked before the first slice is fused.
    """
    if not readers:
        raise ColdFusionError("nothing to fuse: no contributions")
    op = get_operator(method)
    params = op.check_params(params)
    if op.needs_base and base is None:
        raise ColdFusionError(f"fusion method '{method}' needs a base model")
    if op.needs_stats and (stats is None or len(stats) != len(readers)):
        raise ColdFusionError(
            f"fusion method '{method}' needs {op.needs_stats} statistics from every contributor "
            f"(computed on its own data); got {0 if stats is None else len(stats)} for {len(readers)} contributions")
    w = torch.ones(len(readers)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if len(w) != len(readers) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ColdFusionError(f"fusion weights must be {len(readers)} non-negative numbers with a positive sum")
    if names is None:
        _check_same_keys(readers)
        names = readers[0].keys()
    if stats:
        _check_same_keys(stats)
    if op.needs_base and set(names) - base.keys():
        raise ColdFusionError(f"base model {base.label} lacks tensors {sorted(set(names) - base.keys())[:3]}")
    for name in names:
        _check_same_shape(name, [*readers, *([base] if op.needs_base else [])])
    if op.needs_norms:
        norms = delta_norms(readers, base, names) if norms is None else list(norms)
        if len(norms) != len(readers):
            raise ColdFusionError(f"got {len(norms)} delta norms for {len(readers)} contributions")
        params = {**params, "norms": torch.tensor(norms, dtype=torch.float64)}
    return _fuse(op, readers, w, base, stats, sorted(names), params)


def delta_norms(readers: Sequence[SafetensorsReader], base: SafetensorsReader, names) -> list[float]:
    """||m_i - b|| over the float tensors `names`, for each model, one tensor in memory at a time."""
    norms = []
    for reader in readers:
        squares = 0.0
        for name in sorted(names):
            if reader.dtype(name) in FLOAT_DTYPES:
                squares += float((reader.read(name).double() - base.read(name).double()).square().sum())
        norms.append(squares ** 0.5)
    return norms


def _fuse(op: Operator, readers, w, base, stats, names: list[str], params: dict):
    stat_names = stats[0].keys() if stats else set()
    workers = budget() if op.compute_bound else 1
    hold = torch.empty(HOLD_BYTES // 4) if op.prepare else None  # whole tensors of every model, reused
    for name in names:
        failpoint("fusion.tensor")
        dtype = FLOAT_DTYPES.get(readers[0].dtype(name))
        if dtype is None:  # integer buffers (ids) must agree; never averaged
            first = readers[0].read(name)
            if any(not torch.equal(first, r.read(name)) for r in readers[1:]):
                raise ColdFusionError(f"non-float tensor '{name}' differs between contributions")
            yield name, 0, first
            continue
        if op.needs_stats == "fisher" and name not in stat_names:
            raise ColdFusionError(f"{stats[0].label} has no Fisher entry for tensor '{name}'")
        if op.needs_stats == "fisher":
            _check_same_shape(name, [readers[0], *stats])
        numel = readers[0].numel(name)
        if not op.elementwise or (op.prepare and len(readers) * numel * 4 <= HOLD_BYTES):
            # whole tensors: RegMean solves per linear layer; TIES reads each model once.
            # Threads only for more than a slice's work: handing off costs more on small ones.
            threads = workers if len(readers) * numel > SLICE else 1
            with torch_threads(1) if op.elementwise else nullcontext():
                fused = op.fuse(LazyTensors(readers, name, scratch=hold, workers=threads), w,
                                **_engine_args(op, base, stats, stat_names, name, workers=threads), **params)
            # a view of the inputs would change under the caller with the next tensor
            yield name, 0, _not_in(hold, fused).to(dtype).flatten()
            continue
        prepared, full_base = {}, None
        if op.prepare:  # the whole base it reads is kept for the slices: one read fewer, same peak memory
            full_base = base.get_tensor(name).reshape(-1) if op.needs_base else None
            prepared = {"prepared": op.prepare(LazyTensors(readers, name, scratch=hold), full_base, workers=workers,
                                               **op.prepare_params(params))}
        step = SLICE * max(1, SLICE_MODELS // len(readers))
        spans = [(start, min(start + step, numel)) for start in range(0, numel, step)]
        fuse_slice = partial(_fuse_slice, op, readers, w, base, stats, stat_names, name, full_base, dtype,
                             {**prepared, **params})
        # A slice per thread, each fused on one: a slice is too small for torch to gain from
        # splitting it (on a busy machine, the hand-offs made averaging 3-4x slower).
        with torch_threads(1):
            for span, fused in zip(spans, ordered_map(fuse_slice, spans, workers), strict=True):
                yield name, span[0], fused


def _fuse_slice(op: Operator, readers, w, base, stats, stat_names, name: str, full_base, dtype, params: dict,
                span: tuple[int, int]) -> torch.Tensor:
    """One slice of one tensor, fused (on a worker thread)."""
    args = _engine_args(op, base, stats, stat_names, name, span, full_base)
    scratch = _thread_scratch(len(readers) * (span[1] - span[0]))
    fused = op.fuse(LazyTensors(readers, name, span, scratch=scratch), w, **args, **params)
    return _not_in(scratch, fused).to(dtype)  # the thread's next slice refills the scratch before this is written


def _not_in(buffer: torch.Tensor | None, fused: torch.Tensor) -> torch.Tensor:
    """`fused`, copied when it is a view into the engine's reused `buffer`."""
    if buffer is not None and fused.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        return fused.clone()
    return fused


_local = threading.local()


def _thread_scratch(size: int) -> torch.Tensor:
    """This thread's buffer for a slice of every model, reused across slices and tensors:
    with a fresh one per slice, each thread's allocator kept tens of MB of freed buffers."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.numel() < size:
        scratch = _local.scratch = torch.empty(size)
    return scratch


def _engine_args(op: Operator, base, stats, stat_names, name: str, span: tuple[int, int] | None = None,
                 full_base: torch.Tensor | None = None, workers: int = 1) -> dict:
    """What the operator takes besides tensors and weights, read for this tensor (or slice);
    the base from `full_base` (flat) when it is already in memory."""
    args = {}
    if op.needs_base and full_base is not None:
        args["base"] = full_base if span is None else full_base[span[0]:span[1]]
    elif op.needs_base:
        args["base"] = base.get_tensor(name) if span is None else base.read(name, *span)
    if op.needs_stats:
        args["stats"] = LazyTensors(stats, name, span) if name in stat_names else None
    if "name" in op.arguments:
        args["name"] = name
    if "offset" in op.arguments:
        args["offset"] = span[0] if span else 0
    if "workers" in op.arguments:
        args["workers"] = workers
    return args


def fuse_readers(readers: Sequence[SafetensorsReader], method: str = "average", weights=None, base=None,
                 stats=None, names: set[str] | None = None, norms=None, **params) -> Tensors:
    """The fused tensors, in memory (see `fuse_stream` for the arguments)."""
    stream = fuse_stream(readers, method, weights, base, stats, names, norms, **params)
    fused = {n: torch.empty(shape, dtype=dtype) for n, (dtype, shape) in
             output_layout(readers, names if names is not None else readers[0].keys()).items()}
    for name, start, values in stream:
        fused[name].view(-1)[start:start + values.numel()] = values.view(-1)
    return fused


def fuse_files(
    paths: Sequence[Path],
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: Path | None = None,
    stats: Sequence[Path] | None = None,
    norms: Sequence[float] | None = None,
    **params,
) -> Tensors:
    """Fuse the bodies stored at `paths` (one safetensors file each) with a registered operator.

    `stats[i]` is contributor i's statistics file (Fisher or Gram matrices) for the
    operators that need one; `norms` as in `fuse_stream`.
    """
    with ExitStack() as stack:
        open_ = lambda p: stack.enter_context(SafetensorsReader([p]))  # noqa: E731
        return fuse_readers([open_(p) for p in paths], method, weights,
                            base=open_(base) if base else None,
                            stats=[open_(p) for p in stats] if stats else None, norms=norms, **params)
