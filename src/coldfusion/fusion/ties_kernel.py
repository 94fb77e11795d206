"""TIES's two hot loops, compiled with numba (the `fast` extra): each model's magnitude cut,
and the merge. ties.py holds the same two steps in plain torch, used without numba.

Written as torch and numpy operations, TIES made about a dozen passes over the data and
took 5-8x as long as reading its inputs. Here the cut of a task vector takes one
vectorised pass (a sample brackets the k-th largest magnitude; the pass counts the
entries above the bracket and flags the few inside it, which are then collected), and
the trim, sign election and disjoint mean are one vectorised pass per model over a
slice. Both give exactly what their definitions in docs/METHODS.md give
(tests/test_operators.py checks them against torch spellings). With `workers` threads,
models are cut and column ranges merged that many at a time (numba releases the GIL).
Compiled once per machine and cached next to this file (`cache=True`); ties.py imports
this module only when TIES runs and numba is installed.
"""

import math
import queue
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numba import njit

from coldfusion.fusion.parallel import parallel_map
from coldfusion.fusion.ties import MagnitudeCut

SAMPLE, SAMPLE_MAX = 1 << 14, 1 << 18  # magnitudes sampled to bracket a cut: n/16 within these bounds
RUN = 16  # the sample takes runs of this many adjacent entries: one cache line each
PARALLEL_MIN = 1 << 20  # from this many entries, a cut's bracketing scan may be split over threads
BLOCK = 1 << 16  # entries the bracketing pass flags before collecting them (still in cache)


@njit(inline="always")
def _mark(x, base, low, high, mask):  # pragma: no cover (compiled)
    """Flag the entries with |x - base| in [low, high] (a byte each); count those above
    high and those flagged. Branch-free, so it compiles to vector instructions."""
    above, inside = 0, 0
    for j in range(x.size):
        a = abs(x[j] - base[j])
        hit = (a >= low) & (a <= high)
        above += a > high
        inside += hit
        mask[j] = hit
    return above, inside


@njit(inline="always")
def _collect(x, base, mask, values, positions, found, offset):  # pragma: no cover (compiled)
    """Append the flagged magnitudes and their positions (+ offset) from index `found`, in
    order. Flags are few, so it skips eight unflagged entries at a time (one 64-bit word)."""
    whole = mask.size // 8 * 8
    words = mask[:whole].view(np.uint64)
    for w in range(words.size):
        if words[w] != 0:
            for j in range(8 * w, 8 * w + 8):
                if mask[j]:
                    values[found], positions[found] = abs(x[j] - base[j]), offset + j
                    found += 1
    for j in range(whole, mask.size):
        if mask[j]:
            values[found], positions[found] = abs(x[j] - base[j]), offset + j
            found += 1
    return found


# The loops, which run on worker threads, are compiled for their one signature at import
# (loaded from the cache after the first time): workers never wait on the compiler, and a
# wrong dtype or layout fails loudly instead of compiling a slow variant.
@njit("UniTuple(int64, 2)(float32[::1], float32[::1], float32, float32, int64, float32[::1], int64[::1])", cache=True,
      nogil=True)
def _scan(x, base, low, high, block, values, positions):  # pragma: no cover (compiled)
    """(how many |x - base| are above high, how many are in [low, high]), the latter
    written to `values` and `positions` in order, or -1 when more than fit. Block by block:
    the flags take one small buffer, and a block is still in cache when it is collected."""
    n, cap = x.size, values.size
    mask = np.empty(min(block, n), np.bool_)
    above, found = 0, 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        flags = mask[:stop - start]
        block_above, inside = _mark(x[start:stop], base[start:stop], low, high, flags)
        above += block_above
        if found + inside > cap:
            return above, -1
        found = _collect(x[start:stop], base[start:stop], flags, values, positions, found, start)
    return above, found


@njit(inline="always")
def _kept(d, j, lo, hi, last, w):  # pragma: no cover (compiled)
    """Model i's part of the four sums at entry j: (w d, w) to the + side or the - side
    when it survives the trim (beyond its magnitude cut), else zeros."""
    zero = np.float32(0.0)
    kept = abs(d) > (lo if j <= last else hi)
    up, down = kept & (d > zero), kept & (d < zero)
    return w * d if up else zero, w if up else zero, w * d if down else zero, w if down else zero


@njit(inline="always")
def _elect(plus, plus_mass, minus, minus_mass, b, normalize, scale):  # pragma: no cover (compiled)
    """base + scale x the disjoint mean (or sum) of the side with more mass; a tie goes to +, as in mergekit."""
    zero = np.float32(0.0)
    elected_plus = plus + minus >= zero
    total = plus if elected_plus else minus
    mass = plus_mass if elected_plus else minus_mass
    merged = (total / mass if mass > zero else zero) if normalize else total
    return b + scale * merged


