"""Fuse checkpoints name by name, so memory does not grow with the number of models.

Checkpoints are safetensors (one file or shards); each contributed tensor is read from
disk only when the operator indexes it, and only the fused output is kept.
"""

import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from coldfusion.checkpoint import Tensors
from coldfusion.errors import ColdFusionError
from coldfusion.fusion.registry import get_operator

# safetensors dtype names of the floating-point tensors that operators fuse
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class SafetensorsReader:
    """The tensors of one checkpoint (one file or several shards), read one at a time.

    Tensors are read with pread from the file (the format is an 8-byte header length,
    a JSON header of dtype / shape / byte range per tensor, then the data), not through
    a memory map: pages of a mapped file stay in the process's resident memory while it
    is open, which would make memory grow with the number of models after all.
    With a `prefix`, only keys under it are seen, with the prefix removed: a
    classification checkpoint's "bert.encoder..." reads as the body's "encoder...".
    """

    def __init__(self, files: Sequence[Path], prefix: str = "", label: str | None = None):
        self.label, self.prefix = label or str(files[0]), prefix
        self._fds, self._where = [], {}
        try:
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                self._fds.append(fd)
                size = int.from_bytes(os.pread(fd, 8, 0), "little")
                header = json.loads(os.pread(fd, size, 8))
                for key, info in header.items():
                    if key != "__metadata__" and key.startswith(prefix):
                        self._where[key[len(prefix):]] = (fd, 8 + size, info)
        except (OSError, ValueError) as exc:
            self.close()
            raise ColdFusionError(f"{path}: not a readable safetensors file ({exc})") from exc

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def keys(self) -> set[str]:
        return set(self._where)

    def dtype(self, name: str) -> str:
        return self._where[name][2]["dtype"]

    def get_tensor(self, name: str) -> torch.Tensor:
        fd, data_start, info = self._where[name]
        start, end = info["data_offsets"]
        data = bytearray(os.pread(fd, end - start, data_start + start))
        if len(data) != end - start:
            raise ColdFusionError(f"{self.label}: tensor '{name}' is truncated; the file is corrupt")
        if not data:
            return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        return torch.frombuffer(data, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])


class LazyTensors(Sequence):
    """The same-named tensor of every checkpoint, read from disk on access."""

    def __init__(self, readers, name: str):
        self.readers, self.name = readers, name

    def __len__(self) -> int:
        return len(self.readers)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.readers[i].get_tensor(self.name)


def _check_same_keys(readers: Sequence[SafetensorsReader]) -> None:
    reference = readers[0].keys()
    for reader in readers[1:]:
        keys = reader.keys()
        if keys != reference:
            missing, extra = sorted(reference - keys), sorted(keys - reference)
            raise ColdFusionError(f"{reader.label} does not have the same tensors as {readers[0].label}: "
                                  f"missing {missing[:3]}, extra {extra[:3]}")


def fuse_readers(
    readers: Sequence[SafetensorsReader],
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: SafetensorsReader | None = None,
    stats: Sequence[SafetensorsReader] | None = None,
    names: set[str] | None = None,
    **params,
) -> Tensors:
    """Fuse the tensors `names` (default: all; then every checkpoint must have the same ones)."""
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
    stat_names = stats[0].keys() if stats else set()
    fused = {}
    for name in sorted(names):
        tensors = LazyTensors(readers, name)
        dtype = FLOAT_DTYPES.get(readers[0].dtype(name))
        if dtype is None:  # integer buffers (ids) must agree; never averaged
            first = tensors[0]
            if any(not torch.equal(first, tensors[i]) for i in range(1, len(tensors))):
                raise ColdFusionError(f"non-float tensor '{name}' differs between contributions")
            fused[name] = first
            continue
        extra = {"base": base.get_tensor(name)} if op.needs_base else {}
        if op.needs_stats:
            if op.needs_stats == "fisher" and name not in stat_names:
                raise ColdFusionError(f"{stats[0].label} has no Fisher entry for tensor '{name}'")
            extra["stats"] = LazyTensors(stats, name) if name in stat_names else None
        if op.wants_name:
            extra["name"] = name
        fused[name] = op.fuse(tensors, w, **extra, **params).to(dtype)
    return fused


def fuse_files(
    paths: Sequence[Path],
    method: str = "average",
    weights: Sequence[float] | None = None,
    base: Path | None = None,
    stats: Sequence[Path] | None = None,
    **params,
) -> Tensors:
    """Fuse the bodies stored at `paths` (one safetensors file each) with a registered operator.

    `stats[i]` is contributor i's statistics file (Fisher or Gram matrices) for the
    operators that need one.
    """
    with ExitStack() as stack:
        open_ = lambda p: stack.enter_context(SafetensorsReader([p]))  # noqa: E731
        return fuse_readers([open_(p) for p in paths], method, weights,
                            base=open_(base) if base else None,
                            stats=[open_(p) for p in stats] if stats else None, **params)
