import threading
import time

import pytest

from coldfusion.fusion.parallel import ordered_map, parallel_map


def test_results_come_in_order_whatever_finishes_first():
    def slow_first(i):
        time.sleep(0.02 if i % 3 == 0 else 0.0)
        return i * i

    assert list(ordered_map(slow_first, range(10), workers=2)) == [i * i for i in range(10)]
    assert parallel_map(slow_first, range(5), workers=3) == [0, 1, 4, 9, 16]


def test_at_most_ahead_results_wait_for_the_caller():
    started, taken = [], 0

    def work(i):
        started.append(i)
        return i

    for i in ordered_map(work, range(20), workers=2, ahead=3):
        time.sleep(0.005)  # a slow consumer: the pool must not run away from it
        assert len(started) - taken <= 3, (i, len(started), taken)
        taken += 1
    assert taken == 20


def test_one_worker_runs_inline_and_errors_reach_the_caller():
    threads = parallel_map(lambda _: threading.get_ident(), range(3), workers=1)
    assert set(threads) == {threading.get_ident()}

    def fails_at_two(i):
        if i == 2:
            raise ValueError("slice 2 is broken")
        return i

    with pytest.raises(ValueError, match="slice 2 is broken"):
        list(ordered_map(fails_at_two, range(6), workers=2))
