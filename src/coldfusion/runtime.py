"""Where and how torch runs: devices, a fixed thread count, seeds derived from names."""

import os
import random
import zlib
from contextlib import contextmanager

import numpy as np
import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else Apple's MPS, else the CPU. A device that is named but
    absent is an error (a silent fall-back to the CPU would hide a misconfigured node)."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use {DEVICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {name!r}: torch sees no CUDA GPU here (use cpu or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: there are only {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here (use cpu or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use {DEVICES}")
    return device


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads; the machine is shared, so never use 'all cores'."""
    torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int):
    """Run a block with `threads` intra-op threads, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any printable parts (same parts, same seed, any process)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
