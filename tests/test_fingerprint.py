"""Fingerprints: the dataset walk and its hash, replaced files, stamps and digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from avfuse.fingerprint import (
    changed_paths,
    dataset_listing,
    digest,
    file_stamp,
    input_stamp,
    listing_hash,
)


def test_dataset_listing_is_every_file_sorted_and_survives_undecodable_names(
    tmp_path: Path,
) -> None:
    """The fingerprint walk against os.walk, and its hash against the per-row definition."""
    root = tmp_path / "data"
    for rel, size in (("train/b/x.mp4", 3), ("train/a/é.mp4", 5), ("val/a/y.mkv", 0)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"z" * size)
    # A name that is not UTF-8 (a Latin-1 file system): listed escaped instead of crashing.
    # Some file systems (APFS, ZFS with utf8only) refuse such names: then only the rest is checked.
    bad = os.path.join(os.fsencode(root / "val" / "a"), b"caf\xe9.mp4")
    try:
        with open(bad, "wb") as fh:
            fh.write(b"1234")
        has_bad = True
    except OSError:
        has_bad = False
    got = dataset_listing(root)
    want = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            rel = os.fsencode(rel).decode("utf-8", "backslashreplace")
            want.append((rel, st.st_size, st.st_mtime_ns))
    want.sort()
    cols = [got.column(c).to_pylist() for c in ("path", "size", "mtime_ns")]
    assert list(zip(*cols, strict=True)) == want
    assert ("val/a/caf\\xe9.mp4" in set(cols[0])) == has_bad
    h = hashlib.sha256()
    for path, size, mtime in want:
        h.update(f"{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    assert listing_hash(got) == h.hexdigest()[:16]


def test_changed_paths_are_the_files_replaced_in_place() -> None:
    old = pd.DataFrame(
        {"path": ["a", "b", "c", "gone"], "size": [1, 2, 3, 4], "mtime_ns": [10, 20, 30, 40]}
    )
    new = pd.DataFrame(
        {"path": ["a", "b", "c", "added"], "size": [1, 5, 3, 6], "mtime_ns": [10, 20, 31, 50]}
    )
    # b grew, c was touched; a is as it was; added and deleted files are not "changed".
    assert changed_paths(old, new) == {"b", "c"}


def test_stamps_are_size_and_time_and_a_missing_file_reads_minus_one(tmp_path: Path) -> None:
    a, missing = tmp_path / "a.bin", tmp_path / "missing.bin"
    a.write_bytes(b"12345")
    st = os.stat(a)
    assert file_stamp([a, None, missing]) == [
        [str(a), 5, st.st_mtime_ns],
        [str(missing), -1, -1],
    ]
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    for name in ("z.json", "b.safetensors"):
        (folder / name).write_bytes(b"x")
    assert [row[0] for row in input_stamp(folder)] == [
        str(folder / "b.safetensors"),
        str(folder / "z.json"),
    ]  # the folder's files, sorted; sub-folders are not inputs
    assert input_stamp(a) == file_stamp([a])


def test_digest_is_the_canonical_json_hash() -> None:
    obj = {"b": [1, 2.5], "a": {"y": None, "x": Path("p")}}
    blob = json.dumps(
        {"a": {"x": "p", "y": None}, "b": [1, 2.5]}, separators=(",", ":"), sort_keys=True
    )
    assert digest(obj) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
