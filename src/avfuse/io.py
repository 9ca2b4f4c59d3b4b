"""Crash-safe file output and per-stage record logs.

Everything avfuse writes goes to a temporary name in the destination folder and is renamed into
place (``os.replace`` is atomic on POSIX), so a kill at any moment leaves either the old file or
the complete new one, never a truncated one.

Stage results are kept in a :class:`RecordLog`: a folder of small Parquet "part" files, each
written atomically by whichever worker finished a batch. A rerun reads the parts to learn which
videos are done; the stage writes from it the single table the next stage reads. When a stage
commits, :meth:`RecordLog.compact` folds the parts into one, so a rerun reads one file instead
of one per batch ever run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import glob
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from avfuse.workdir import LOCK_NAME, RecordLogLayout

# Arrow's default pool (mimalloc) keeps what a Parquet read decoded through: reading the
# 420k-row manifest cost twice the RSS (~120 MB against ~60 MB) of the system allocator, which
# hands it back. Bookkeeping tables are read once per run, so the faster pool buys nothing.
# A pool the user chose (ARROW_DEFAULT_MEMORY_POOL) is left alone.
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    pa.set_memory_pool(pa.system_memory_pool())

TMP_MARK = ".tmp-"


def error_reason(exc: BaseException, limit: int = 300) -> str:
    """One line for a per-video ``reason`` column: ``"Type: message"``, whitespace folded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]


log = logging.getLogger(__name__)


class DiskFullError(OSError):
    """No space left where a stage writes: the run stops at once (a rerun after freeing space
    resumes). Raised instead of recording a per-video failure, since every later video would
    fail the same way. Picklable, so a worker's raise reaches the driver unchanged."""

    def __init__(self, folder: str | Path, detail: str = "") -> None:
        self.folder = str(folder)
        self.detail = detail
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device holding {self.folder}"
            + (f" ({detail})" if detail else "")
            + "; free some space and run again: finished work is kept and a rerun resumes",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.folder, self.detail))

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT (quota exceeded): the device, not the file, is the problem."""
    if not isinstance(exc, OSError):
        return False
    # Some writers (pyarrow) raise OSError without an errno, with the C library's message.
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def raise_if_disk_full(exc: BaseException, folder: str | Path) -> None:
    """Re-raise ``exc`` as :class:`DiskFullError` naming ``folder`` when the disk is full."""
    if isinstance(exc, DiskFullError):
        raise exc
    if is_disk_full(exc):
        raise DiskFullError(folder, error_reason(exc)) from exc


class PathEscapeError(ValueError):
    """An output path that would leave the work folder (a ``..`` in a name from the data, or a
    symbolic link inside the work folder that points out of it)."""


def _shown_path(path: str | Path) -> str:
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def work_root_of(path: str | Path) -> Path | None:
    """The work folder ``path`` lies in: its nearest ancestor (by name, links not followed)
    holding :data:`LOCK_NAME`; ``None`` for a path outside any work folder."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.lexists(os.path.join(folder, LOCK_NAME)):
            return Path(folder)
        up = os.path.dirname(folder)
        if up == folder:
            return None
        folder = up


def check_inside_work(path: str | Path, folder: bool = False) -> None:
    """Refuse to write (or delete) ``path`` when a symbolic link below its work folder leads
    out of it; with ``folder``, ``path`` is a folder whose contents are written or deleted.

    The work folder itself may be a link (it is resolved first); a folder inside it that
    links elsewhere would make a write land outside, where it may replace someone's file.
    Paths outside any work folder (an ``--output`` the user named) are not checked.
    """
    where = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    root = work_root_of(os.path.join(where, LOCK_NAME))
    if root is None:
        return
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(where)
    if os.path.commonpath([real_root, real_parent]) != real_root:
        raise PathEscapeError(
            f"a symbolic link leads out of the work folder {_shown_path(root)}: refusing to "
            f"write {_shown_path(path)} (it would land in {_shown_path(real_parent)}); "
            "remove the link"
        )


