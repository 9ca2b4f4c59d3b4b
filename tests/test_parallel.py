"""The executor seam: batching, the bounded map over any Executor, process pools."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest

from avfuse.parallel import (
    InlineExecutor,
    batched,
    executor_width,
    make_executor,
    map_batches,
)


def _square_all(batch: list[int]) -> list[int]:
    return [x * x for x in batch]


def _pid_of(batch: list[int]) -> tuple[int, list[int]]:
    return os.getpid(), batch


def _fail_on_three(batch: list[int]) -> list[int]:
    if 3 in batch:
        raise ValueError("three")
    return batch


def test_batched() -> None:
    assert batched([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert batched([], 3) == []
    assert batched([1, 2], 0) == [[1], [2]]


def test_inline_executor_runs_in_this_process() -> None:
    with make_executor(0) as ex:
        assert isinstance(ex, InlineExecutor)
        results = list(map_batches(_pid_of, batched(list(range(5)), 2), ex, progress=False))
    assert {pid for pid, _ in results} == {os.getpid()}
    assert sorted(x for _, b in results for x in b) == [0, 1, 2, 3, 4]


def test_process_pool_spreads_batches_and_returns_everything() -> None:
    with make_executor(2) as ex:
        assert executor_width(ex) == 2
        results = list(map_batches(_pid_of, batched(list(range(40)), 3), ex, progress=False))
    assert sorted(x for _, b in results for x in b) == list(range(40))
    assert os.getpid() not in {pid for pid, _ in results}


def test_worker_exception_reaches_the_caller() -> None:
    with make_executor(0) as ex, pytest.raises(ValueError, match="three"):
        list(map_batches(_fail_on_three, batched(list(range(6)), 2), ex, progress=False))


class _CountingExecutor(Executor):
    """Thread pool that records the most tasks ever submitted but not finished."""

    def __init__(self, width: int) -> None:
        self._max_workers = width
        self._pool = ThreadPoolExecutor(width)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.in_flight -= 1

        return self._pool.submit(run)

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self._pool.shutdown(wait)


def test_map_batches_bounds_work_in_flight() -> None:
    ex = _CountingExecutor(width=3)
    try:
        out = list(map_batches(_square_all, batched(list(range(100)), 1), ex, progress=False))
    finally:
        ex.shutdown()
    assert sorted(x for b in out for x in b) == [x * x for x in range(100)]
    assert 1 <= ex.peak <= 6  # about two batches per worker, never the whole list at once
