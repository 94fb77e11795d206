"""Where and how torch runs: device, precision and threads; seeds derived from names."""

import os
import random
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from coldfusion.infra.errors import ColdFusionError

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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in PRECISIONS.items()}


def cpu_bf16_units() -> list[str]:
    """This CPU's native bf16 matrix units (empty: bf16 would be emulated, slower than fp32)."""
    caps = torch.cpu.get_capabilities()
    return [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                                   ("sve_bf16", "SVE-BF16")) if caps.get(key)]


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(cpu_bf16_units())


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where `device` multiplies it natively, else fp32. A precision the device
    cannot run well is an error that says what was found."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    if name == "bf16" and not bf16_is_fast(device):
        found = (f"this GPU ({torch.cuda.get_device_name(device)}) has no native bf16" if device.type == "cuda"
                 else "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"
                 if device.type == "cpu" else f"bf16 is not supported on {device.type} here")
        raise ValueError(f"precision 'bf16': {found}; use precision: fp32")
    if name == "fp16" and device.type == "cpu":
        better = "bf16 (native on this CPU) or fp32" if bf16_is_fast(device) else "fp32"
        raise ValueError(f"precision 'fp16' needs a CUDA or MPS device, not the CPU; use {better}")
    return PRECISIONS[name]


def precision_name(dtype: torch.dtype) -> str:
    return NAMES[dtype]


@dataclass(frozen=True)
class Compute:
    """Resolved hardware settings: the device a model runs on, the dtype it computes in, torch's threads."""

    device: torch.device
    dtype: torch.dtype
    threads: int


def resolve_compute(device: str = "auto", precision: str = "auto", threads: int | str = "auto") -> Compute:
    """Configs' `device`, `precision` and `threads` resolved on this machine; an unavailable
    choice is a ValueError that says what was found."""
    resolved = resolve_device(device)
    return Compute(resolved, resolve_precision(precision, resolved), resolve_threads(threads))


def resolve_threads(threads: int | str | None = "auto") -> int:
    """`auto` (or unset): the cores this process may use."""
    return available_cores() if threads in (None, "auto") else int(threads)


def use_compute(settings) -> Compute:
    """Resolve a config's `device`, `precision` and `threads` (a ComputeSettings) and pin the
    threads; what this machine cannot do is a clear error."""
    try:
        compute = resolve_compute(settings.device, settings.precision, settings.threads)
    except ValueError as exc:
        raise ColdFusionError(str(exc)) from None
    set_threads(compute.threads)
    return compute


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
