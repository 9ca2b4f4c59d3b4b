"""Names from the data that used to lose or hide videos: ids that collide (Unicode
normalisation, letter case, the id scheme), hidden media files, and ``.`` as a CSV label or
split."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from avfuse.extract import ExtractConfig, extract, load_audio
from avfuse.manifest import AnnotationError, ScanConfig, scan
from tests.media import peak_frequency, write_tone_video

REPO = Path(__file__).resolve().parents[1]
NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def _video(path: Path, freq: float) -> Path:
    return write_tone_video(path, freq=freq, duration=0.6, rate=16000, channels=1, fps=2)


def _warnings(work: Path) -> list[dict[str, str]]:
    with open(work / "scan_warnings.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _extract(work: Path) -> dict[str, tuple[str, str]]:
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert res.skipped >= 0 and res.processed >= 0
    return {
        v: (s, p)
        for v, s, p in zip(
            res.table["video_id"], res.table["status"], res.table["audio_path"], strict=True
        )
    }


def test_names_equal_after_unicode_normalisation_keep_both_videos(tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = {NFC: 440.0, NFD: 1000.0}
    for name, freq in files.items():
        _video(root / "train" / "a" / f"{name}.mp4", freq)
    _video(root / "train" / "b" / "y.mp4", 700.0)
    if len(os.listdir(root / "train" / "a")) != 2:
        pytest.skip("this file system normalises names: the two files are one")
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    assert len(df) == 3 and df["video_id"].is_unique
    cafe = df[df["video_id"].str.startswith(f"train/a/{NFC}~")]
    assert len(cafe) == 2
    by_path = dict(zip(cafe["path"], cafe["video_id"], strict=True))
    warned = [w for w in _warnings(work) if w["kind"] == "id_collision"]
    assert len(warned) == 2 and all(f"train/a/{NFC}" in w["reason"] for w in warned)
    # Stable: a second scan gives every file the same id.
    again = scan(ScanConfig(root=root, work=work))
    assert dict(zip(again["path"], again["video_id"], strict=True)) == dict(
        zip(df["path"], df["video_id"], strict=True)
    )
    # Each id's sound track is its own file's tone: nothing overwrote anything.
    done = _extract(work)
    for name, freq in files.items():
        vid = by_path[str(root / "train" / "a" / f"{name}.mp4")]
        status, rel = done[vid]
        assert status == "ok"
        assert peak_frequency(load_audio(work / rel), 16000) == pytest.approx(freq, abs=10)
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert (res.processed, res.skipped) == (0, 3)
    assert "3 already done" in res.summary()


def test_names_differing_only_in_case_get_distinct_ids(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _video(root / "train" / "a" / "Clip.mp4", 440.0)
    _video(root / "train" / "a" / "clip.mp4", 1000.0)
    if len(os.listdir(root / "train" / "a")) != 2:
        pytest.skip("case-insensitive file system")
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    ids = sorted(df["video_id"])
    # Distinct even case-folded, so the two sound tracks are two files on any file system.
    assert len({i.casefold() for i in ids}) == 2
    done = _extract(work)
    freqs = sorted(peak_frequency(load_audio(work / rel), 16000) for _, rel in done.values())
    assert freqs == [pytest.approx(440, abs=10), pytest.approx(1000, abs=10)]
    assert {w["kind"] for w in _warnings(work)} == {"id_collision"}


def test_the_id_scheme_itself_cannot_merge_two_files(tmp_path: Path) -> None:
    # x.mp4 and x.mkv keep their extension in the id: "x.mp4", which is also the stem of
    # x.mp4.webm.
    root = tmp_path / "data"
    for name, freq in (("x.mp4", 440.0), ("x.mkv", 700.0), ("x.mp4.webm", 1000.0)):
        _video(root / "train" / "a" / name, freq)
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    assert len(df) == 3 and df["video_id"].is_unique
    done = _extract(work)
    freqs = sorted(peak_frequency(load_audio(work / rel), 16000) for _, rel in done.values())
    assert np.allclose(freqs, [440, 700, 1000], atol=10)


def test_a_file_named_like_a_disambiguated_id_is_kept_too(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _video(root / "train" / "a" / "Clip.mp4", 440.0)
    _video(root / "train" / "a" / "clip.mp4", 700.0)
    work = tmp_path / "w"
    taken = sorted(scan(ScanConfig(root=root, work=work))["video_id"])
    # Files named exactly like the ids the collision gave: all four videos stay, distinct.
    for i, vid in enumerate(taken):
        _video(root / "train" / "a" / f"{vid.rsplit('/', 1)[1]}.mp4", 1000.0 + 200 * i)
    df = scan(ScanConfig(root=root, work=work))
    assert len(df) == 4 and len({v.casefold() for v in df["video_id"]}) == 4
    done = _extract(work)
    freqs = sorted(peak_frequency(load_audio(work / rel), 16000) for _, rel in done.values())
    assert np.allclose(freqs, [440, 700, 1000, 1200], atol=10)


def test_extract_refuses_a_manifest_with_duplicate_ids(tmp_path: Path) -> None:
    import pandas as pd

    from avfuse.io import read_table, write_table

    root = tmp_path / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    _video(root / "train" / "a" / "y.mp4", 700.0)
    work = tmp_path / "w"
    scan(ScanConfig(root=root, work=work))
    man = read_table(work / "manifest.parquet")
    man.loc[1, "video_id"] = man.loc[0, "video_id"]  # what an older scan could write
    write_table(pd.DataFrame(man), work / "manifest.parquet")
    with pytest.raises(ValueError, match=r"manifest\.parquet lists video ids twice"):
        extract(ExtractConfig(work=work, num_workers=0, progress=False))


def test_hidden_media_files_are_listed_not_silently_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    _video(root / "train" / "a" / ".secret.mp4", 700.0)
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0")  # not media: not a warning
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    assert list(df["video_id"]) == ["train/a/x"]
    warned = _warnings(work)
    assert [(Path(w["path"]).name, w["kind"]) for w in warned] == [(".secret.mp4", "hidden")]


def test_hidden_folders_are_listed_not_made_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    _video(root / "train" / ".trash" / "old.mp4", 700.0)
    _video(root / "train" / "a" / ".ipynb_checkpoints" / "x-checkpoint.mp4", 440.0)
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    assert list(df["video_id"]) == ["train/a/x"] and set(df["label"]) == {"a"}
    warned = sorted((Path(w["path"]).name, w["kind"]) for w in _warnings(work))
    assert warned == [(".ipynb_checkpoints", "hidden"), (".trash", "hidden")]


def _kinetics(path: Path, rows: list[tuple[str, str, int, int, str]]) -> Path:
    path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        + "".join(f"{a},{b},{c},{d},{e}\n" for a, b, c, d, e in rows),
        "utf-8",
    )
    return path


@pytest.mark.parametrize(
    "bad", [(".", "train"), ("..", "train"), ("a", "."), ("a", ".."), (" ", "train"), ("a", "")]
)
def test_a_dot_label_or_split_in_a_kinetics_csv_is_refused_naming_the_line(
    tmp_path: Path, bad: tuple[str, str]
) -> None:
    root = tmp_path / "k"
    _video(root / "train" / "a" / "aaa_000000_000001.mp4", 440.0)
    label, split = bad
    rows = [("a", "aaa", 0, 1, "train"), (label, "bbb", 0, 1, split)]
    table = _kinetics(tmp_path / "train.csv", rows)
    with pytest.raises(AnnotationError, match=r"train\.csv:3: (label|split|empty split)"):
        scan(ScanConfig(root=root, work=tmp_path / "w", annotations=(table,)))
    args = ["--annotations", str(table)]
    out = subprocess.run(
        [sys.executable, "-m", "avfuse", "scan", str(root), "-o", str(tmp_path / "w"), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)])),
        timeout=120,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "train.csv:3" in out.stderr
    assert not (tmp_path / "w" / "manifest.parquet").exists()


@pytest.mark.parametrize("which", ["annotations", "classes"])
def test_a_fifo_as_annotation_or_class_file_is_refused_not_waited_on(
    tmp_path: Path, which: str
) -> None:
    root = tmp_path / "k"
    _video(root / "train" / "a" / "aaa_000000_000001.mp4", 440.0)
    fifo = tmp_path / "named.pipe"
    os.mkfifo(fifo)
    args = ["--annotations", str(fifo)] if which == "annotations" else ["--classes", str(fifo)]
    out = subprocess.run(
        [sys.executable, "-m", "avfuse", "scan", str(root), "-o", str(tmp_path / "w"), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)])),
        timeout=120,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "named.pipe" in out.stderr and "not a regular file" in out.stderr
