"""The fast path's worker threads (galpipe.nn.fast.threads): chunking, results in order,
errors raised in the caller after every chunk has finished, nested calls inline, and
concurrent callers kept apart."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from galpipe.nn.fast import threads
from galpipe.nn.fast.threads import batch_pieces, chunk_bounds, parallel_chunks, set_num_workers


@pytest.fixture()
def two_workers():
    set_num_workers(2)
    yield
    set_num_workers(None)


def test_chunk_bounds_and_batch_pieces_cover_the_range() -> None:
    assert chunk_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert chunk_bounds(2, 5) == [(0, 1), (1, 2)]
    pieces = batch_pieces(64, 3)
    assert len(pieces) % 2 == 0 and pieces[0][0] == 0 and pieces[-1][1] == 64
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


def test_chunks_run_on_two_threads_and_return_in_order(two_workers: None) -> None:
    seen: dict[int, int] = {}

    def fn(k: int, lo: int, hi: int) -> tuple[int, int]:
        seen[k] = threading.get_ident()
        time.sleep(0.01)
        return lo, hi

    assert parallel_chunks(fn, 10, with_index=True) == [(0, 5), (5, 10)]
    assert seen[0] == threading.get_ident() and seen[1] != seen[0]


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_in_any_chunk_is_raised_after_all_chunks_finish(two_workers: None,
                                                                 failing: int) -> None:
    finished: list[int] = []

    def fn(k: int, lo: int, hi: int) -> None:
        if k == failing:
            raise ValueError(f"chunk {k} failed")
        time.sleep(0.05)
        finished.append(k)

    with pytest.raises(ValueError, match=f"chunk {failing} failed"):
        parallel_chunks(fn, 8, with_index=True)
    assert finished == [1 - failing]  # the other chunk ran to its end before the raise
    # the pool still works afterwards
    assert parallel_chunks(lambda lo, hi: hi - lo, 8) == [4, 4]


def test_nested_calls_run_inline_inside_a_worker(two_workers: None) -> None:
    def inner(lo: int, hi: int) -> list[tuple[int, int]]:
        return parallel_chunks(lambda a, b: (a, b), 6)

    assert parallel_chunks(inner, 4) == [[(0, 6)], [(0, 6)]]


def test_concurrent_callers_get_their_own_results(two_workers: None) -> None:
    out: dict[int, list[int]] = {}

    def caller(tag: int) -> None:
        for _ in range(50):
            got = parallel_chunks(lambda lo, hi: tag * 1000 + lo, 10)
            assert got == [tag * 1000, tag * 1000 + 5], got
        out[tag] = got

    ts = [threading.Thread(target=caller, args=(t,)) for t in (1, 2, 3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    assert sorted(out) == [1, 2, 3]
    assert len(threads._EXECUTOR or []) >= 1