def create_new_file(path: str | Path, mode: int = 0o666) -> None:
    """Create ``path`` as a new empty regular file; never opens an existing file or a link
    (``O_EXCL | O_NOFOLLOW``), so a name planted in advance cannot redirect the write."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode))


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file exists, new and empty, when the block starts: writers open it by name
    and truncate their own file. The rename replaces whatever ``path`` was, a symbolic link
    included, without following it: no file outside the work folder is ever written through a
    link (:func:`check_inside_work` refuses folders that link out). On an exception the
    temporary file is removed and ``path`` is left untouched; a full disk is raised as
    :class:`DiskFullError` naming the folder.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    created = False
    try:
        check_inside_work(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        create_new_file(tmp)
        created = True
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise_if_disk_full(exc, path.parent)
        raise
    finally:
        if created:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


_OLD_MARK = ".old-"


def _recover_dir(path: Path) -> None:
    """Undo what a kill during :func:`atomic_dir`'s two renames left behind."""
    parent = path.parent
    olds = sorted(parent.glob(f".{glob.escape(path.name)}{_OLD_MARK}*"), key=os.path.getmtime)
    if olds and not path.exists():
        # Killed between moving the old folder aside and moving the new one in: the old
        # outputs are complete and consistent, so they come back.
        os.rename(olds.pop(), path)
    for leftover in olds + list(parent.glob(f".{glob.escape(path.name)}{TMP_MARK}*")):
        shutil.rmtree(leftover, ignore_errors=True)


def check_replaceable(path: str | Path, marker: str) -> None:
    """Refuse to replace folder ``path`` unless it is missing, empty, or holds ``marker`` (a
    file only the writer of such a folder makes): an ``--output`` naming someone's existing
    folder must not have its contents deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {_shown_path(path)} is a file, not a folder")
    if path.is_dir() and not (path / marker).exists() and any(path.iterdir()):
        raise FileExistsError(
            f"output folder {_shown_path(path)} exists and was not written by avfuse (no "
            f"{marker}): refusing to replace its contents; name a new or empty folder"
        )


@contextlib.contextmanager
def atomic_dir(path: str | Path, marker: str | None = None) -> Iterator[Path]:
    """Yield a new temporary folder next to ``path``; on success it replaces folder ``path``.

    Readers see the old folder or the new one, never a mix: the old folder stays until the new
    one is complete, then two renames swap them (a kill between them is undone by the next
    call). On an exception the temporary folder is removed and ``path`` is left untouched.
    With ``marker``, an existing folder is replaced only as :func:`check_replaceable` allows.
    """
    path = Path(path)
    if marker is not None:
        check_replaceable(path, marker)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {path} is a file, not a folder")
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    check_inside_work(tmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _recover_dir(path)
        tmp.mkdir()
        yield tmp
        old = path.with_name(f".{path.name}{_OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise_if_disk_full(exc, path.parent)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...),
# +cmd|..., @SUM...); tab and carriage return start one in some importers.
_FORMULA = re.compile(r"'*[=+\-@\t\r]")


def csv_cell(text: str) -> str:
    """``text`` safe for a spreadsheet: a leading ``'`` before a formula prefix makes it text.

    ``'`` is also added before text that already starts with quotes and then a prefix, so
    :func:`csv_uncell` gives back exactly the original.
    """
    return "'" + text if _FORMULA.match(text) else text


def csv_uncell(text: str) -> str:
    """The original of a :func:`csv_cell`; text that was not escaped is returned as it is."""
    return text[1:] if text.startswith("'") and _FORMULA.match(text, 1) else text


def csv_safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell and column name passed through :func:`csv_cell`."""
    out = df.copy()
    out.columns = [csv_cell(c) if isinstance(c, str) else c for c in df.columns]
    for col in out.columns:
        values = out[col]
        if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
            text = values.astype(object)
            risky = text.map(lambda v: isinstance(v, str) and _FORMULA.match(v) is not None)
            if risky.any():
                out[col] = text.where(~risky, "'" + text.where(risky, ""))
    return out


def write_csv(df: pd.DataFrame, path: str | Path, **to_csv: Any) -> Path:
    """Write ``df`` as a CSV people open in spreadsheets, atomically, with every text cell and
    header escaped by :func:`csv_cell` (read back with :func:`csv_uncell`). ``to_csv`` goes to
    :meth:`pandas.DataFrame.to_csv` (``index=False`` unless given)."""
    path = Path(path)
    to_csv.setdefault("index", False)
    # CRLF rows (RFC 4180): the csv module then quotes a cell holding a lone CR, which a
    # spreadsheet would otherwise read as a row break starting a new (formula) cell.
    to_csv.setdefault("lineterminator", "\r\n")
    with atomic_write(path) as tmp:
        csv_safe_frame(df).to_csv(tmp, **to_csv)
    return path


# Bidirectional overrides and isolates reorder what a terminal or editor shows (a name can
# read as another); they are escaped with the C0/C1 controls.
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def terminal_safe(text: str) -> str:
    """``text`` with every control character but newline and tab written as an escape.

    Names from the data reach the console in log lines, summaries and error messages: an
    escape sequence in a file name (``\\x1b[2J``, ``\\x1b]0;title\\x07``) would otherwise clear
    the screen, recolour the rest of the output or set the window title.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t" or (ch.isprintable() and ch not in _BIDI):
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


class TerminalSafeFormatter(logging.Formatter):
    """A log formatter whose lines carry no terminal control sequences (:func:`terminal_safe`)."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file names, for a message: "a folder", ..."""
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "a special file"


