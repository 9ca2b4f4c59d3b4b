"""One run per work folder: an advisory ``fcntl.flock`` on ``WORK/.avfuse.lock``.

Two stages writing one work folder at once would redo each other's work or corrupt the
feature store, so every CLI command that writes a work folder (and :func:`avfuse.pipeline.run`)
holds this lock for its whole duration. ``flock`` locks belong to the open file and the kernel
drops them when the process dies, so a run killed with ``kill -9`` never leaves the folder
blocked; the file itself stays and only records the PID of the last holder.

The lock is re-entrant within one process (``avfuse run`` calls the stage functions, which may
take it again) and is never waited for: a second run is refused at once. Under ``torchrun``
only rank 0 takes it (the ranks of one job share the work folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".avfuse.lock"

_HELD: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth)
_GUARD = threading.Lock()


class WorkFolderBusyError(RuntimeError):
    """Another process holds the work folder's lock; ``pid`` is its PID when known."""

    def __init__(self, work: Path, pid: int | None) -> None:
        who = f"avfuse process {pid}" if pid else "another avfuse process"
        super().__init__(
            f"{work} is in use by {who}: one run per work folder; wait for it to finish "
            "or stop it, then run again"
        )
        self.work = work
        self.pid = pid


def lock_path(work: str | Path) -> Path:
    return Path(work) / LOCK_NAME


def holder_pid(work: str | Path) -> int | None:
    """PID recorded by the current (or last) holder of ``work``'s lock, if readable."""
    try:
        text = lock_path(work).read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def work_lock(work: str | Path) -> Iterator[Path]:
    """Hold ``WORK/.avfuse.lock`` for the block; raise :class:`WorkFolderBusyError` if taken.

    Creates ``work`` if needed. Yields the lock file's path.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    path = lock_path(work)
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun every rank runs the same command on the one work folder: rank 0
        # holds the lock for all of them.
        yield path
        return
    key = str(path.resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            _HELD[key] = (held[0], held[1] + 1)
            fd = -1
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkFolderBusyError(work, holder_pid(work)) from None
                raise
            # The PID is for the message of a refused second run; the lock is the flock.
            # Written only when it changed: a rerun that redoes nothing rewrites nothing.
            pid = f"{os.getpid()}\n".encode("ascii")
            if os.pread(fd, 64, 0) != pid:
                os.ftruncate(fd, 0)
                os.pwrite(fd, pid, 0)
            _HELD[key] = (fd, 1)
    try:
        yield path
    finally:
        with _GUARD:
            fd, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (fd, depth - 1)
            else:
                del _HELD[key]
                # Closing the descriptor releases the flock; the file stays (removing it
                # would let a third process lock a new inode while a second holds the old).
                os.close(fd)


__all__ = ["LOCK_NAME", "WorkFolderBusyError", "holder_pid", "lock_path", "work_lock"]
