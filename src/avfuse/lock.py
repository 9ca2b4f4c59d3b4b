"""One run per work folder: an advisory ``fcntl.flock`` on ``WORK/.avfuse.lock``.

Two stages writing one work folder at once would redo each other's work or corrupt the
feature store, so every CLI command that writes a work folder (and :func:`avfuse.pipeline.run`)
holds this lock for its whole duration. ``flock`` locks belong to the open file and the kernel
drops them when the last process holding it ends.

The file records who holds it (PID, the process's start time, the boot id, the host and, under
``torchrun``, the job) and is emptied on a clean release. So two things can be told apart:

* a record left in a file nobody locks: its holder died (``kill -9``, an abort); the next run
  takes over, with a warning naming the dead process;
* a lock still held although the recorded holder is gone (same host, PID gone or reused): a
  child of the dead run that inherited the descriptor (a data-loader or pool worker) keeps it.
  The next run takes the folder over with a warning instead of waiting for the orphan.

The lock file is opened without following links and must be a regular file with one name, so
a planted link or hard link can never make avfuse truncate a file outside the work folder.

The lock is re-entrant within one process (``avfuse run`` calls the stage functions, which may
take it again) and is never waited for: a second run is refused at once. Under ``torchrun`` the
ranks of one job share rank 0's lock: a rank other than 0 proceeds without it only when
``WORLD_SIZE > 1``, the job's rendezvous variables are set and rank 0 of the same job is seen
holding the lock; a stray ``RANK`` variable alone skips nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from avfuse.workdir import WorkDir

log = logging.getLogger(__name__)

_HELD: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth)
_GUARD = threading.Lock()
# How long a rank other than 0 waits to see rank 0 of its job holding the lock.
RANK_WAIT_S = 120.0


class WorkFolderBusyError(RuntimeError):
    """Another process holds the work folder's lock; ``pid`` is its PID when known."""

    def __init__(self, work: Path, pid: int | None, host: str = "") -> None:
        who = f"avfuse process {pid}" if pid else "another avfuse process"
        if host and host != socket.gethostname():
            who += f" on {host}"
        super().__init__(
            f"{work} is in use by {who}: one run per work folder; wait for it to finish "
            "or stop it, then run again"
        )
        self.work = work
        self.pid = pid


