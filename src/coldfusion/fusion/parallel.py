"""Fusion on every thread torch may use: independent pieces of work (slices, models,
column ranges) run on a small pool of threads, their results kept in order.

The budget is torch's thread count (`torch.get_num_threads()`, which the CLI pins). The
heavy parts (pread, the numba loops, torch kernels) release the GIL, so one thread reads
a slice while another fuses the one before. A task running on the pool must not wait on
other tasks of the pool (with every thread waiting, nothing would run): the engine hands
the pool single-threaded work only, and tells operators how many threads they may use.
"""

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def budget() -> int:
    """How many threads fusion may use: torch's setting."""
    return max(1, torch.get_num_threads())


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="coldfusion-fuse")


def ordered_map(fn: Callable, items: Iterable, workers: int, ahead: int | None = None) -> Iterator:
    """fn(item) for every item, `workers` at a time, yielded in the items' order. At most
    `ahead` (default 2 x workers) results are computed before the caller takes them, so
    memory stays bounded however many items there are. With one worker, runs inline."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool, pending, ahead = _pool(workers), deque(), ahead or 2 * workers
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def parallel_map(fn: Callable, items: Iterable, workers: int) -> list:
    """All of fn(item), `workers` at a time, as a list in the items' order."""
    return list(ordered_map(fn, items, workers))