@njit("void(float32[:, ::1], float32[::1], float32[::1], float32[::1], int64[::1], float32[::1], boolean, float32, "
      "int64, int64, int64, float32[::1])", cache=True, nogil=True)
def _merge(models, base, tie_kept_below, drop_ties_from, last_tie, weights, normalize, scale, block, first, end,
           out):  # pragma: no cover (compiled)
    """Trim, sign election and disjoint mean of columns [first, end), `block` columns at a
    time (the four running sums of a block stay in cache however long the rows are). The
    first model's pass starts the sums and the last one's finishes them straight into
    `out`: with few models, most of the traffic would otherwise be the sums'."""
    n = models.shape[0]
    size = max(0, min(block, end - first))
    plus, plus_mass = np.zeros(size, np.float32), np.zeros(size, np.float32)
    minus, minus_mass = np.zeros(size, np.float32), np.zeros(size, np.float32)
    last_row = n - 1
    for start in range(first, end, block):
        stop = min(start + block, end)
        for i in range(n - 1):
            w, row, lo, hi, last = weights[i], models[i], tie_kept_below[i], drop_ties_from[i], last_tie[i]
            if i == 0:
                for j in range(start, stop):
                    k = j - start
                    plus[k], plus_mass[k], minus[k], minus_mass[k] = _kept(row[j] - base[j], j, lo, hi, last, w)
            else:
                for j in range(start, stop):
                    k = j - start
                    a, b, c, e = _kept(row[j] - base[j], j, lo, hi, last, w)
                    plus[k] += a
                    plus_mass[k] += b
                    minus[k] += c
                    minus_mass[k] += e
        w, row = weights[last_row], models[last_row]
        lo, hi, last = tie_kept_below[last_row], drop_ties_from[last_row], last_tie[last_row]
        if n == 1:
            for j in range(start, stop):
                a, b, c, e = _kept(row[j] - base[j], j, lo, hi, last, w)
                out[j] = _elect(a, b, c, e, base[j], normalize, scale)
        else:
            for j in range(start, stop):
                k = j - start
                a, b, c, e = _kept(row[j] - base[j], j, lo, hi, last, w)
                out[j] = _elect(plus[k] + a, plus_mass[k] + b, minus[k] + c, minus_mass[k] + e, base[j], normalize,
                                scale)


def magnitude_cut(delta: torch.Tensor, density: float) -> MagnitudeCut:
    """Where to cut one task vector (any shape; positions are those of its flattening)."""
    d = delta.detach().float().flatten().contiguous().numpy()
    return model_cut(d, np.zeros_like(d), density)


def model_cut(x: np.ndarray, base: np.ndarray, density: float, parts: int = 1) -> MagnitudeCut:
    """The cut of the task vector x - base (flat float32 arrays); a large one is scanned
    in `parts` pieces on as many threads."""
    n = x.size
    if density >= 1.0:
        return MagnitudeCut(-math.inf, n)
    if density <= 0 or n == 0:
        return MagnitudeCut(math.inf, -1)
    k = max(1, int(density * n))
    magnitudes = lambda: np.abs(x - base)  # noqa: E731
    if n <= 4 * SAMPLE:  # small: select exactly
        return _exact_cut(magnitudes(), k, magnitudes)
    # The k-th largest magnitude is the (1 - k/n) quantile: bracket it by a sample's
    # quantiles four standard errors either side, so the pass collects 1-3% of the entries
    # (collecting costs more than flagging) and a miss, i.e. a fallback, has odds ~1e-4.
    # Evenly spaced runs of adjacent entries: a random sample costs more to draw than the
    # pass it saves, and single entries at a stride would touch every cache line. An odd
    # stride walks across the columns of a matrix. A biased sample only costs a fallback.
    sample = np.sort(np.abs(sample_view(x) - sample_view(base)), axis=None)  # vectorised; beats two selections
    m = sample.size
    rank, spread = (1 - k / n) * (m - 1), 4 * math.sqrt(m * k / n * (1 - k / n)) + 8
    lowest, highest = max(0, int(rank - spread)), min(m - 1, int(math.ceil(rank + spread)))
    above, values, positions = _bracket(x, base, sample[lowest], sample[highest], parts, (highest - lowest + 1) / m)
    need = k - above  # how many of the bracketed entries are among the k largest
    if values is None or not 1 <= need <= values.size:  # the sample missed (rare): select over everything
        return _exact_cut(magnitudes(), k, magnitudes)
    inside = values.size
    value = np.partition(values.copy(), inside - need)[inside - need]
    ties = positions[values == value]
    ties_needed = need - int(np.count_nonzero(values > value))
    if value == 0.0 or ties_needed == ties.size:
        return MagnitudeCut(float(value), n)
    return MagnitudeCut(float(value), int(ties[ties_needed - 1]))


