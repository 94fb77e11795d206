"""safetensors files read and written a tensor, or a slice of one, at a time.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape and
byte range of every tensor, plus optional `__metadata__`), then the raw data. Reading
slices with pread and writing sequentially keeps memory independent of the file's size;
the safetensors library itself only loads or saves whole dictionaries.
"""

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.faults import failpoint
from coldfusion.io.checkpoint import FILE_MODE

# safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {k: v for k, v in DTYPES.items() if v.is_floating_point}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap


def read_header(fd: int, file_size: int) -> tuple[int, dict]:
    """(header length, header) of an open safetensors file (see `parse_header`)."""
    return parse_header(lambda n, at: os.pread(fd, n, at), file_size)


def header_of_bytes(data: bytes) -> tuple[int, dict]:
    """(header length, header) of a safetensors file held in memory (see `parse_header`)."""
    view = memoryview(data)
    return parse_header(lambda n, at: bytes(view[at:at + n]), len(data))


def parse_header(read, file_size: int) -> tuple[int, dict]:
    """(header length, header), checked as the safetensors library checks it: a bounded
    length, a JSON object, for every tensor a known dtype, a shape of non-negative ints
    and a byte range that fits it, and the ranges laid end to end over exactly the data
    (none overlaps another, no byte is left over). Anything else raises ValueError: an
    upload is hostile until checked. `read(n, offset)` gives n bytes at offset."""
    if file_size < 8:
        raise ValueError(f"{file_size} bytes: too short to hold a header")
    size = int.from_bytes(read(8, 0), "little")
    if size > MAX_HEADER_BYTES or size > file_size - 8:
        raise ValueError(f"its header claims {size} bytes; the file has {file_size - 8} after the length")
    try:
        header = json.loads(read(size, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    data_bytes = file_size - 8 - size
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError("its __metadata__ is not a mapping of strings")
            continue
        _check_entry(key, info, data_bytes)
    end = 0
    for key, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                            key=lambda item: tuple(item[1]["data_offsets"])):
        start, stop = info["data_offsets"]
        if start != end:
            raise ValueError(f"tensor '{key}' starts at byte {start} of the data, not at {end} where the one before "
                             "it ends: byte ranges must not overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the tensors cover {end} of the file's {data_bytes} data bytes; the rest is unaccounted for")
    return size, header


def _check_entry(key: str, info, data_bytes: int) -> None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor '{key}' is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"tensor '{key}' has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor '{key}' has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(f"tensor '{key}' has data_offsets {offsets!r} outside the file's {data_bytes} data bytes")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize:
        raise ValueError(f"tensor '{key}': data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}")


class SafetensorsReader:
    """The tensors of one checkpoint (one file or several shards), read on demand.

    Tensors are read with pread straight into a fresh torch buffer, not through a memory
    map: pages of a mapped file stay in the process's resident memory while it is open,
    which would make memory grow with the number of models after all.
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
                size, header = read_header(fd, os.fstat(fd).st_size)
                for key, info in header.items():
                    if key != "__metadata__" and key.startswith(prefix):
                        self._where[key[len(prefix):]] = (fd, 8 + size, info)
        except (OSError, ValueError) as exc:
            self.close()
            raise ColdFusionError(f"{self.label if len(files) == 1 else path}: not a readable safetensors file "
                                  f"({exc})") from None

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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def layout(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(torch dtype, shape) of a tensor, from the header alone."""
        return DTYPES[self.dtype(name)], self.shape(name)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.read(name).reshape(self.shape(name))

    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a new 1-D tensor, or into `out`
        (contiguous, 1-D, of the tensor's dtype and the slice's length)."""
        fd, data_start, info = self._where[name]
        dtype = DTYPES[info["dtype"]]
        stop = self.numel(name) if stop is None else stop
        size = dtype.itemsize
        if out is None:
            out = torch.empty(stop - start, dtype=dtype)
        elif out.dtype != dtype or out.shape != (stop - start,) or not out.is_contiguous():
            raise ValueError(f"read into a contiguous {dtype} buffer of {stop - start} entries, "
                             f"not {out.dtype} {list(out.shape)}")
        target = out.view(torch.uint8)
        if target.numel():
            first = info["data_offsets"][0]
            got = os.preadv(fd, [target.numpy()], data_start + first + start * size)
            if got != target.numel() or first + stop * size > info["data_offsets"][1]:
                raise ColdFusionError(f"{self.label}: tensor '{name}' is truncated; the file is corrupt")
        return out


class SafetensorsWriter:
    """Write a safetensors file whose layout is known up front, slice by slice, in order.

    The file appears atomically at `path` on `commit()` (temporary sibling, fsync,
    rename); `sha256` is its checksum, computed while writing.
    """

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header, offset, self._order = {}, 0, []
        if metadata:
            header["__metadata__"] = metadata
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, math.prod(shape), dtype))
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._put(len(head).to_bytes(8, "little") + head)
        self._at, self._done = 0, 0  # the tensor being written, elements of it written

    def _put(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Elements [start, start + len) of tensor `name`; slices must come in file order."""
        while self._at < len(self._order) and self._done == self._order[self._at][1] and \
                self._order[self._at][0] != name:
            self._at, self._done = self._at + 1, 0
        expected, numel, dtype = self._order[self._at] if self._at < len(self._order) else (None, 0, None)
        if name != expected or start != self._done or start + values.numel() > numel:
            raise ColdFusionError(f"internal error: wrote {name}[{start}:] where {expected}[{self._done}:] was due")
        self._put(values.detach().to(dtype).contiguous().view(-1).view(torch.uint8).numpy())
        self._done += values.numel()

    def commit(self) -> str:
        """Check every byte was written, make the file visible at `path`; return its sha256."""
        current, numel, _ = self._order[self._at] if self._at < len(self._order) else (None, 0, None)
        missing = ([current] if self._done < numel else []) + [n for n, k, _ in self._order[self._at + 1:] if k]
        if missing:
            self.abort()
            raise ColdFusionError(f"internal error: tensors {missing[:3]} were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, FILE_MODE)
        failpoint("checkpoint.unrenamed")
        os.replace(self._tmp, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()
        return False