def require_regular_file(path: str | Path) -> None:
    """Refuse a path a user named that is not a regular file (after links), before opening it.

    Opening a FIFO for reading waits for a writer forever and a device (``/dev/zero``) never
    ends; ``stat`` answers at once. Raises ``OSError`` naming the file and what it is.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{_shown_path(path)} is {file_kind(st.st_mode)}, not a regular file")


def read_regular_text(
    path: str | Path, encoding: str = "utf-8", max_bytes: int | None = None
) -> str:
    """The text of a file a user named, which must be a regular file.

    Opened without blocking and checked before reading: a FIFO would block the read forever
    and a device (``/dev/zero``) would never end. A file over ``max_bytes`` is refused before
    it is read. Raises ``OSError`` naming the file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{_shown_path(path)} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(
                errno.EFBIG,
                f"{_shown_path(path)} is {st.st_size >> 20} MiB, over the {max_bytes >> 20} MiB "
                "such a file can need",
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    return data.decode(encoding)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    return path


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path``; ``ValueError`` naming it for one that does not parse or
    nests deeper than the parser's recursion allows (instead of a ``RecursionError``)."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def write_table(
    df: pd.DataFrame | pa.Table, path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a DataFrame (or Arrow table) as Parquet atomically, with optional key/value
    schema metadata."""
    path = Path(path)
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    return pq.read_table(path, columns=list(columns) if columns else None).to_pandas()


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    # Without the pandas metadata, so parts written from different frames join on names alone.
    if columns is None:
        return pq.read_table(path).replace_schema_metadata(None)
    try:
        return pq.read_table(path, columns=columns).replace_schema_metadata(None)
    except pa.ArrowInvalid:
        pass
    # A part may lack a column (written by another version): it reads as nulls.
    have = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in columns if c in have])
    for c in columns:
        if c not in have:
            table = table.append_column(c, pa.nulls(table.num_rows))
    return table.select(columns).replace_schema_metadata(None)


def _read_part_or_set_aside(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A log part; an unreadable one (damaged, cut short) is renamed ``*.corrupt`` out of the
    log with a warning, and reads as empty: its videos are done again by the rerun."""
    try:
        return _read_part(path, columns)
    except pa.ArrowInvalid as exc:
        aside = RecordLogLayout.set_aside(path)
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning(
            "log part %s is unreadable (%s): set aside as %s", path, error_reason(exc), aside
        )
        return pa.table({})


def isin_ids(values: pd.Series, among: pd.Series | pa.Array) -> np.ndarray:
    """``values.isin(among)`` for string ids, as one Arrow hash look-up (pandas' ``isin`` on
    Arrow strings walks the values in Python: seconds at 400k videos). ``(len(values),)``."""
    if not isinstance(among, pa.Array | pa.ChunkedArray):
        among = pa.array(among.astype(str))
    found = pc.is_in(pa.array(values.astype(str)), value_set=among)
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def table_metadata(path: str | Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"pandas")}


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete leftovers of writes that were killed before their rename. Returns how many."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    check_inside_work(folder, folder=True)
    n = 0
    for p in folder.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
    return n


_GROUP = 512  # log parts read and joined together