def sample_view(a: np.ndarray) -> np.ndarray:
    """The entries of a flat array (of over 4 x SAMPLE entries) that bracket its cut: n/16
    within bounds, as evenly spaced runs of RUN adjacent entries (a view, no copy)."""
    runs = min(max(a.size // 16, SAMPLE), SAMPLE_MAX) // RUN
    stride = (a.size // runs - 1) | 1
    return a[:runs * stride].reshape(runs, stride)[:, :RUN]


def _bracket(x: np.ndarray, base: np.ndarray, low, high, parts: int, expected: float) -> tuple[
        int, np.ndarray | None, np.ndarray | None]:
    """(how many |x - base| are above high, those in [low, high], their positions), in
    `parts` pieces on as many threads when x is large. The latter two are None when more
    than twice the `expected` share of entries (plus a margin), or over an eighth, are
    inside (huge tie groups, or a sample far off): then a full selection is cheaper."""
    parts = parts if x.size >= PARALLEL_MIN else 1
    bounds = [(x.size * p // parts, x.size * (p + 1) // parts) for p in range(parts)]

    def part(bound):
        start, stop = bound
        cap = min(int(2 * expected * (stop - start)) + 4096, (stop - start) // 8)
        values, positions = np.empty(cap, np.float32), np.empty(cap, np.int64)
        above, found = _scan(x[start:stop], base[start:stop], low, high, BLOCK, values, positions)
        if found < 0:
            return above, None, None
        return above, values[:found], positions[:found] + start

    found = parallel_map(part, bounds, parts)
    above = sum(f[0] for f in found)
    if any(f[1] is None for f in found):
        return above, None, None
    if len(found) == 1:
        return found[0]
    return above, np.concatenate([f[1] for f in found]), np.concatenate([f[2] for f in found])


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


def magnitude_cuts(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float,
                   workers: int = 1) -> list[MagnitudeCut]:
    """The cut of every model's whole task vector. Memory holds one model's tensor, read
    into the engine's idle `scratch` when `tensors` can (as the engine's can), and the
    `workers` threads share its bracketing pass; when the scratch has room for several,
    that many models are cut at once, a thread each."""
    b = base.float().flatten().contiguous().numpy()
    read_into = getattr(tensors, "read_into", None)
    if read_into is None:
        return [model_cut(tensors[i].flatten().float().contiguous().numpy(), b, density, workers)
                for i in range(len(tensors))]
    scratch = getattr(tensors, "scratch", None)
    room = scratch.numel() // max(b.size, 1) if scratch is not None else 0
    at_once = max(1, min(workers, room, len(tensors)))
    buffers = queue.SimpleQueue()
    for k in range(at_once):
        buffers.put(scratch[k * b.size:(k + 1) * b.size] if k < room else torch.empty(b.size))

    def cut(i: int) -> MagnitudeCut:
        buffer = buffers.get()
        try:
            return model_cut(read_into(i, buffer).numpy(), b, density, parts=1 if at_once > 1 else workers)
        finally:
            buffers.put(buffer)

    return parallel_map(cut, range(len(tensors)), at_once)


def ties_merge(models: torch.Tensor, base: torch.Tensor, cuts: Sequence[MagnitudeCut], weights: torch.Tensor,
               offset: int = 0, normalize: bool = True, scale: float = 1.0, block: int = 1 << 16,
               workers: int = 1) -> torch.Tensor:
    """base + scale * TIES-merge of the task vectors `models[i] - base` (float32 (n, length)
    and (length,), flat slices starting at flat position `offset`), each trimmed by its cut;
    column ranges of whole blocks on `workers` threads."""
    n, length = models.shape
    value = np.array([c.value for c in cuts], dtype=np.float32)
    # entries at positions <= last_tie keep magnitudes >= value (ties kept), later ones only > value
    kept_below = np.nextafter(value, np.float32(-math.inf))
    last = np.array([min(max(c.last_tie - offset, -1), length) for c in cuts], dtype=np.int64)
    out = np.empty(length, dtype=np.float32)
    rows, flat_base = np.ascontiguousarray(models.numpy()), np.ascontiguousarray(base.float().numpy())
    w = np.ascontiguousarray(weights.float().numpy())
    blocks = -(-length // block)
    bounds = [min(length, blocks * p // workers * block) for p in range(workers + 1)]
    parallel_map(lambda p: _merge(rows, flat_base, kept_below, value, last, w, normalize, np.float32(scale), block,
                                  bounds[p], bounds[p + 1], out), range(workers), workers)
    return torch.from_numpy(out)
