"""The manifest: video ids, class lists, Kinetics CSV mode, and files readable without avfuse."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from avfuse.extract import ExtractConfig, extract
from avfuse.io import write_table
from avfuse.manifest import (
    NO_LABEL,
    ScanConfig,
    UnknownClassError,
    load_classes,
    load_manifest,
    manifest_root,
    read_class_list,
    scan,
)
from tests.media import write_tone_video


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
