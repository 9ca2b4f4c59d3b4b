"""Scan and the manifest: video ids (Unicode, case, trailing dots), class lists, Kinetics CSVs,
unsafe names refused, everything found but not used listed, files readable without avfuse."""

from __future__ import annotations

import csv
import logging
import os
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from avfuse.config import apply_overrides
from avfuse.extract import ExtractConfig, extract, load_audio
from avfuse.io import write_table
from avfuse.manifest import (
    NO_LABEL,
    AnnotationError,
    ScanConfig,
    UnknownClassError,
    UnsafeNameError,
    load_classes,
    load_manifest,
    manifest_root,
    read_class_list,
    scan,
    write_class_list,
)
from avfuse.workdir import WorkDir
from tests.commands import one_line_error, run_avfuse
from tests.media import peak_frequency, write_tone_video


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not decoded by scan")


def test_ids_are_paths_without_extension(tmp_path) -> None:
    root = tmp_path / "k600"
    _touch(
        root,
        "val/abseiling/ZzW2b8ZfnHM_000060_000070.mp4",
        "train/abseiling/aaa_000001_000011.webm",
        "train/zumba/aaa_000001_000011.mkv",  # same stem, other class: another video
        "train/zumba/twin.mp4",
        "train/zumba/twin.avi",  # same stem, same folder: both keep their extension
        "train/zumba/take.2.mp4",  # only the extension is dropped
        "train/zumba/.hidden.mp4",
        "train/zumba/notes.txt",
        "test/unlabelled_clip.mp4",
    )
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert list(df.columns) == [
        "video_id",
        "split",
        "label",
        "label_index",
        "path",
        "size_bytes",
        "scan_status",
    ]
    assert list(df["video_id"]) == [
        "test/unlabelled_clip",
        "train/abseiling/aaa_000001_000011",
        "train/zumba/aaa_000001_000011",
        "train/zumba/take.2",
        "train/zumba/twin.avi",
        "train/zumba/twin.mp4",
        "val/abseiling/ZzW2b8ZfnHM_000060_000070",
    ]
    row = df.set_index("video_id").loc["val/abseiling/ZzW2b8ZfnHM_000060_000070"]
    assert (row.split, row.label, row.label_index, row.scan_status) == (
        "val",
        "abseiling",
        0,
        "found",
    )
    assert Path(row.path) == (root / "val/abseiling/ZzW2b8ZfnHM_000060_000070.mp4").resolve()
    assert row.size_bytes == len(b"not decoded by scan")
    test_row = df.set_index("video_id").loc["test/unlabelled_clip"]
    assert test_row.label is None and test_row.label_index == NO_LABEL
    assert load_classes(tmp_path / "w") == ["abseiling", "zumba"]


