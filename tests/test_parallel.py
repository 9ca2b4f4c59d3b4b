"""The executor seam: batching, the bounded map over any Executor, process pools whose workers
end with their driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from avfuse.extract import extract
from avfuse.parallel import InlineExecutor, batched, executor_width, make_executor, map_batches
from tests.commands import avfuse_env, hook_folder
from tests.media import write_tone_video
from tests.workfolders import extract_cfg, scanned_tones


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


AVFUSE = [sys.executable, "-m", "avfuse"]


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))):
            children.setdefault(st[0], []).append(int(entry))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            st = _proc_stat(c)
            if st:
                out[c] = st[2]
                todo.append(c)
    return out


def _alive(pid: int, start: str) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[1] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("stage", ["extract", "features"])
def test_sigkill_of_the_driver_ends_its_pool_workers(tmp_path: Path, stage: str) -> None:
    src = tmp_path / "data" / "train" / "a" / "c00.mp4"
    write_tone_video(src, duration=1.0, rate=16000, channels=1, fps=2)
    for i in range(1, 30):  # enough videos that the run is far from done when it is killed
        dst = tmp_path / "data" / "train" / "ab"[i % 2] / f"c{i:02d}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    work = scanned_tones(tmp_path)
    if stage == "features":
        extract(extract_cfg(work))
    hook = hook_folder(
        tmp_path,
        """
        import time
        import avfuse.extract as e
        import avfuse.features as f
        def slow(orig):
            def run(*a, **k):
                time.sleep(0.3)
                return orig(*a, **k)
            return run
        e.decode_audio = slow(e.decode_audio)
        f.load_audio = slow(f.load_audio)
        """,
    )
    args = [stage, str(work), "--num-workers", "2", "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(
        [*AVFUSE, *args],
        env=avfuse_env(hook),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = work / stage / "parts" if stage == "extract" else work / "features" / "parts"
    deadline = time.monotonic() + 60
    kids: dict[int, str] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        kids = _descendants(proc.pid)
        if len(kids) >= 3 and any(parts.glob("part-*.parquet")):  # forkserver + 2 workers
            break
        time.sleep(0.05)
    assert len(kids) >= 3
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers get no signal
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in kids.items()):
        time.sleep(0.1)
    left = [p for p, s in kids.items() if _alive(p, s)]
    for p in left:  # never leave them behind, whatever the assert says
        os.kill(p, signal.SIGKILL)
    assert left == []