class LockFileError(OSError):
    """The lock file is not a plain file avfuse can own (a link, a hard link, a folder)."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class Holder:
    """Who wrote a lock record: ``start`` is the process start time in clock ticks since boot
    (``/proc/PID/stat``), ``boot`` the kernel's boot id; ``""`` where unknown."""

    pid: int
    start: str = ""
    boot: str = ""
    host: str = ""
    job: str = ""

    def line(self) -> str:
        return " ".join(
            [str(self.pid), *(f or "-" for f in (self.start, self.boot, self.host, self.job))]
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        fields = text.split()
        if not fields or not fields[0].isdigit():
            return None
        rest = [("" if f == "-" else f) for f in fields[1:5]]
        rest += [""] * (4 - len(rest))
        return cls(int(fields[0]), *rest)

    def alive(self) -> bool | None:
        """Whether this process still runs; ``None`` when it cannot be told (another host)."""
        if self.host and self.host != socket.gethostname():
            return None
        if self.boot and _boot_id() and self.boot != _boot_id():
            return False  # rebooted since: every process of then is gone
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by someone else
        # A recycled PID is another process: its start time differs.
        now = _start_time(self.pid)
        return not (self.start and now and now != self.start)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text("ascii").strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text("ascii", "replace")
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def _job() -> str:
    """The torchrun job this process belongs to (``""`` outside one)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return ""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port:
        return ""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"{addr}:{port}:{run_id}".replace(" ", "_")


def _me() -> Holder:
    pid = os.getpid()
    return Holder(pid, _start_time(pid), _boot_id(), socket.gethostname(), _job())


def lock_path(work: str | Path) -> Path:
    return WorkDir(work).lock


def _read_record(path: Path) -> Holder | None:
    """The record in the lock file, read without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return Holder.parse(os.pread(fd, 512, 0).decode("ascii", "replace"))
    finally:
        os.close(fd)


def holder_pid(work: str | Path) -> int | None:
    """PID recorded by the current holder of ``work``'s lock, if readable."""
    rec = _read_record(lock_path(work))
    return rec.pid if rec else None


def _open_lock_file(path: Path) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockFileError(
                errno.ELOOP,
                f"lock file {path} is a symbolic link; avfuse never writes through one: remove it",
            ) from None
        if exc.errno == errno.EISDIR:
            raise LockFileError(errno.EISDIR, f"lock file {path} is a folder: remove it") from None
        raise
    st = os.fstat(fd)
    problem = (
        "is not a regular file"
        if not stat.S_ISREG(st.st_mode)
        else "has other hard links (a file outside the work folder may share it)"
        if st.st_nlink != 1
        else ""
    )
    if problem:
        os.close(fd)
        raise LockFileError(errno.EINVAL, f"lock file {path} {problem}: remove it")
    return fd, st


@contextlib.contextmanager
def _folder_guard(work: Path) -> Iterator[None]:
    """Serialises lock-file take-overs of one folder: a brief ``flock`` on the folder itself,
    released before the run starts (so no child of the run inherits it)."""
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        # Held for milliseconds by avfuse; a folder some other program keeps locked is not
        # waited on for long (the take-over then runs unguarded, as it would on NFS).
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        yield
    finally:
        os.close(fd)  # releases the flock


def _acquire(work: Path, path: Path) -> int:
    """Open, lock and stamp the lock file; returns its descriptor."""
    me = _me()
    with _folder_guard(work):
        for _ in range(8):
            fd, st = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                rec = Holder.parse(os.pread(fd, 512, 0).decode("ascii", "replace"))
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if rec is None or rec.alive() is not False:
                    raise WorkFolderBusyError(
                        work, rec.pid if rec else None, rec.host if rec else ""
                    ) from None
                # The recorded holder is gone but its lock lives on in a process that inherited
                # the descriptor: a new lock file (new inode) replaces the orphaned one.
                log.warning(
                    "%s: taking over the work folder from avfuse process %d, which is no longer "
                    "running (a leftover child process still held its lock)",
                    work,
                    rec.pid,
                )
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_ino == st.st_ino:
                        os.unlink(path)
                continue
            try:
                if os.lstat(path).st_ino != st.st_ino:  # replaced while we opened it
                    os.close(fd)
                    continue
                rec = Holder.parse(os.pread(fd, 512, 0).decode("ascii", "replace"))
                if rec is not None and rec.pid != me.pid:
                    log.warning(
                        "%s: avfuse process %d did not finish cleanly (its lock record was left "
                        "behind); taking over the work folder",
                        work,
                        rec.pid,
                    )
                os.ftruncate(fd, 0)
                os.pwrite(fd, (me.line() + "\n").encode("ascii", "replace"), 0)
            except BaseException:
                os.close(fd)
                raise
            return fd
    raise WorkFolderBusyError(work, holder_pid(work))


def _wait_for_rank0(work: Path, path: Path, job: str) -> bool:
    """Whether rank 0 of ``job`` is (or within :data:`RANK_WAIT_S` becomes) the live holder."""
    deadline = time.monotonic() + RANK_WAIT_S
    while True:
        rec = _read_record(path)
        if rec is not None and rec.alive() is not False:
            # A live holder: rank 0 of this job, or someone else (refused at once).
            return rec.job == job
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@contextlib.contextmanager
def work_lock(work: str | Path, create: bool = False) -> Iterator[Path]:
    """Hold ``WORK/.avfuse.lock`` for the block; raise :class:`WorkFolderBusyError` if taken.

    ``create`` makes ``work`` (and its parents) if missing; without it a missing folder is a
    :class:`FileNotFoundError`. Yields the lock file's path.
    """
    work = Path(work)
    if create:
        work.mkdir(parents=True, exist_ok=True)
    elif not work.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"work folder {work} does not exist: run `avfuse scan` (or `avfuse run`) first",
        )
    path = lock_path(work)
    job = _job()
    if os.environ.get("RANK", "0") not in ("", "0") and job:
        # Another rank of a torchrun job: rank 0 holds the lock for all of them.
        if not _wait_for_rank0(work, path, job):
            raise WorkFolderBusyError(work, holder_pid(work))
        yield path
        return
    key = str(path.resolve())
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            _HELD[key] = (held[0], held[1] + 1)
        else:
            _HELD[key] = (_acquire(work, path), 1)
    try:
        yield path
    finally:
        with _GUARD:
            fd, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (fd, depth - 1)
            else:
                del _HELD[key]
                # An empty file is a clean release; the file stays (removing it would let a
                # third process lock a new inode while a second holds the old).
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)


__all__ = [
    "Holder",
    "LockFileError",
    "WorkFolderBusyError",
    "holder_pid",
    "lock_path",
    "work_lock",
]