def test_manifest_is_readable_without_avfuse(tmp_path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/x.mp4", "train/b/y.mp4")
    scan(ScanConfig(root=root, work=tmp_path / "w"))
    table = pq.read_table(tmp_path / "w" / "manifest.parquet")
    assert table.column("video_id").to_pylist() == ["train/a/x", "train/b/y"]
    assert table.schema.metadata[b"root"].decode() == str(root.resolve())
    assert (tmp_path / "w" / "classes.txt").read_text("utf-8") == "a\nb\n"
    assert "root" in (tmp_path / "w" / "scan.toml").read_text("utf-8")
    assert manifest_root(tmp_path / "w") == str(root.resolve())


def test_non_ascii_names_and_unicode_normalisation(tmp_path) -> None:
    root = tmp_path / "d"
    nfd = unicodedata.normalize("NFD", "café crème")  # as macOS writes it
    _touch(root, f"train/{nfd}/vidéo 日本 1.mp4", "train/plain/x.mp4", f"val/{nfd}/z z.mp4")
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    nfc = "café crème"
    assert load_classes(tmp_path / "w") == sorted([nfc, "plain"])
    assert f"train/{nfc}/vidéo 日本 1" in set(df["video_id"])
    assert set(df.loc[df["split"] == "val", "label"]) == {nfc}
    assert all(Path(p).exists() for p in df["path"])


def test_class_only_in_val_is_an_error_naming_it(tmp_path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/x.mp4", "val/a/y.mp4", "val/surfing crowd/z.mp4")
    with pytest.raises(UnknownClassError, match="surfing crowd"):
        scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert not (tmp_path / "w" / "manifest.parquet").exists()


def test_classes_file_keeps_its_order(tmp_path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/playing ukulele/x.mp4", "val/abseiling/y.mp4", "val/zumba/z.mp4")
    # A Kinetics label map: names with spaces and parentheses, not sorted, BOM and blank line.
    labels = tmp_path / "labels.txt"
    labels.write_text(
        "\ufeffzumba\nabseiling\nplaying ukulele\npassing American football (in game)\n\n",
        "utf-8",
    )
    df = scan(ScanConfig(root=root, work=tmp_path / "w", classes=labels))
    expected = ["zumba", "abseiling", "playing ukulele", "passing American football (in game)"]
    assert load_classes(tmp_path / "w") == expected
    got = dict(zip(df["label"], df["label_index"]))
    assert got == {"playing ukulele": 2, "abseiling": 1, "zumba": 0}
    # A rescan with a different class list must not silently shift indices.
    other = tmp_path / "sorted.txt"
    other.write_text("".join(c + "\n" for c in sorted(expected)), "utf-8")
    with pytest.raises(ValueError, match="different class list"):
        scan(ScanConfig(root=root, work=tmp_path / "w", classes=other))
    assert load_classes(tmp_path / "w") == expected


def test_duplicated_names_in_a_class_file_are_refused(tmp_path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicated"):
        read_class_list(p)


def test_splits_filter(tmp_path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/x.mp4", "val/a/y.mp4", "test/z.mp4")
    df = scan(ScanConfig(root=root, work=tmp_path / "w", splits=("train", "val")))
    assert sorted(df["split"]) == ["train", "val"]


def _kinetics_csv(path: Path, rows: list[tuple[str, str, int, int, str]]) -> Path:
    lines = ["label,youtube_id,time_start,time_end,split"]
    for label, yt, t0, t1, split in rows:
        quoted = f'"{label}"' if "," in label or " " in label else label
        lines.append(f"{quoted},{yt},{t0},{t1},{split}")
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def test_kinetics_annotation_csv(tmp_path) -> None:
    root = tmp_path / "k"
    # Downloads lay files out as SPLIT/CLASS/ID_START_END.mp4 or flat; both are found.
    _touch(
        root,
        "train/abseiling/aaa_000010_000020.mp4",
        "train/passing American football (not in game)/bbb_000000_000010.mp4",
        "ccc_000005_000015.webm",
    )
    csv = _kinetics_csv(
        tmp_path / "train.csv",
        [
            ("abseiling", "aaa", 10, 20, "train"),
            ("passing American football (not in game)", "bbb", 0, 10, "train"),
            ("abseiling", "ccc", 5, 15, "train"),
            ("abseiling", "ddd", 30, 40, "train"),  # never downloaded
        ],
    )
    df = scan(ScanConfig(root=root, work=tmp_path / "w", annotations=csv)).set_index("video_id")
    assert load_classes(tmp_path / "w") == ["abseiling", "passing American football (not in game)"]
    assert df.loc["train/abseiling/aaa_000010_000020", "scan_status"] == "found"
    assert df.loc["train/abseiling/ccc_000005_000015", "path"].endswith("ccc_000005_000015.webm")
    assert (
        df.loc["train/passing American football (not in game)/bbb_000000_000010", "label_index"]
        == 1
    )
    missing = df.loc["train/abseiling/ddd_000030_000040"]
    assert (missing.scan_status, missing.path, missing.size_bytes) == ("missing", "", -1)


def test_extract_reports_missing_csv_rows(tmp_path) -> None:
    root = tmp_path / "k"
    write_tone_video(root / "train" / "abseiling" / "aaa_000010_000020.mp4", duration=0.5)
    csv = _kinetics_csv(
        tmp_path / "a.csv",
        [("abseiling", "aaa", 10, 20, "train"), ("abseiling", "zzz", 0, 10, "train")],
    )
    scan(ScanConfig(root=root, work=tmp_path / "w", annotations=csv))
    res = extract(ExtractConfig(work=tmp_path / "w", num_workers=0, progress=False))
    status = dict(zip(res.table["video_id"], res.table["status"]))
    assert status == {
        "train/abseiling/aaa_000010_000020": "ok",
        "train/abseiling/zzz_000000_000010": "missing",
    }


def test_load_manifest_joins_stage_tables_by_id(tmp_path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/x.mp4", "train/b/y.mp4")
    work = tmp_path / "w"
    scan(ScanConfig(root=root, work=work))
    # Rows in another order than the manifest: the join must use video_id, not position.
    write_table(
        pd.DataFrame({"video_id": ["train/b/y", "train/a/x"], "status": ["no_audio", "ok"]}),
        work / "extract.parquet",
    )
    df = load_manifest(work).set_index("video_id")
    assert df.loc["train/a/x", "status"] == "ok" and df.loc["train/b/y", "status"] == "no_audio"
    assert "status" not in load_manifest(work, stages=False)
    with pytest.raises(FileNotFoundError, match="avfuse scan"):
        load_manifest(tmp_path / "nowhere")


def test_the_scored_statuses_are_spelled_once_in_the_package() -> None:
    """Which feature statuses carry frames (and so scores) is one rule: a second spelling of
    the pair anywhere in ``src/avfuse`` could drift from it."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "avfuse"
    spelled = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(node.elts) == 2 and values == {"ok", "padded"}:
                    spelled.append(f"{path.relative_to(src)}:{node.lineno}")
    assert len(spelled) == 1 and spelled[0].startswith("manifest.py:"), spelled


# --------------------------------------------------------- ids, labels and names from hostile input


def _scan_warnings(work: Path) -> list[dict[str, str]]:
    import csv

    with open(work / "scan_warnings.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("pair", [("a", "a."), ("a", "a.."), ("cat/x", "cat./x")])
def test_ids_equal_but_for_trailing_dots_are_told_apart(
    tmp_path: Path, pair: tuple[str, str]
) -> None:
    from avfuse.manifest import ScanConfig, scan

    root = tmp_path / "data"
    paths = []
    for i, name in enumerate(pair):
        p = (
            root / "train" / f"{name}.mp4"
            if "/" in name
            else root / "train" / "cat" / f"{name}.mp4"
        )
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * 64)
        paths.append(str(p))
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "d.mp4").write_bytes(b"d" * 64)
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    ids = dict(zip(df["path"], df["video_id"], strict=True))
    assert set(paths) <= set(ids)
    # Windows and SMB drop trailing dots: the two ids must differ in more than those.
    keys = {"/".join(p.rstrip(". ") for p in ids[x].casefold().split("/")) for x in paths}
    assert len(keys) == 2, [ids[x] for x in paths]
    warned = {w["path"] for w in _scan_warnings(work) if w["kind"] == "id_collision"}
    assert set(paths) <= warned


def test_a_kinetics_clip_under_two_labels_keeps_each_labels_file_and_is_reported(
    tmp_path: Path,
) -> None:
    from avfuse.manifest import ScanConfig, scan

    root = tmp_path / "data"
    clip = "abc_000001_000011.mp4"
    for label in ("cat", "dog"):
        f = root / "train" / label / clip
        f.parent.mkdir(parents=True)
        f.write_bytes(label.encode() * 32)
    (root / "train" / "cat" / "other_000001_000011.mp4").write_bytes(b"o" * 64)
    ann = tmp_path / "train.csv"
    ann.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "cat,abc,1,11,train\ndog,abc,1,11,train\ncat,other,1,11,train\n",
        "utf-8",
    )
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work, annotations=(ann,)))
    abc = df[df["video_id"].str.contains("abc_")]
    assert sorted(abc["label"]) == ["cat", "dog"]
    for label, path in zip(abc["label"], abc["path"], strict=True):
        assert Path(path).read_bytes() == label.encode() * 32
    conflict = [w for w in _scan_warnings(work) if w["kind"] == "label_conflict"]
    assert [w["path"] for w in conflict] == [f"{ann}:3"]


@pytest.mark.parametrize(("start", "end"), [("1e300", "11"), ("5", "5"), ("12", "2"), ("1", "1e9")])
def test_kinetics_times_that_name_no_clip_are_refused_naming_the_line(
    tmp_path: Path, start: str, end: str
) -> None:
    from avfuse.manifest import AnnotationError, ScanConfig, scan

    root = tmp_path / "data"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "abc_000001_000011.mp4").write_bytes(b"x" * 64)
    ann = tmp_path / "train.csv"
    ann.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        f"cat,abc,1,11,train\ncat,abd,{start},{end},train\n",
        "utf-8",
    )
    with pytest.raises(AnnotationError, match=f"{ann}:3: time_"):
        scan(ScanConfig(root=root, work=tmp_path / "w", annotations=(ann,)))


@pytest.mark.parametrize("name", ["clip.mp4 ", "clip.mp4.", "clip.MP4 . "])
def test_a_media_file_with_a_mangled_extension_is_listed_not_silently_skipped(
    tmp_path: Path, name: str
) -> None:
    from avfuse.manifest import ScanConfig, scan

    root = tmp_path / "data"
    for rel in ("train/cat/a.mp4", "train/dog/b.mp4", f"train/dog/{name}"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 64)
    work = tmp_path / "w"
    scan(ScanConfig(root=root, work=work))
    warned = {w["path"]: w for w in _scan_warnings(work)}
    assert str(root / "train" / "dog" / name) in warned


def test_scan_warnings_csv_holds_no_terminal_escape(tmp_path: Path) -> None:
    from avfuse.manifest import ScanConfig, scan

    root = tmp_path / "data"
    for rel in ("train/cat/a.mp4", "train/dog/b.mp4", "train/dog/x\x1b[2Jy.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 64)
    work = tmp_path / "w"
    scan(ScanConfig(root=root, work=work))
    text = (work / "scan_warnings.csv").read_text("utf-8")
    assert "\x1b" not in text and "x\\x1b[2Jy.mp4" in text


# --------------------------------------------------------- files whose ids would meet, hidden files


NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def _video(path: Path, freq: float) -> Path:
    return write_tone_video(path, freq=freq, duration=0.6, rate=16000, channels=1, fps=2)


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
    warned = [w for w in _scan_warnings(work) if w["kind"] == "id_collision"]
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
    assert {w["kind"] for w in _scan_warnings(work)} == {"id_collision"}


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


def test_hidden_media_files_are_listed_not_silently_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    _video(root / "train" / "a" / ".secret.mp4", 700.0)
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0")  # not media: not a warning
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    assert list(df["video_id"]) == ["train/a/x"]
    warned = _scan_warnings(work)
    assert [(Path(w["path"]).name, w["kind"]) for w in warned] == [(".secret.mp4", "hidden")]


def test_hidden_folders_are_listed_not_made_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    _video(root / "train" / ".trash" / "old.mp4", 700.0)
    _video(root / "train" / "a" / ".ipynb_checkpoints" / "x-checkpoint.mp4", 440.0)
    work = tmp_path / "w"
    df = scan(ScanConfig(root=root, work=work))
    assert list(df["video_id"]) == ["train/a/x"] and set(df["label"]) == {"a"}
    warned = sorted((Path(w["path"]).name, w["kind"]) for w in _scan_warnings(work))
    assert warned == [(".ipynb_checkpoints", "hidden"), (".trash", "hidden")]


def _kinetics_rows(path: Path, rows: list[tuple[str, str, int, int, str]]) -> Path:
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
    table = _kinetics_rows(tmp_path / "train.csv", rows)
    with pytest.raises(AnnotationError, match=r"train\.csv:3: (label|split|empty split)"):
        scan(ScanConfig(root=root, work=tmp_path / "w", annotations=(table,)))
    args = ["--annotations", str(table)]
    out = run_avfuse(["scan", str(root), "-o", str(tmp_path / "w"), *args], tmp_path)
    assert "train.csv:3" in one_line_error(out)
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
    out = run_avfuse(["scan", str(root), "-o", str(tmp_path / "w"), *args], tmp_path)
    line = one_line_error(out)
    assert "named.pipe" in line and "not a regular file" in line


# ----------------------------------------------- unsafe names, what scan cannot use, Kinetics files


def _stub_files(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (len(rel) + 3))


def _files_outside(top: Path, work: Path) -> set[Path]:
    return {p for p in top.rglob("*") if not p.is_dir() and work not in p.parents}


def _kinetics_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("label", "../../evil"),
        ("label", "a/b"),
        ("label", "a\\b"),
        ("label", '"two\nlines"'),
        ("label", '"trailing "'),
        ("split", "../x"),
        ("split", "train/../../x"),
        ("youtube_id", "../../../tmp/x"),
        ("youtube_id", '" lead"'),
    ],
)
def test_csv_names_that_could_leave_work_are_refused(
    tmp_path: Path, column: str, value: str
) -> None:
    root = tmp_path / "k"
    _stub_files(root, "train/abseiling/aaaaaaaaaaa_000010_000020.mp4")
    row = {"label": "abseiling", "youtube_id": "aaaaaaaaaaa", "split": "train"}
    row[column] = value
    csv_path = _kinetics_lines(
        tmp_path / "train.csv",
        [
            "label,youtube_id,time_start,time_end,split",
            "abseiling,aaaaaaaaaaa,10,20,train",
            f"{row['label']},{row['youtube_id']},10,20,{row['split']}",
        ],
    )
    work = tmp_path / "work"
    before = _files_outside(tmp_path, work)
    with pytest.raises(AnnotationError, match=rf"train\.csv:3: {column}") as err:
        scan(ScanConfig(root=root, work=work, annotations=(csv_path,)))
    assert "\n" not in str(err.value).replace("\\n", "")
    assert not (work / "manifest.parquet").exists()
    assert _files_outside(tmp_path, work) == before


def test_class_folder_with_a_newline_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/ok/x.mp4", "train/bad\nname/y.mp4")
    with pytest.raises(UnsafeNameError, match="control characters or line breaks"):
        scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert not (tmp_path / "w" / "classes.txt").exists()


def test_trailing_space_in_a_class_folder_is_refused_on_every_scan(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/jogging /x.mp4", "train/walking/y.mp4")
    messages = []
    for _ in range(2):
        with pytest.raises(UnsafeNameError, match="jogging ") as err:
            scan(ScanConfig(root=root, work=tmp_path / "w"))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "whitespace" in messages[0]


def test_unsafe_file_names_are_listed_not_lost(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/a/good.mp4", "train/a/bad\tname.mp4", "train/a/back\\slash.mp4")
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert list(df["video_id"]) == ["train/a/good"]
    warned = pd.read_csv(WorkDir(tmp_path / "w").scan_warnings)
    assert sorted(Path(p).name for p in warned.loc[warned["kind"] == "unsafe_name", "path"]) == [
        "back\\slash.mp4",
        "bad\tname.mp4",
    ]


def test_class_list_file_cannot_be_corrupted(tmp_path: Path) -> None:
    for bad in (["a", "b\nc"], ["a", "b\u2028c"], ["a", " b"], ["a", ""]):
        with pytest.raises(ValueError, match="one a line"):
            write_class_list(tmp_path / "classes.txt", bad)
        assert not (tmp_path / "classes.txt").exists()


def _warning_kinds(work: Path) -> dict[str, str]:
    with open(WorkDir(work).scan_warnings, newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r["kind"] for r in csv.DictReader(fh)}


def test_symlinked_split_and_class_folders_are_followed_without_loops(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _stub_files(elsewhere, "val_store/a/v1.mp4", "class_b/t2.mp4", "class_b/t3.mp4")
    root = tmp_path / "d"
    _stub_files(root, "train/a/t1.mp4")
    (root / "val").symlink_to(elsewhere / "val_store", target_is_directory=True)
    (root / "train" / "b").symlink_to(elsewhere / "class_b", target_is_directory=True)
    (root / "train" / "a" / "again").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "a" / "self").symlink_to(root / "train" / "a", target_is_directory=True)

    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert list(df["video_id"]) == ["train/a/t1", "train/b/t2", "train/b/t3", "val/a/v1"]
    sizes = dict(zip(df["video_id"], df["size_bytes"], strict=True))
    assert sizes["train/b/t2"] == (elsewhere / "class_b/t2.mp4").stat().st_size
    assert Path(df.set_index("video_id").loc["train/b/t3", "path"]).read_bytes()
    assert _warning_kinds(tmp_path / "w") == {"again": "symlink_loop", "self": "symlink_loop"}


def test_scan_reports_what_it_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "d"
    _stub_files(
        root, "train/a/ok.mp4", "train/a/clip.mp4/frame0.jpg", "train/locked/x.mp4", "stray.mp4"
    )
    (root / "train" / "a" / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    os.mkfifo(root / "train" / "a" / "pipe.mp4")
    locked = str(root / "train" / "locked")
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == locked:  # permissions do not bind root, so refuse it here
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="avfuse.manifest"):
        df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert list(df["video_id"]) == ["train/a/ok"]
    assert _warning_kinds(tmp_path / "w") == {
        "gone.mp4": "dangling_symlink",
        "pipe.mp4": "fifo",
        "clip.mp4": "folder_named_like_media",
        "locked": "unreadable_folder",
        "stray.mp4": "outside_split",
    }
    assert df.attrs["scan_warnings"] and len(df.attrs["scan_warnings"]) == 5
    assert any("5 scan warning(s)" in r.getMessage() for r in caplog.records)


def test_each_file_is_stat_ed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "d"
    rels = [f"train/c{i % 3}/v{i}.mp4" for i in range(12)]
    _stub_files(root, *rels)
    calls: list[str] = []
    real_stat, real_path_stat = os.stat, Path.stat

    def counting_stat(path: Any, *a: Any, **k: Any) -> os.stat_result:
        calls.append(os.fspath(path))
        return real_stat(path, *a, **k)

    def counting_path_stat(self: Path, *a: Any, **k: Any) -> os.stat_result:
        calls.append(str(self))
        return real_path_stat(self, *a, **k)

    monkeypatch.setattr(os, "stat", counting_stat)
    monkeypatch.setattr(Path, "stat", counting_path_stat)
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    monkeypatch.undo()
    media = [c for c in calls if c.endswith(".mp4")]
    # The only stat of a media file is the one os.scandir's entry caches (not seen here).
    assert media == []
    want = {r[:-4]: (root / r).stat().st_size for r in rels}
    assert dict(zip(df["video_id"], df["size_bytes"], strict=True)) == want


def test_work_folder_inside_the_dataset_is_not_scanned(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/a/x.mp4", "work/audio/train/a/x.flac")
    df = scan(ScanConfig(root=root, work=root / "work"))
    assert list(df["video_id"]) == ["train/a/x"]
    assert _warning_kinds(root / "work") == {"work": "work_folder"}


def test_kinetics_annotation_files_as_distributed(tmp_path: Path) -> None:
    root = tmp_path / "k700"
    _stub_files(
        root,
        "train/abseiling/aaaaaaaaaaa_000010_000020.mp4",
        "train/air drumming/bbbbbbbbbbb_000000_000010.mp4",
        "validate/abseiling/ccccccccccc_000005_000015.mp4",
        "test/ddddddddddd_000001_000011.mp4",
    )
    train = _kinetics_lines(
        tmp_path / "train.csv",
        [
            "label,youtube_id,time_start,time_end,split,is_cc",
            "abseiling,aaaaaaaaaaa,10,20,train,0",
            "air drumming,bbbbbbbbbbb,0,10,train,1",
        ],
    )
    # validate + test concatenated with `cat`: a second header, without the label column.
    both = _kinetics_lines(
        tmp_path / "val_and_test.csv",
        [
            "label,youtube_id,time_start,time_end,split",
            "abseiling,ccccccccccc,5.0,15.0,validate",
            "abseiling,eeeeeeeeeee,0,10,validate",
            "",
            "youtube_id,time_start,time_end,split",
            "ddddddddddd,1,11,test",
            "label,youtube_id,time_start,time_end,split",
            "air drumming,fffffffffff,3,13,validate",
        ],
    )
    df = scan(ScanConfig(root=root, work=tmp_path / "w", annotations=(train, both)))
    got = df.set_index("video_id")
    assert sorted(got.index) == [
        "test/ddddddddddd_000001_000011",
        "train/abseiling/aaaaaaaaaaa_000010_000020",
        "train/air drumming/bbbbbbbbbbb_000000_000010",
        "val/abseiling/ccccccccccc_000005_000015",
        "val/abseiling/eeeeeeeeeee_000000_000010",
        "val/air drumming/fffffffffff_000003_000013",
    ]
    assert load_classes(tmp_path / "w") == ["abseiling", "air drumming"]
    assert got.loc["val/abseiling/ccccccccccc_000005_000015", "path"] == str(
        root / "validate/abseiling/ccccccccccc_000005_000015.mp4"
    )
    assert got.loc["val/abseiling/eeeeeeeeeee_000000_000010", "scan_status"] == "missing"
    test_row = got.loc["test/ddddddddddd_000001_000011"]
    assert (test_row.split, test_row.label, test_row.label_index) == ("test", None, -1)
    assert test_row.scan_status == "found"


def test_split_aliases_are_configurable(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/a/x.mp4", "dev/a/y.mp4", "validate/a/z.mp4")
    cfg = apply_overrides(
        ScanConfig(root=root, work=tmp_path / "w"), ['split_aliases={dev = "val"}']
    )
    df = scan(cfg)
    assert dict(zip(df["video_id"], df["split"], strict=True)) == {
        "dev/a/y": "val",
        "train/a/x": "train",
        "validate/a/z": "validate",  # the default map was replaced, not merged
    }


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        (["label,youtube_id,time_start,split", "a,aaaaaaaaaaa,1,train"], 1, "time_end"),
        (["label,youtube_id,time_start,time_end,split", "a,aaaaaaaaaaa,,10,train"], 2, "empty"),
        (
            ["label,youtube_id,time_start,time_end,split", "a,b,1,2,train", "a,c,x1,10,train"],
            3,
            "not a number",
        ),
        (["label,youtube_id,time_start,time_end,split", "a,b,1,nan,train"], 2, "time_end"),
        (["label,youtube_id,time_start,time_end,split", "a,bbbbbbbbbbb,1"], 2, "fields"),
        (["a,bbbbbbbbbbb,1,2,train"], 1, "header"),
    ],
)
def test_malformed_kinetics_csv_names_file_and_line(
    tmp_path: Path, lines: list[str], line: int, reason: str
) -> None:
    root = tmp_path / "d"
    root.mkdir()
    csv_path = _kinetics_lines(tmp_path / "kinetics700_train.csv", lines)
    with pytest.raises(AnnotationError, match=rf"kinetics700_train\.csv:{line}: .*{reason}"):
        scan(ScanConfig(root=root, work=tmp_path / "w", annotations=(csv_path,)))


def test_scan_with_a_label_map_matches_underscored_folders(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/air_drumming/x.mp4", "train/Abseiling/y.mp4", "val/air_drumming/z.mp4")
    label_map = tmp_path / "label_map_k400.txt"
    label_map.write_text("abseiling\nair drumming\nzumba\n", "utf-8")
    df = scan(ScanConfig(root=root, work=tmp_path / "w", classes=label_map))
    got = {v: (lab, i) for v, lab, i in zip(df["video_id"], df["label"], df["label_index"])}
    assert got == {
        "train/Abseiling/y": ("abseiling", 0),
        "train/air_drumming/x": ("air drumming", 1),
        "val/air_drumming/z": ("air drumming", 1),
    }
    assert load_classes(tmp_path / "w") == ["abseiling", "air drumming", "zumba"]


def test_classes_differing_only_in_case_stay_distinct(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/Jogging/x.mp4", "train/jogging/y.mp4", "val/jogging/z.mp4")
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    got = dict(zip(df["video_id"], df["label_index"], strict=True))
    assert load_classes(tmp_path / "w") == ["Jogging", "jogging"]
    assert got == {"train/Jogging/x": 0, "train/jogging/y": 1, "val/jogging/z": 1}
    # A map with only one of the two cannot give both folders one class.
    one = tmp_path / "one.txt"
    one.write_text("jogging\n", "utf-8")
    with pytest.raises(UnknownClassError, match="'Jogging'"):
        scan(ScanConfig(root=root, work=tmp_path / "w2", classes=one))


def test_audio_only_dataset_is_scanned_by_default(tmp_path: Path) -> None:
    root = tmp_path / "esc"
    exts = ["wav", "flac", "mp3", "ogg", "opus", "m4a"]
    _stub_files(root, *[f"train/dog/d.{e}" for e in exts], "val/dog/v.wav")
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert sorted(df["video_id"]) == sorted([f"train/dog/d.{e}" for e in exts] + ["val/dog/v"])


def test_no_files_found_names_the_extensions_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _stub_files(root, "train/a/x.aiff")
    cfg = ScanConfig(root=root, work=tmp_path / "w")
    with pytest.raises(ValueError, match=r"\.wav.*--set 'extensions=") as err:
        scan(cfg)
    assert ".mp4" in str(err.value) and ".aiff" not in str(err.value)
    df = scan(apply_overrides(cfg, ['extensions=[".aiff"]']))
    assert list(df["video_id"]) == ["train/a/x"]
