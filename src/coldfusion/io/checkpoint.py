"""Named tensors on disk: safetensors only, content-hashed, written atomically."""

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from coldfusion.infra.errors import ColdFusionError
from coldfusion.infra.faults import failpoint

Tensors = dict[str, torch.Tensor]
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file; mkstemp makes 0600


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(memoryview(data)[:half])
            f.flush()
            failpoint("checkpoint.partial")
            f.write(memoryview(data)[half:])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        failpoint("checkpoint.unrenamed")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def serialize(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic safetensors bytes (same tensors -> same bytes -> same hash)."""
    return save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> str:
    """Atomically write a safetensors file; return its sha256."""
    data = serialize(tensors, metadata)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(path: Path, expected_sha256: str | None = None) -> Tensors:
    """Read a safetensors file, verifying its checksum when one is given. Pickles are refused."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ColdFusionError(f"{path}: only .safetensors checkpoints are accepted (pickles can run code)")
    data = path.read_bytes()
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise ColdFusionError(f"{path}: checksum mismatch (expected {expected_sha256[:12]}...); the file is corrupt")
    try:
        return load_bytes(data)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise ColdFusionError(f"{path}: not a readable safetensors file ({exc})") from None



@contextmanager
def staged_directory(out: Path):
    """A temporary sibling directory that replaces `out` only once the block succeeds:
    never a half-written output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
