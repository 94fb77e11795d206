"""TIES's two hot loops, compiled with numba: each model's magnitude cut, and the merge.

Written as torch and numpy operations, TIES made about a dozen passes over the data and
took 5-8x as long as reading its inputs. Here the cut of a task vector is found in one
pass (a random sample brackets the k-th largest magnitude; the pass counts the entries
above the bracket and collects the few inside it), and the trim, sign election and
disjoint mean are one vectorised pass per model over a slice. Both give exactly what
their definitions in METHODS.md give (tests/test_operators.py checks them against torch
spellings). Compiled once per machine and cached next to this file (`cache=True`);
ties.py imports this module only when TIES runs.
"""

import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

SAMPLE = 1 << 14  # magnitudes sampled to bracket the cut; smaller tensors are cut exactly
PARALLEL_MIN = 1 << 20  # from this many entries, the bracketing pass runs on two threads


@dataclass(frozen=True)
class MagnitudeCut:
    """The entries TIES keeps of one flattened task vector: the k = max(1, floor(density *
    size)) largest magnitudes (mergekit's k). Exactly k: among entries whose magnitude
    equals the k-th largest (`value`), those at flat positions <= `last_tie` are kept.
    (mergekit breaks such ties by an unstable sort, i.e. arbitrarily.)
    """

    value: float
    last_tie: int


@njit(cache=True, nogil=True)
def _bracket(x, base, low, high, values, positions):  # pragma: no cover (compiled)
    """Count |x - base| > high; collect the magnitudes in [low, high] and their positions,
    in order, into the buffers (all but their last slot, which takes the overflow).
    Returns (count above, count inside), the latter possibly beyond the buffers' size."""
    above, inside, last = 0, 0, values.size - 1
    for j in range(x.size):
        a = abs(x[j] - base[j])
        above += a > high
        # branch-free: write every entry to the next free slot, advance only past a keeper
        slot = min(inside, last)
        values[slot] = a
        positions[slot] = j
        inside += (a >= low) & (a <= high)
    return above, inside


@njit(cache=True, nogil=True)
def _merge(models, base, tie_kept_below, drop_ties_from, last_tie, weights, normalize, scale, out):  # pragma: no cover
    n, length = models.shape
    zero = np.float32(0.0)
    plus, plus_mass = np.zeros(length, np.float32), np.zeros(length, np.float32)
    minus, minus_mass = np.zeros(length, np.float32), np.zeros(length, np.float32)
    for i in range(n):
        w, row, lo, hi, last = weights[i], models[i], tie_kept_below[i], drop_ties_from[i], last_tie[i]
        for j in range(length):
            d = row[j] - base[j]
            kept = abs(d) > (lo if j <= last else hi)  # the trim: beyond this model's magnitude cut
            up, down = kept & (d > zero), kept & (d < zero)
            plus[j] += w * d if up else zero
            plus_mass[j] += w if up else zero
            minus[j] += w * d if down else zero
            minus_mass[j] += w if down else zero
    for j in range(length):
        elected_plus = plus[j] + minus[j] >= zero  # the sign with more mass; a tie goes to +, as in mergekit
        total = plus[j] if elected_plus else minus[j]
        mass = plus_mass[j] if elected_plus else minus_mass[j]
        merged = (total / mass if mass > zero else zero) if normalize else total
        out[j] = base[j] + scale * merged


def magnitude_cut(delta: torch.Tensor, density: float) -> MagnitudeCut:
    """Where to cut one task vector (any shape; positions are those of its flattening)."""
    d = delta.detach().float().flatten().contiguous().numpy()
    return model_cut(d, np.zeros_like(d), density)


