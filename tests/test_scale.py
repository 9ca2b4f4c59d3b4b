"""Bookkeeping at scale: compacted record logs, cheap status counts, stores pickled by path,
locality-aware training sampling and batched gathers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from avfuse.extract import ExtractConfig, extract
from avfuse.io import COMPACTED, RecordLog, read_table
from avfuse.manifest import ScanConfig, scan
from tests.media import write_tone_video

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- record logs


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

    df = rlog.compact()
    assert len(rlog.parts()) == 1 and COMPACTED in rlog.parts()[0].name
    assert dict(zip(df["video_id"], df["value"])) == expected
    again = rlog.read()
    assert dict(zip(again["video_id"], again["value"])) == expected

    # A part logged after the compaction still wins; compacting again folds it in.
    rlog.write([{"video_id": "v00", "value": -1}])
    assert rlog.read().set_index("video_id").loc["v00", "value"] == -1
    rlog.compact()
    assert len(rlog.parts()) == 1
    final = rlog.read()
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
        calls = [0]
        def hit():
            calls[0] += 1
            if calls[0] == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
        if {what!r} == "replace":
            real_replace = os.replace
            def replace(src, dst):
                if io.COMPACTED in str(dst):
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
    logged = parts.read()
    assert sorted(logged["video_id"]) == sorted(ids)

    res = extract(ExtractConfig(work=work, num_workers=0, batch_size=1, progress=False))
    assert res.processed == 0 and res.skipped == len(ids)  # resumed: nothing decoded again
    assert sorted(res.table["video_id"]) == sorted(ids)
    assert set(res.table["status"]) == {"ok"}
    table = read_table(work / "extract.parquet")
    assert table["video_id"].is_unique and sorted(table["video_id"]) == sorted(ids)
    assert len(parts.parts()) == 1  # the rerun finished the compaction
    final = parts.read()
    assert final["video_id"].is_unique and sorted(final["video_id"]) == sorted(ids)
    pd.testing.assert_frame_equal(
        final.sort_values("video_id").reset_index(drop=True)[list(table.columns)],
        table.reset_index(drop=True),
    )
