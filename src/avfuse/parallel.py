"""The one seam for parallel work: a ``concurrent.futures.Executor``.

Stages split their videos into batches and hand them to :func:`map_batches` together with an
executor. By default that is a local process pool; on a cluster it is
``distributed.Client(address).get_executor()`` (see :func:`make_executor`). Batches rather than
single videos are submitted because one video takes ~10-50 ms, far less than a task's overhead on
a cluster scheduler.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCH_INTERVAL_S = 0.5


def _driver_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a killed driver awaiting its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # The state letter follows the parenthesised command name.
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _watch_driver(pid: int) -> None:
    while _driver_alive(pid):
        time.sleep(_WATCH_INTERVAL_S)
    os._exit(1)  # no cleanup: the driver that would receive the results is gone


def die_with_driver(driver_pid: int) -> None:
    """Pool initializer: end this worker when the driver process ends, even by ``kill -9``.

    A pool worker's parent is the forkserver, not the driver, and a SIGKILLed driver runs no
    shutdown code, so without this the workers finish every queued batch for nobody. Two
    mechanisms: the kernel's parent-death signal (Linux ``prctl``; fires when the forkserver,
    which exits once the driver's end of its pipe closes, goes away) and a watchdog thread
    polling the driver's PID (any POSIX system with ``/proc``; also covers other start
    methods).
    """
    # Ctrl-C reaches the whole process group: the driver stops the run and says so in one
    # line; workers printing a KeyboardInterrupt traceback each would bury that line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.path.isdir("/proc"):
        if not _driver_alive(driver_pid):  # died while this worker started
            os._exit(1)
        threading.Thread(
            target=_watch_driver, args=(driver_pid,), name="avfuse-watch-driver", daemon=True
        ).start()


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
    with ProcessPoolExecutor(
        max_workers=n, mp_context=ctx, initializer=die_with_driver, initargs=(os.getpid(),)
    ) as pool:
        try:
            yield pool
        except BaseException:
            # A full disk or Ctrl-C stops the run now: queued batches are dropped, and batches
            # the workers already hold are stopped too (workers ignore SIGINT, so they would
            # run them to the end). Outputs are committed by rename, so a stopped batch leaves
            # only temporaries, which the rerun removes.
            workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown clears it
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers:
                with contextlib.suppress(Exception):
                    proc.terminate()
            raise


def executor_context(
    executor: Executor | None, num_workers: int | None = None, scheduler: str | None = None
) -> contextlib.AbstractContextManager[Executor]:
    """The caller's executor as is (not closed), or a fresh :func:`make_executor` pool."""
    if executor is not None:
        return contextlib.nullcontext(executor)
    return make_executor(num_workers, scheduler)


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
                fut = executor.submit(fn, batch)
                pending[fut] = len(batch)
                if fut.done() and fut.exception() is not None:
                    return  # inline and failed: raise it now instead of running the next batch

        refill()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                n = pending.pop(fut)
                result = fut.result()
                bar.update(n)
                yield result
            refill()
