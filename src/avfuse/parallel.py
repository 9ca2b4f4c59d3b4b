"""The one seam for parallel work: a ``concurrent.futures.Executor``.

Stages split their videos into batches and hand them to :func:`map_batches` together with an
executor. By default that is a local process pool; on a cluster it is
``distributed.Client(address).get_executor()`` (see :func:`make_executor`). Batches rather than
single videos are submitted because one video takes ~10-50 ms, far less than a task's overhead on
a cluster scheduler.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def batched(items: Sequence[T], size: int) -> list[list[T]]:
    size = max(1, int(size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class InlineExecutor(Executor):
    """Runs each task immediately in the calling process (``num_workers=0``): easy to debug."""

    _max_workers = 1

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        fut: Future[R] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


@contextlib.contextmanager
def make_executor(
    num_workers: int | None = None, scheduler: str | None = None
) -> Iterator[Executor]:
    """Executor for a stage: a Dask cluster's if ``scheduler`` is given, else a process pool.

    ``num_workers``: ``None`` uses all cores, ``0`` runs inline in this process.
    ``scheduler``: a Dask scheduler address (``tcp://host:8786``); needs ``avfuse[cluster]``.
    """
    if scheduler:
        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "a --scheduler needs dask.distributed: pip install 'avfuse[cluster]'"
            ) from exc
        client = Client(scheduler)
        try:
            yield client.get_executor()
        finally:
            client.close()
        return
    n = cpu_count() if num_workers is None else int(num_workers)
    if n <= 0:
        yield InlineExecutor()
        return
    # forkserver: children do not inherit the parent's threads (torch, tqdm) or its memory.
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        yield pool


def executor_width(executor: Executor) -> int:
    """How many tasks to keep in flight so no worker idles."""
    width = getattr(executor, "_max_workers", None)
    if isinstance(width, int):
        return width
    client = getattr(executor, "_client", None)
    if client is not None:  # dask ClientExecutor
        with contextlib.suppress(Exception):
            return max(
                1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
            )
    return cpu_count()


def map_batches(
    fn: Callable[[list[T]], R],
    batches: Sequence[list[T]],
    executor: Executor,
    desc: str = "",
    unit: str = "video",
    progress: bool = True,
) -> Iterator[R]:
    """Apply ``fn`` to every batch on ``executor``; yield results in completion order.

    Keeps about two batches per worker in flight (bounded memory on huge datasets) and shows a
    progress bar counted in items, not batches. ``fn`` must be picklable (a module-level
    function or a ``functools.partial`` of one).
    """
    total = sum(len(b) for b in batches)
    window = max(2, 2 * executor_width(executor))
    pending: dict[Future[R], int] = {}
    queue = iter(batches)
    with tqdm(
        total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True, smoothing=0.05
    ) as bar:

        def refill() -> None:
            while len(pending) < window:
                batch = next(queue, None)
                if batch is None:
                    return
                pending[executor.submit(fn, batch)] = len(batch)

        refill()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                n = pending.pop(fut)
                result = fut.result()
                bar.update(n)
                yield result
            refill()
