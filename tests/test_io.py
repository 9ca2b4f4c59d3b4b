"""Crash-safe writes and the per-stage record log."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from avfuse.io import (
    TMP_MARK,
    RecordLog,
    atomic_write,
    read_json,
    read_table,
    remove_stale_temporaries,
    table_metadata,
    write_json,
    write_table,
)


def test_atomic_write_replaces_only_on_success(tmp_path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and TMP_MARK in tmp.name
        assert tmp.suffix == ".txt"  # libraries that pick a format by suffix still work
        tmp.write_text("first")
        assert not target.exists()  # nothing visible before the rename
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_remove_stale_temporaries(tmp_path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    stale = tmp_path / "a" / "b" / f".x.flac{TMP_MARK}123-abcd.flac"
    stale.write_bytes(b"partial")
    keep = tmp_path / "a" / "b" / "x.flac"
    keep.write_bytes(b"complete")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and keep.exists()
    assert remove_stale_temporaries(tmp_path / "does-not-exist") == 0


def test_json_and_table_round_trip(tmp_path) -> None:
    write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"a": [1, 2], "b": 1}
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}

    df = pd.DataFrame({"video_id": ["b", "a"], "x": [1.5, 2.5]})
    write_table(df, tmp_path / "t.parquet", {"sample_rate": "16000"})
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.parquet"), df)
    assert table_metadata(tmp_path / "t.parquet") == {"sample_rate": "16000"}
    raw = pq.read_table(tmp_path / "t.parquet")  # plain Parquet for any reader
    assert raw.column("video_id").to_pylist() == ["b", "a"]


def test_record_log_newest_record_wins(tmp_path) -> None:
    log = RecordLog(tmp_path / "parts")
    assert log.read().num_rows == 0 and log.parts() == []
    assert log.write([]) is None
    log.write([{"video_id": "a", "status": "unreadable"}, {"video_id": "b", "status": "ok"}])
    log.write([{"video_id": "a", "status": "ok"}, {"video_id": "c", "status": "no_audio"}])
    assert len(log.parts()) == 2
    df = log.read().to_pandas().set_index("video_id")
    assert df["status"].to_dict() == {"a": "ok", "b": "ok", "c": "no_audio"}

    # A part being written when the process died is not read.
    (tmp_path / "parts" / f".part-9{TMP_MARK}1-x.parquet").write_bytes(b"garbage")
    assert sorted(log.read().column("video_id").to_pylist()) == ["a", "b", "c"]

    log.clear()
    assert log.read().num_rows == 0 and log.parts() == []


def test_record_log_reads_columns_across_parts_of_different_shapes(tmp_path) -> None:
    """Many parts join in Arrow: a column missing or all-null in one part, newest wins."""
    log = RecordLog(tmp_path / "parts")
    log.write([{"video_id": f"v{i}", "status": "ok", "n": i} for i in range(5)])
    log.write([{"video_id": "v1", "status": "error", "n": None, "reason": "boom"}])
    log.write([{"video_id": "v7", "status": "ok"}])  # no "n", no "reason"
    df = log.read(["status", "reason"]).to_pandas().set_index("video_id")
    assert list(df.columns) == ["status", "reason"]
    assert df["status"].to_dict() == {
        "v0": "ok", "v2": "ok", "v3": "ok", "v4": "ok", "v1": "error", "v7": "ok"
    }  # fmt: skip
    assert df.loc["v1", "reason"] == "boom" and pd.isna(df.loc["v7", "reason"])
    full = log.read().to_pandas().set_index("video_id")
    assert full.loc["v3", "n"] == 3 and pd.isna(full.loc["v7", "n"])
    compacted = log.compact()
    assert len(log.parts()) == 1
    assert log.read().equals(compacted)
    assert log.read(["status"]).column_names == ["video_id", "status"]
    empty = RecordLog(tmp_path / "empty")
    assert empty.read(["status"]).column_names == ["video_id", "status"]
    assert empty.read().num_rows == empty.compact().num_rows == 0


def test_error_reason_is_one_bounded_line_naming_the_type() -> None:
    from avfuse.io import error_reason

    assert error_reason(OSError("bad\n  packet\tat 3 s")) == "OSError: bad packet at 3 s"
    assert error_reason(ValueError()) == "ValueError: ValueError"
    assert len(error_reason(RuntimeError("x" * 1000))) == 300
