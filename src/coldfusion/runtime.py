"""Reproducibility: fixed thread count and seeds derived from names."""

import random
import zlib
from contextlib import contextmanager

import numpy as np
import torch


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