def model_cut(x: np.ndarray, base: np.ndarray, density: float) -> MagnitudeCut:
    """The cut of the task vector x - base (flat float32 arrays)."""
    n = x.size
    if density >= 1.0:
        return MagnitudeCut(-math.inf, n)
    if density <= 0 or n == 0:
        return MagnitudeCut(math.inf, -1)
    k = max(1, int(density * n))
    magnitudes = lambda: np.abs(x - base)  # noqa: E731
    if n <= 4 * SAMPLE:
        return _exact_cut(magnitudes(), k, magnitudes)
    # The k-th largest magnitude is the (1 - k/n) quantile: bracket it by a sample's
    # quantiles five standard errors either side, so the pass collects a few percent of entries.
    # An evenly strided sample (a random one costs more to draw than the pass it saves); an
    # odd stride walks across the columns of a matrix. A biased sample only costs a fallback.
    step = (n // SAMPLE) | 1
    sample = np.sort(np.abs(x[::step][:SAMPLE] - base[::step][:SAMPLE]))
    m = sample.size
    rank, spread = (1 - k / n) * (m - 1), 5 * math.sqrt(m * k / n * (1 - k / n)) + 8
    low, high = sample[max(0, int(rank - spread))], sample[min(m - 1, int(math.ceil(rank + spread)))]
    capacity = int(n * (2 * spread + 2) / m * 2) + 1024
    found = _bracket_in_parts(x, base, low, high, capacity)
    need = k - found[0]  # how many of the bracketed entries are among the k largest
    if found[1] is None or not 1 <= need <= found[1].size:  # the sample missed (rare): select over everything
        return _exact_cut(magnitudes(), k, magnitudes)
    _, values, positions = found
    inside = values.size
    value = np.partition(values.copy(), inside - need)[inside - need]
    ties = positions[values == value]
    ties_needed = need - int(np.count_nonzero(values > value))
    if value == 0.0 or ties_needed == ties.size:
        return MagnitudeCut(float(value), n)
    return MagnitudeCut(float(value), int(ties[ties_needed - 1]))


def _bracket_in_parts(x: np.ndarray, base: np.ndarray, low, high, capacity: int):
    """`_bracket` over the whole of x, in two halves on two threads when torch may use two
    (numba releases the GIL): (count above, values inside, their positions), or
    (count above, None, None) when more than `capacity` are inside."""
    parts = 2 if torch.get_num_threads() > 1 and x.size >= PARALLEL_MIN else 1
    bounds = [(x.size * p // parts, x.size * (p + 1) // parts) for p in range(parts)]

    def part(bound):
        start, stop = bound
        values, positions = np.empty(capacity + 1, np.float32), np.empty(capacity + 1, np.int64)
        above, inside = _bracket(x[start:stop], base[start:stop], low, high, values, positions)
        return above, values[:inside], positions[:inside] + start, inside <= capacity

    found = list(_threads().map(part, bounds)) if parts > 1 else [part(bounds[0])]
    above = sum(f[0] for f in found)
    if not all(f[3] for f in found) or sum(f[1].size for f in found) > capacity:
        return above, None, None
    return above, np.concatenate([f[1] for f in found]), np.concatenate([f[2] for f in found])


@functools.cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="ties")


def _exact_cut(magnitude: np.ndarray, k: int, magnitudes_again: Callable[[], np.ndarray]) -> MagnitudeCut:
    """The cut by a full selection over a flat float32 array of magnitudes, which it
    scrambles. When ties straddle the cut, their positions come from `magnitudes_again()`."""
    n = magnitude.size
    magnitude.partition(n - k)  # numpy's introselect: linear time, in place
    value = float(magnitude[n - k])
    if value == 0.0 or n == k or magnitude[: n - k].max() < value:  # every entry at the cut is kept
        return MagnitudeCut(value, n)
    ties_needed = k - int(np.count_nonzero(magnitude[n - k + 1:] > value))
    ties = np.flatnonzero(magnitudes_again() == value)
    return MagnitudeCut(value, int(ties[ties_needed - 1]))


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float) -> list[MagnitudeCut]:
    """The cut of every model's whole task vector, one model at a time: memory holds one
    model's tensor (read into one reused buffer when `tensors` can, as the engine's can)."""
    b = base.float().flatten().contiguous().numpy()
    read_into = getattr(tensors, "read_into", None)
    buffer = torch.empty(b.size) if read_into else None
    flat = (lambda i: read_into(i, buffer)) if read_into else (lambda i: tensors[i].flatten().float().contiguous())
    return [model_cut(flat(i).numpy(), b, density) for i in range(len(tensors))]


def ties_merge(models: torch.Tensor, base: torch.Tensor, cuts: Sequence[MagnitudeCut], weights: torch.Tensor,
               offset: int = 0, normalize: bool = True, scale: float = 1.0) -> torch.Tensor:
    """base + scale * TIES-merge of the task vectors `models[i] - base` (float32 (n, length)
    and (length,), flat slices starting at flat position `offset`), each trimmed by its cut."""
    n, length = models.shape
    value = np.array([c.value for c in cuts], dtype=np.float32)
    # entries at positions <= last_tie keep magnitudes >= value (ties kept), later ones only > value
    kept_below = np.nextafter(value, np.float32(-math.inf))
    last = np.array([min(max(c.last_tie - offset, -1), length) for c in cuts], dtype=np.int64)
    out = np.empty(length, dtype=np.float32)
    _merge(np.ascontiguousarray(models.numpy()), np.ascontiguousarray(base.float().numpy()), kept_below, value, last,
           weights.float().numpy(), normalize, np.float32(scale), out)
    return torch.from_numpy(out)