class RecordLog:
    """Append-only log of per-video records, one atomic Parquet part per finished batch.

    Records are dicts with at least a ``video_id`` key. When a video appears in several parts
    (a batch retried after a worker died, say) the newest part wins.
    """

    def __init__(self, folder: str | Path, key: str = "video_id") -> None:
        self.folder = Path(folder)
        self.key = key

    def write(self, records: Iterable[Mapping[str, Any]]) -> Path | None:
        rows = list(records)
        if not rows:
            return None
        check_inside_work(self.folder, folder=True)  # before creating anything there
        self.folder.mkdir(parents=True, exist_ok=True)
        part = RecordLogLayout(self.folder).part(time.time_ns(), uuid.uuid4().hex[:8])
        return write_table(pd.DataFrame(rows), part)

    def parts(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return [p for p in RecordLogLayout(self.folder).parts() if TMP_MARK not in p.name]

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The log, newest record per key, as an Arrow table (``.to_pandas()`` for a frame);
        ``columns`` (the key always included) reads fewer. An empty log is a table of no rows
        with the key and ``columns`` as strings."""
        table = self._read_arrow(self.parts(), columns)
        return self._empty(columns) if table is None else table

    def _empty(self, columns: Sequence[str] | None) -> pa.Table:
        cols = [self.key, *(c for c in columns or () if c != self.key)]
        return pa.table({c: pa.array([], pa.string()) for c in cols})

    def _read_arrow(self, parts: list[Path], columns: Sequence[str] | None) -> pa.Table | None:
        # Arrow tables, joined once and converted once: a DataFrame per part and a pandas concat
        # cost ~9 ms a part, minutes for the 13k parts of a Kinetics-size run. Reading is I/O
        # and footer parsing, which pyarrow does without the GIL, so a few threads overlap it.
        cols = None if columns is None else [self.key, *(c for c in columns if c != self.key)]
        read = functools.partial(_read_part_or_set_aside, columns=cols)
        # permissive: a column that is all null in one part (no errors in that batch) joins
        # the typed column of the others. Parts are joined a group at a time into one chunk:
        # 13k tables of 32 rows held at once cost twice the memory of their records.
        groups = []
        with concurrent.futures.ThreadPoolExecutor(min(8, max(1, len(parts)))) as pool:
            for lo in range(0, len(parts), _GROUP):
                tables = [t for t in pool.map(read, parts[lo : lo + _GROUP]) if t.num_rows]
                if tables:
                    group = pa.concat_tables(tables, promote_options="permissive")
                    groups.append(group.combine_chunks() if len(tables) > 1 else group)
        if not groups:
            return None
        table = pa.concat_tables(groups, promote_options="permissive")
        keys = table.column(self.key)
        # A compacted part alone (the usual state) holds each key once by construction; else
        # count in Arrow first: hashing 420k ids in pandas costs ~100 MB.
        compacted = len(parts) == 1 and RecordLogLayout.is_compacted(parts[0])
        if not compacted and pc.count_distinct(keys).as_py() < len(keys):
            newest_last = ~keys.to_pandas().duplicated(keep="last").to_numpy()
            table = table.filter(pa.array(newest_last))
        return table

    def clear(self) -> None:
        check_inside_work(self.folder, folder=True)
        for p in self.parts():
            p.unlink()

    def compact(self) -> pa.Table:
        """Rewrite the log as one part, so the next read opens one file; returns the log as
        :meth:`read` does.

        Crash-safe at every step: the compacted part is written under a temporary name and
        renamed into place, then the parts it covers are deleted. Its name sorts right after
        the newest part it covers, so a kill between the rename and the last delete leaves
        parts that lose to it ("newest wins") and hold the same records anyway; parts logged
        later still sort after it and win. Arrow end to end: at 420k records a pandas round
        trip costs ~400 MB.
        """
        parts = self.parts()
        table = self._read_arrow(parts, None)
        if table is None:
            return self._empty(None)
        if len(parts) <= 1:
            return table
        target = RecordLogLayout(self.folder).compacted(parts[-1])
        write_table(table, target)
        for p in parts:
            if p != target:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return table


# Schema-metadata key of a stage table: what it was committed from (see inputs_key).
INPUTS = "inputs"


def inputs_key(log: RecordLog, files: Sequence[Path], settings: Sequence[object]) -> str:
    """What a stage table is committed from: ``settings``, the size and mtime of the upstream
    ``files`` ("-" for a missing one) and the names of ``log``'s parts. A table whose
    :data:`INPUTS` metadata equals the current key holds exactly what a commit would write."""
    stats = []
    for f in files:
        try:
            st = Path(f).stat()
            stats.append(f"{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            stats.append("-")
    parts = ",".join(p.name for p in log.parts())
    return "|".join([*map(str, settings), *stats, parts])


def committed_from(table: str | Path, key: str) -> bool:
    """Whether ``table`` exists and was committed from the inputs ``key`` names (an
    unreadable table was not: the stage's commit rewrites it)."""
    if not Path(table).exists():
        return False
    try:
        return table_metadata(table).get(INPUTS) == key
    except (pa.ArrowInvalid, OSError) as exc:
        log.warning("%s is unreadable (%s): rebuilding it", table, error_reason(exc))
        return False


def safe_join(work: str | Path, *parts: str | Path) -> Path:
    """``work / parts...``, refused unless it stays inside ``work``.

    Ids and labels come from the data; ``../`` in one, an absolute part or a NUL must never
    decide where a file is written. This check is on the normalised path; links inside WORK
    that lead out of it are refused where the file is written (:func:`atomic_write`).
    """
    base = os.path.abspath(work)
    text = [os.fspath(p) for p in parts]
    target = os.path.normpath(os.path.join(base, *text))
    if (
        any("\0" in t for t in text)
        or os.path.commonpath([base, target]) != base
        or (target == base)
    ):
        shown = "/".join(text).encode("utf-8", "backslashreplace").decode("utf-8")
        raise PathEscapeError(f"refusing to write {shown!r}: the path leaves {base}")
    return Path(target)
