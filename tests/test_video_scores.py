"""Readers of external video score formats, id normalisation and id / class alignment; every
read bounded before it allocates."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.scores import ScoreFile
from avfuse.video_scores import (
    AmbiguousIdError,
    ScoreBounds,
    VideoScoreError,
    align_classes,
    check_finite,
    match_ids,
    normalize_class,
    normalize_id,
    read_annotation_ids,
    read_label_map,
    read_one,
    read_video_scores,
)
from tests.test_safe_pickle import _dump_items

CLASSES = ["abseiling", "air drumming", "playing bass guitar", "tai chi", "zumba"]
YT = ["ZzW2b8ZfnHM", "-a_b-c_d-ef", "AAAAAAAAAAA", "v_bcdefghij", "0123456789_"]


def manifest_ids(split: str = "val") -> list[str]:
    """Our video_ids for five Kinetics clips, one per class."""
    return [
        f"{split}/{c}/{yt}_{10 * i:06d}_{10 * i + 10:06d}"
        for i, (c, yt) in enumerate(zip(CLASSES, YT, strict=True))
    ]


def truth(seed: int = 0) -> np.ndarray:
    """(5, 5) scores; row i belongs to manifest_ids()[i], column j to CLASSES[j]."""
    return np.random.default_rng(seed).normal(size=(5, 5)).round(4)


def aligned(vs, target: list[str], classes: list[str] = CLASSES) -> np.ndarray:
    """Read-back scores in target-row / class-list order, via the public matching API."""
    m = match_ids(target, vs.ids)
    assert (m.rows >= 0).all(), m.report()
    al = align_classes(vs.classes, classes, n_columns=vs.scores.shape[1], source=vs.source)
    return vs.scores[m.rows][:, al.columns]


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "spelling",
    [
        "abseiling/ZzW2b8ZfnHM_000060_000070.mp4",
        "ZzW2b8ZfnHM_60_70",
        "ZzW2b8ZfnHM_000060_000070",
        "val/abseiling/ZzW2b8ZfnHM_000060_000070",
        "/data/kinetics400/val/abseiling/ZzW2b8ZfnHM_000060_000070.mkv",
        "C:\\k400\\val\\abseiling\\ZzW2b8ZfnHM_000060_000070.webm",
        "v_ZzW2b8ZfnHM_000060_000070",
        "ZzW2b8ZfnHM_0060_70.avi",
    ],
)
def test_normalize_id_kinetics_spellings(spelling: str) -> None:
    assert normalize_id(spelling) == "ZzW2b8ZfnHM_000060_000070"


def test_normalize_id_keeps_what_identifies() -> None:
    # Underscores and dashes inside the 11-character YouTube id survive.
    assert normalize_id("x/-a_b-c_d-ef_1_11.mp4") == "-a_b-c_d-ef_000001_000011"
    # A YouTube id that itself starts with v_ is not stripped.
    assert normalize_id("v_bcdefghij_000030_000040") == "v_bcdefghij_000030_000040"
    # Non-Kinetics names (UCF101 style) lose directory, extension and v_ prefix only.
    assert normalize_id("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi") == "ApplyEyeMakeup_g08_c01"
    # Different times are different clips.
    assert normalize_id("ZzW2b8ZfnHM_60_70") != normalize_id("ZzW2b8ZfnHM_70_80")


def test_normalize_class() -> None:
    assert normalize_class("Playing_Bass_Guitar ") == normalize_class("playing  bass guitar")
    assert normalize_class('"tai chi"') == "tai chi"


def test_match_ids_shuffled_and_respelled() -> None:
    target = manifest_ids()
    src = [
        "zumba/0123456789__40_50.mp4",
        "ZzW2b8ZfnHM_000000_000010",
        "v_bcdefghij_30_40.webm",
        "air drumming/-a_b-c_d-ef_000010_000020.mp4",
        "AAAAAAAAAAA_20_30",
    ]
    m = match_ids(target, src)
    assert m.rows.tolist() == [1, 3, 4, 2, 0]
    assert m.counts() == {"matched": 5, "missing": 0, "extra": 0, "duplicates": 0}
    assert not m.exact


def test_match_ids_reports_missing_extra_duplicates() -> None:
    target = manifest_ids()
    src = ["ZzW2b8ZfnHM_0_10", "ZzW2b8ZfnHM_000000_000010.mp4", "nope_1_2", "AAAAAAAAAAA_20_30"]
    m = match_ids(target, src)
    assert m.rows.tolist() == [0, -1, 3, -1, -1]
    assert m.duplicates == ["ZzW2b8ZfnHM_000000_000010.mp4"]
    assert m.extra == ["nope_1_2"]
    assert m.missing == [target[1], target[3], target[4]]
    with pytest.raises(VideoScoreError) as err:
        m.check(0.1, "the video scores", "video.csv")
    msg = str(err.value)
    assert msg.startswith("video.csv:")
    assert "3 videos of the split without a row" in msg and "1 duplicated ids" in msg
    # Within tolerance: no error.
    m.check(0.7, "the video scores", "video.csv")


def test_ambiguous_manifest_ids() -> None:
    target = ["val/a/ZzW2b8ZfnHM_000060_000070", "val/b/ZzW2b8ZfnHM_000060_000070", "val/a/x"]
    with pytest.raises(AmbiguousIdError, match=r"val/a/ZzW2b8ZfnHM_000060_000070 / val/b/"):
        match_ids(target, ["ZzW2b8ZfnHM_60_70", "x"])
    # Full ids need no normalisation, so the two clips stay apart.
    m = match_ids(target, [target[1], target[0]])
    assert m.exact and m.rows.tolist() == [1, 0, -1]


# --------------------------------------------------------------------------- classes


def test_align_classes_by_name() -> None:
    src = ["Zumba", "tai_chi", "abseiling", "Playing Bass Guitar", "air drumming"]
    al = align_classes(src, CLASSES, n_columns=5, source="s")
    assert al.columns.tolist() == [2, 4, 3, 1, 0]
    assert al.by_name


def test_align_classes_mismatch() -> None:
    src = ["abseiling", "air drumming", "playing bass guitar", "tai chi", "yodelling"]
    with pytest.raises(VideoScoreError, match=r"s\.csv: 1 class\(es\).*zumba.*yodelling"):
        align_classes(src, CLASSES, n_columns=5, source="s.csv")
    al = align_classes(src, CLASSES, n_columns=5, source="s.csv", tolerance=1)
    assert al.columns.tolist() == [0, 1, 2, 3, -1]
    assert al.missing == ["zumba"] and al.extra == ["yodelling"]


def test_align_unnamed_columns() -> None:
    al = align_classes(None, CLASSES, n_columns=5, source="s")
    assert al.columns.tolist() == [0, 1, 2, 3, 4] and not al.by_name
    with pytest.raises(VideoScoreError, match=r"s.npy: 4 score columns but 5 classes"):
        align_classes(None, CLASSES, n_columns=4, source="s.npy")


# --------------------------------------------------------------------------- readers

PERM_ROWS = [3, 0, 4, 1, 2]
PERM_COLS = [2, 4, 0, 3, 1]


def shuffled() -> tuple[list[str], list[str], np.ndarray]:
    """Rows shuffled, class columns permuted, ids spelled like other tools spell them."""
    ids = [
        f"{CLASSES[i]}/{manifest_ids()[i].rsplit('/', 1)[1]}.mp4".replace(" ", "_")
        for i in PERM_ROWS
    ]
    cls = [CLASSES[j] for j in PERM_COLS]
    return ids, cls, truth()[PERM_ROWS][:, PERM_COLS]


def test_read_our_score_file(tmp_path: Path) -> None:
    _, cls, s = shuffled()
    ids = [manifest_ids()[i] for i in PERM_ROWS]
    p = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    status = np.array(["ok"] * 5)
    status[1] = "no_audio"
    p[1] = np.nan
    ScoreFile(np.array(ids), cls, p, np.ones(5), status).save(tmp_path / "v.npz")
    vs = read_one(tmp_path / "v.npz")
    assert vs.kind == "probs" and len(vs.ids) == 4
    m = match_ids(manifest_ids(), vs.ids)
    assert m.missing == [manifest_ids()[PERM_ROWS[1]]]
    al = align_classes(vs.classes, CLASSES, n_columns=5, source="x")
    want = np.exp(truth()) / np.exp(truth()).sum(1, keepdims=True)
    got = vs.scores[m.rows[m.rows >= 0]][:, al.columns]
    np.testing.assert_allclose(got, want[m.rows >= 0], rtol=1e-6)


def test_read_npz_with_ids_and_classes(tmp_path: Path) -> None:
    ids, cls, s = shuffled()
    np.savez(tmp_path / "v.npz", logits=s, video_ids=np.array(ids), classes=np.array(cls))
    vs = read_one(tmp_path / "v.npz")
    assert vs.kind == "logits"
    np.testing.assert_array_equal(aligned(vs, manifest_ids()), truth())


def test_read_npz_unnamed_with_id_list(tmp_path: Path) -> None:
    ids, _, _ = shuffled()
    s = truth()[PERM_ROWS]  # unnamed columns: class-list order
    np.savez(tmp_path / "v.npz", s)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n\n")
    with pytest.raises(VideoScoreError, match=r"does not list its videos"):
        read_one(tmp_path / "v.npz")
    vs = read_one(tmp_path / "v.npz", ids_file=tmp_path / "ids.txt")
    assert vs.classes is None
    np.testing.assert_array_equal(aligned(vs, manifest_ids()), truth())


def test_read_npy_with_mmaction_list_and_label_map(tmp_path: Path) -> None:
    _, cls, s = shuffled()
    np.save(tmp_path / "v.npy", s.astype(np.float32))
    # mmaction2 video list "path label", with the blanks of Kinetics class folders.
    lines = [f"{CLASSES[i]}/{manifest_ids()[i].rsplit('/', 1)[1]}.mp4 {i}" for i in PERM_ROWS]
    (tmp_path / "val_list.txt").write_text("\n".join(lines))
    (tmp_path / "label_map.txt").write_text("\n".join(cls))
    vs = read_one(
        tmp_path / "v.npy", ids_file=tmp_path / "val_list.txt", label_map=tmp_path / "label_map.txt"
    )
    np.testing.assert_allclose(aligned(vs, manifest_ids()), truth(), rtol=1e-6)


def test_read_npy_with_kinetics_csv(tmp_path: Path) -> None:
    s = truth()[PERM_ROWS]
    np.save(tmp_path / "v.npy", s)
    rows = []
    for i in PERM_ROWS:
        yt, start, end = manifest_ids()[i].rsplit("/", 1)[1].rsplit("_", 2)
        rows.append(
            {
                "label": CLASSES[i],
                "youtube_id": yt,
                "time_start": int(start),
                "time_end": int(end),
                "split": "val",
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "validate.csv", index=False)
    vs = read_one(tmp_path / "v.npy", ids_file=tmp_path / "validate.csv")
    np.testing.assert_array_equal(aligned(vs, manifest_ids()), truth())


def test_read_annotation_ids_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("air drumming/x.mp4 300 1\nb/y.mp4 2\nzz\n")
    assert read_annotation_ids(tmp_path / "a.txt") == ["air drumming/x.mp4", "b/y.mp4", "zz"]
    (tmp_path / "b.csv").write_text("video_id,label\nval/a/x,a\nval/b/y,b\n")
    assert read_annotation_ids(tmp_path / "b.csv") == ["val/a/x", "val/b/y"]
    (tmp_path / "m.txt").write_text("0 abseiling\n1 air drumming\n")
    assert read_label_map(tmp_path / "m.txt") == ["abseiling", "air drumming"]


def test_read_csv_wide(tmp_path: Path) -> None:
    ids, cls, s = shuffled()
    df = pd.DataFrame(s, columns=cls)
    df.insert(0, "video", ids)
    df.to_csv(tmp_path / "v.csv", index=False)
    np.testing.assert_allclose(aligned(read_one(tmp_path / "v.csv"), manifest_ids()), truth())
    df.to_csv(tmp_path / "v.tsv", index=False, sep="\t")
    np.testing.assert_allclose(aligned(read_one(tmp_path / "v.tsv"), manifest_ids()), truth())


def test_read_csv_long(tmp_path: Path) -> None:
    ids, cls, s = shuffled()
    rows = [(i, c, s[r, k]) for r, i in enumerate(ids) for k, c in enumerate(cls)]
    rows = [rows[j] for j in np.random.default_rng(1).permutation(len(rows))]
    pd.DataFrame(rows, columns=["video_id", "class", "score"]).to_csv(
        tmp_path / "v.csv", index=False
    )
    vs = read_one(tmp_path / "v.csv")
    np.testing.assert_allclose(aligned(vs, manifest_ids()), truth())
    # A missing (id, class) pair is an error, not a zero.
    pd.DataFrame(rows[:-1], columns=["video_id", "class", "score"]).to_csv(
        tmp_path / "w.csv", index=False
    )
    with pytest.raises(VideoScoreError, match=r"w.csv: long-format CSV lacks 1"):
        read_one(tmp_path / "w.csv")


def test_read_mmaction_pickles(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ids, _, _ = shuffled()
    s = truth()[PERM_ROWS]
    (tmp_path / "list.txt").write_text("\n".join(f"{i} 0" for i in ids))
    with open(tmp_path / "arrays.pkl", "wb") as fh:
        pickle.dump([row.astype(np.float32) for row in s], fh)
    with open(tmp_path / "dicts.pkl", "wb") as fh:
        pickle.dump(
            [{"pred_score": torch.tensor(row), "pred_label": torch.tensor([0])} for row in s], fh
        )
    for name in ("arrays.pkl", "dicts.pkl"):
        vs = read_one(tmp_path / name, ids_file=tmp_path / "list.txt")
        np.testing.assert_allclose(aligned(vs, manifest_ids()), truth(), rtol=1e-6)


def test_pickle_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump([Evil()], fh)
    with pytest.raises(VideoScoreError, match=r"refusing to load builtins.print"):
        read_one(tmp_path / "evil.pkl", ids_file=tmp_path / "x")


def test_several_parts_with_different_column_orders(tmp_path: Path) -> None:
    ids, cls, s = shuffled()
    pd.DataFrame(s[:2], columns=cls).assign(id=ids[:2]).to_csv(tmp_path / "a.csv", index=False)
    rev = cls[::-1]
    pd.DataFrame(s[2:, ::-1], columns=rev).assign(id=ids[2:]).to_csv(
        tmp_path / "b.csv", index=False
    )
    vs = read_video_scores([tmp_path / "a.csv", tmp_path / "b.csv"])
    np.testing.assert_allclose(aligned(vs, manifest_ids()), truth())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["v.csv", "v.npz", "v.npy", "v.pkl"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(VideoScoreError, match=rf"{name}: empty file"):
        read_one(tmp_path / name)


def test_header_only_csv_and_empty_array(tmp_path: Path) -> None:
    (tmp_path / "v.csv").write_text("video_id,abseiling\n")
    with pytest.raises(VideoScoreError, match=r"v.csv: CSV has a header but no rows"):
        read_one(tmp_path / "v.csv")
    np.save(tmp_path / "e.npy", np.zeros((0, 5)))
    (tmp_path / "ids.txt").write_text("a\n")
    with pytest.raises(VideoScoreError, match=r"e\.npy: no score rows \(empty file\)"):
        read_one(tmp_path / "e.npy", ids_file=tmp_path / "ids.txt")


def test_non_numeric_and_nonfinite_scores(tmp_path: Path) -> None:
    (tmp_path / "v.csv").write_text("video_id,a,b\nx,0.5,oops\ny,0.1,0.9\n")
    with pytest.raises(VideoScoreError, match=r"v.csv: 1 non-numeric scores \(e.g. 'oops'"):
        read_one(tmp_path / "v.csv")
    (tmp_path / "w.csv").write_text("video_id,a,b\nx,0.5,nan\ny,0.1,inf\nz,1,2\n")
    vs = read_one(tmp_path / "w.csv")
    with pytest.raises(VideoScoreError, match=r"w.csv: 2 row\(s\) with NaN or infinite .*'x'"):
        check_finite(vs.scores, vs.ids, vs.source)


def test_wrong_column_count(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros((2, 4)))
    (tmp_path / "ids.txt").write_text("a\nb\n")
    (tmp_path / "map.txt").write_text("\n".join(CLASSES))
    with pytest.raises(VideoScoreError, match=r"v.npy: 4 score columns but 5 classes in the label"):
        read_one(tmp_path / "v.npy", ids_file=tmp_path / "ids.txt", label_map=tmp_path / "map.txt")
    (tmp_path / "v.csv").write_text("video_id,a,b\nx,1,2,3\n")
    with pytest.raises(VideoScoreError, match=r"v.csv: line 2 has 4 fields, the header has 3"):
        read_one(tmp_path / "v.csv")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoScoreError, match=r"nothere.csv: file not found"):
        read_one(tmp_path / "nothere.csv")
    (tmp_path / "v.json").write_text("{}")
    with pytest.raises(VideoScoreError, match=r"unknown score file type .json"):
        read_one(tmp_path / "v.json")


def test_wide_csv_values_labels_and_status(tmp_path: Path) -> None:
    # Values as written (repr of float64), blanks around a cell, a status column filtering
    # rows and a gt_label column giving labels: read back exactly.
    rng = np.random.default_rng(9)
    s = rng.normal(size=(6, 5)) * 10.0 ** rng.integers(-5, 5, size=(6, 5))
    lines = ["video_id,status,gt_label," + ",".join(CLASSES)]
    for i in range(6):
        cells = [repr(float(x)) for x in s[i]]
        cells[1] = f" {cells[1]} "
        lines.append(f"v{i},{'ok' if i != 3 else 'error'},{i % 5}," + ",".join(cells))
    (tmp_path / "w.csv").write_text("\n".join(lines) + "\n")
    vs = read_one(tmp_path / "w.csv")
    keep = [0, 1, 2, 4, 5]
    assert vs.ids == [f"v{i}" for i in keep] and vs.classes == CLASSES
    np.testing.assert_array_equal(vs.scores, s[keep])
    assert vs.labels is not None and vs.labels.index is not None
    assert vs.labels.index.tolist() == [i % 5 for i in keep]


def test_annotation_labels_and_dump_gt_labels(tmp_path: Path) -> None:
    from avfuse.video_scores import read_annotations

    (tmp_path / "list.txt").write_text(
        "air drumming/a_1.mp4 3\nzumba/b.mp4 120 4\nabseiling/c.mp4 0\n"
    )
    ids, lab = read_annotations(tmp_path / "list.txt")
    assert ids == ["air drumming/a_1.mp4", "zumba/b.mp4", "abseiling/c.mp4"]
    assert lab is not None and lab.index is not None and lab.index.tolist() == [3, 4, 0]
    (tmp_path / "plain.txt").write_text("a\nb\nc\n")
    assert read_annotations(tmp_path / "plain.txt")[1] is None
    (tmp_path / "multi.txt").write_text("a.mp4 1,2\nb.mp4 0\nc.mp4 3\n")
    assert read_annotations(tmp_path / "multi.txt")[1] is None
    items = [
        {"pred_score": np.arange(5, dtype=np.float32), "gt_label": np.array([k])} for k in (2, 0, 1)
    ]
    with open(tmp_path / "d.pkl", "wb") as fh:
        pickle.dump(items, fh)
    vs = read_one(tmp_path / "d.pkl", ids_file=tmp_path / "list.txt")
    # The dump's own gt_label wins over the list's labels: it travels with the score rows.
    assert vs.labels is not None and vs.labels.index is not None
    assert vs.labels.index.tolist() == [2, 0, 1] and vs.labels.source.endswith("d.pkl")


def test_align_classes_one_rule_for_case_and_underscores() -> None:
    classes = ["Jogging", "jogging", "air drumming"]
    al = align_classes(["air_drumming", "jogging", "Jogging"], classes, n_columns=3, source="s")
    assert al.columns.tolist() == [2, 1, 0] and not al.missing and not al.extra
    with pytest.raises(VideoScoreError, match="duplicated class names"):
        align_classes(["a", "a", "b"], ["a", "b", "c"], n_columns=3, source="s")


def test_csv_rows_of_padded_short_clips_are_kept(tmp_path: Path) -> None:
    # A scores CSV written by avfuse itself: short clips are scored with status ``padded``;
    # only rows whose status carries no score are left out.
    statuses = ["ok", "padded", "no_audio", "silent", "padded"]
    lines = ["video_id,status," + ",".join(CLASSES)]
    for i, st in enumerate(statuses):
        cells = ["" if st in ("no_audio", "silent") else str(0.1 * (i + j)) for j in range(5)]
        lines.append(f"v{i},{st}," + ",".join(cells))
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    vs = read_one(tmp_path / "a.csv")
    assert vs.ids == ["v0", "v1", "v4"]
    np.testing.assert_allclose(vs.scores[1], [0.1 * (1 + j) for j in range(5)])
    # A blank cell in a row whose status says it has scores is refused, naming the row.
    lines[2] = lines[2].replace(str(0.1 * 3), "", 1)
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(VideoScoreError, match="data row 2"):
        read_one(tmp_path / "b.csv")


# --------------------------------------------------------------- reads bounded before they allocate


def _npy_header_only(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """An .npy stream declaring ``shape`` followed by a few bytes: what a compressed bomb's
    first kilobyte looks like (its zeros need not be written for the header to be read)."""
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(64)


@pytest.mark.parametrize(
    ("shape", "bounds", "says"),
    [
        ((1 << 20, 400), ScoreBounds.for_dataset(100, 400), "rows"),
        ((50, 1 << 20), ScoreBounds.for_dataset(100, 400), "columns"),
        ((10, 1 << 20), ScoreBounds(), "columns"),
    ],
)
@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_score_arrays_are_bounded_from_their_header(
    tmp_path: Path, shape: tuple[int, int], bounds: ScoreBounds, says: str, kind: str
) -> None:
    path = tmp_path / f"scores.{kind}"
    if kind == "npz":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("ids.npy", _npy_header_only((shape[0],), "<U8"))
            zf.writestr("scores.npy", _npy_header_only(shape))
    else:
        path.write_bytes(_npy_header_only(shape))
    with pytest.raises(VideoScoreError, match=f"declares shape .*{says}") as info:
        read_one(path, ids_file=tmp_path / "ids.txt", bounds=bounds)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_score_npz_with_long_strings_or_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ids.npy", _npy_header_only((10,), "<U100000000"))
        zf.writestr("scores.npy", _npy_header_only((10, 3)))
    with pytest.raises(VideoScoreError, match="strings over"):
        read_one(path)


def test_csv_with_a_huge_cell_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    rows = ["video_id,a,b"] + [f"v{i},0.1,0.9" for i in range(1500)]
    rows[1200] = "v1199," + "9" * (5 << 20) + ",0.5"
    path.write_text("\n".join(rows) + "\n", "utf-8")
    bounds = ScoreBounds.for_dataset(2000, 2)
    with pytest.raises(VideoScoreError, match="line 1201 is over") as info:
        read_one(path, bounds=bounds)
    assert len(str(info.value)) < 300
    with pytest.raises(VideoScoreError, match="non-numeric") as info:  # generous bounds
        read_one(path)
    assert len(str(info.value)) < 300
    # In the first rows the csv module's own limit would raise a bare csv.Error.
    rows[1200] = "v1199,0.1,0.9"
    rows[3] = "v2," + "7" * (5 << 20) + ",0.5"
    path.write_text("\n".join(rows) + "\n", "utf-8")
    with pytest.raises(VideoScoreError, match="line 4 is over"):
        read_one(path, bounds=bounds)
    with pytest.raises(VideoScoreError, match=r"malformed CSV \(field larger") as info:
        read_one(path)
    assert len(str(info.value)) < 300


def test_csv_with_more_columns_than_the_classes_need_is_refused_from_its_header(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.csv"
    cols = [f"c{j}" for j in range(3000)]
    path.write_text("video_id," + ",".join(cols) + "\nv0," + ",".join(["0"] * 3000) + "\n")
    with pytest.raises(VideoScoreError, match="3001 columns, over the 1005"):
        read_one(path, bounds=ScoreBounds.for_dataset(10, 5))
    wide = tmp_path / "wide.csv"  # 10^6 columns: the header line alone is refused
    with open(wide, "w") as fh:
        fh.write("video_id," + ",".join(f"c{j}" for j in range(10**6)) + "\n")
    with pytest.raises(VideoScoreError, match="line 1 is over"):
        read_one(wide)


def test_annotation_file_with_a_huge_cell_is_one_line(tmp_path: Path) -> None:
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros((2, 3), np.float32))
    ann = tmp_path / "ann.csv"
    ann.write_text("video_id,label\nv0,a\nv1," + "x" * (5 << 20) + "\n", "utf-8")
    with pytest.raises(VideoScoreError, match="field larger than") as info:
        read_one(scores, ids_file=ann)
    assert str(ann) in str(info.value) and len(str(info.value)) < 300
    ann.write_text("video_id,label\nv0,a\nv1," + "x" * (8 << 20) + "\n", "utf-8")
    with pytest.raises(VideoScoreError, match="line 3 is over") as info:
        read_one(scores, ids_file=ann)
    assert len(str(info.value)) < 300


def test_csv_rows_are_bounded_before_pandas_reads_them(tmp_path: Path) -> None:
    bounds = ScoreBounds.for_dataset(10, 3)  # at most 10020 rows
    wide = tmp_path / "wide.csv"
    wide.write_text("video_id,a,b,c\n" + "v,0,0,1\n" * 10_100)
    with pytest.raises(VideoScoreError, match="10100 data lines, over the 10020"):
        read_one(wide, bounds=bounds)
    long = tmp_path / "long.csv"  # a line per (video, class): bounded by rows x columns
    long.write_text("video_id,class,score\n" + "".join(f"v{i},a,0.5\n" for i in range(10_100)))
    assert len(read_one(long, bounds=bounds).ids) == 10_100
    ann = tmp_path / "ids.txt"
    ann.write_text("v\n" * 10_100)
    np.save(tmp_path / "s.npy", np.zeros((10_100, 3), np.float32))
    assert len(read_one(tmp_path / "s.npy", ids_file=ann).ids) == 10_100  # default bounds


def test_label_map_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    scores = tmp_path / "s.npy"
    np.save(scores, np.zeros((2, 3), np.float32))
    ids = tmp_path / "ids.txt"
    ids.write_text("v0\nv1\n")
    big = tmp_path / "labels.txt"
    big.write_text("".join(f"c{i}\n" for i in range(5000)))
    with pytest.raises(VideoScoreError, match="5000 lines, over the 1003 classes"):
        read_one(scores, ids_file=ids, label_map=big, bounds=ScoreBounds.for_dataset(2, 3))
    long = tmp_path / "long.txt"
    long.write_text("a\nb\n" + "c" * (1 << 20) + "\n")
    with pytest.raises(VideoScoreError, match="line 3 is over"):
        read_one(scores, ids_file=ids, label_map=long)
    ok = tmp_path / "ok.txt"
    ok.write_text("a\nb\nc\n")
    assert read_one(scores, ids_file=ids, label_map=ok).classes == ["a", "b", "c"]


# ------------------------------------------------------------------------------- a truncated pickle


def test_truncated_pickle_is_a_clean_error(tmp_path: Path) -> None:
    blob = pickle.dumps(_dump_items(), protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VideoScoreError, match=r"cut\.pkl") as err:
        read_one(path, ids_file=tmp_path / "ids.txt")
    assert "\n" not in str(err.value)
