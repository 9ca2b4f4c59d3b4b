"""Fingerprints: noticing that inputs changed without reading them.

A stage's key digests its settings (:func:`digest`); files the run does not make (video score
files, ``--init`` weights, a checkpoint named by path) enter it as their size and modification
time (:func:`file_stamp`, :func:`input_stamp`). The dataset itself is fingerprinted by one walk
over its files (:func:`dataset_listing`, :func:`listing_hash`): a changed hash rescans, and
:func:`changed_paths` names the files replaced in place, whose videos are then redone.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def digest(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys, ``str`` of other
    types)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_stamp(paths: Any) -> list[Any]:
    """``[path, size, mtime_ns]`` per path (``-1`` for a missing file), skipping ``None``."""
    out = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        st = p.stat() if p.exists() else None
        out.append([str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    return out


def input_stamp(path: str | Path) -> list[Any]:
    """Size and modification time of an input file, or of every file in an input folder (a
    Hugging Face model folder)."""
    p = Path(path)
    if p.is_dir():
        return file_stamp(sorted(f for f in p.iterdir() if f.is_file()))
    return file_stamp([p])


def dataset_listing(root: str | Path, extra: Any = ()) -> pa.Table:
    """Every file under ``root``: ``path`` (relative, POSIX), ``size``, ``mtime_ns``, sorted,
    as an Arrow table (a DataFrame of it costs ~60 MB more at 420k files).

    One ``os.scandir`` walk (the entries' ``stat`` is one call per file, none per folder on
    Linux); symlinked folders are followed once each, so a link loop ends. ``extra`` files
    (a Kinetics CSV, a class list) are listed under their absolute path.
    """
    root = Path(root)
    # Three columns, the numbers in typed arrays: a tuple of Python objects per file cost
    # ~200 bytes each, ~90 MB over Kinetics' 420k files.
    paths: list[str] = []
    sizes, mtimes = array.array("q"), array.array("q")

    def add(name: str, size: int, mtime: int) -> None:
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8: listed escaped, not fatal
                name = os.fsencode(name).decode("utf-8", "backslashreplace")
        paths.append(name)
        sizes.append(size)
        mtimes.append(mtime)

    seen: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            add(rel + "/", -1, -1)  # unreadable folder: listed, so a fix is noticed
            continue
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir():
                    stack.append((Path(e.path), name))
                    continue
                est = e.stat()
                add(name, int(est.st_size), int(est.st_mtime_ns))
            except OSError:  # dangling link, vanished file
                add(name, -1, -1)
    for f in extra:
        if f is None:
            continue
        try:
            est = Path(f).stat()
            add(str(Path(f).resolve()), int(est.st_size), int(est.st_mtime_ns))
        except OSError:
            add(str(f), -1, -1)
    # Sorted by path (paths are unique, so as the row tuples would sort), in Arrow's C++.
    names = pa.array(paths, pa.string())
    paths.clear()
    order = pc.sort_indices(names)
    return pa.table(
        {
            "path": names.take(order),
            "size": pa.array(np.frombuffer(sizes, np.int64)).take(order),
            "mtime_ns": pa.array(np.frombuffer(mtimes, np.int64)).take(order),
        }
    )


def listing_hash(listing: pa.Table) -> str:
    """sha256 of ``path NUL size NUL mtime_ns LF`` per row, in a block of rows at a time."""
    h = hashlib.sha256()
    cols = [listing.column(c) for c in ("path", "size", "mtime_ns")]
    for lo in range(0, listing.num_rows, 65536):
        rows = zip(*(c.slice(lo, 65536).to_pylist() for c in cols), strict=True)
        block = "".join(f"{path}\0{size}\0{mtime}\n" for path, size, mtime in rows)
        h.update(block.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def changed_paths(old: pd.DataFrame, new: pd.DataFrame) -> set[str]:
    """Paths in both listings whose size or time differ (replaced files)."""
    both = old.merge(new, on="path", suffixes=("_old", "_new"))
    diff = (both["size_old"] != both["size_new"]) | (both["mtime_ns_old"] != both["mtime_ns_new"])
    return set(both.loc[diff, "path"].astype(str))
