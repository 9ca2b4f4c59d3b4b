"""Untrusted input: hostile pickles and checkpoints, names that try to leave WORK, a scan that
loses nothing, Kinetics annotation files as distributed, and audio-only datasets."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.testing._private.utils as np_test_utils
import pandas as pd
import pytest
import torch
import torch.utils.cpp_extension

from avfuse.checkpoint import load_checkpoint
from avfuse.config import apply_overrides
from avfuse.extract import ExtractConfig, extract
from avfuse.io import PathEscapeError, safe_join, write_table
from avfuse.manifest import (
    AnnotationError,
    ScanConfig,
    UnknownClassError,
    UnsafeNameError,
    load_classes,
    scan,
    write_class_list,
)
from avfuse.models import build_model, load_init
from avfuse.safe_pickle import (
    CorruptCheckpointError,
    UnsafePickleError,
    load_pickle,
    load_torch,
)
from avfuse.video_scores import VideoScoreError, read_one
from avfuse.workdir import WorkDir
from tests.media import write_tone_video

# --------------------------------------------------------------------------- hostile pickles


class _Call:
    """Pickles as a call of ``fn(*args)``: what a hostile file hides among normal items."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.fn, self.args)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _dump_items(n: int = 4, classes: int = 5) -> list[dict[str, Any]]:
    """What mmaction2's test tool dumps (mmengine ``dump``): one dict per video."""
    rng = np.random.default_rng(0)
    return [
        {
            "pred_score": torch.from_numpy(rng.random(classes, dtype=np.float32)),
            "pred_label": torch.tensor([i % classes]),
            "gt_label": torch.tensor([i % classes]),
            "num_classes": classes,
            "frame_inds": np.arange(8, dtype=np.int64) * (i + 1),
            "clip_len": np.int64(8),
            "img_shape": (224, 224),
        }
        for i in range(n)
    ]


def _payloads(marker: Path) -> dict[str, tuple[Any, str, bool]]:
    """name -> (payload object, global the loader must name, whether plain pickle runs it)."""
    touch = f"touch {marker}"
    # torch.storage._load_from_bytes hides a second pickle: here one that runs a shell command.
    inner = pickle.dumps(_Call(os.system, touch), protocol=2)
    return {
        "runstring": (
            _Call(np_test_utils.runstring, f"open({str(marker)!r}, 'w').close()", {}),
            _qualname(np_test_utils.runstring),
            True,
        ),
        "os.system": (_Call(os.system, touch), _qualname(os.system), True),
        "exec": (_Call(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec", True),
        "storage_from_bytes": (
            _Call(torch.storage._load_from_bytes, inner),
            _qualname(os.system),
            True,
        ),
        "torch.load": (_Call(torch.load, str(marker)), _qualname(torch.load), False),
        "cpp_extension": (
            _Call(torch.utils.cpp_extension.load_inline, "x", "int f();"),
            _qualname(torch.utils.cpp_extension.load_inline),
            False,
        ),
    }


PAYLOADS = ["runstring", "os.system", "exec", "storage_from_bytes", "torch.load", "cpp_extension"]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", PAYLOADS)
def test_hostile_pickle_is_refused_before_it_runs(tmp_path: Path, name: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload, refused, live = _payloads(marker)[name]
    items = _dump_items()
    # Hidden in the middle of an otherwise normal dump, as one value of one item.
    items[2]["pred_score"] = payload
    path = tmp_path / "results.pkl"
    path.write_bytes(pickle.dumps(items, protocol=protocol))

    with pytest.raises(UnsafePickleError, match=rf"refusing to load {refused}\b") as err:
        load_pickle(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(VideoScoreError, match=rf"refusing to load {refused}\b"):
        read_one(path, ids_file=tmp_path / "ids.txt")
    assert not marker.exists()

    if live:  # the payload is real: an unrestricted unpickler does run it
        with contextlib.suppress(Exception):  # torch.load fails after the command has run
            pickle.loads(path.read_bytes())
        assert marker.exists()


def test_genuine_mmaction2_dump_loads(tmp_path: Path) -> None:
    items = _dump_items(n=6)
    # A tensor that is a view into a larger storage, as slices of a batch output are.
    batch = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    items[1]["pred_score"] = batch.t()[2]  # 5 values, stride 6, offset 2
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(items, protocol=protocol))
        got = load_pickle(path)
        assert len(got) == len(items)
        for a, b in zip(got, items, strict=True):
            assert set(a) == set(b)
            for key in ("pred_score", "pred_label", "gt_label"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
            assert np.array_equal(a["frame_inds"], b["frame_inds"])
            assert a["frame_inds"].dtype == np.int64
            assert type(a["clip_len"]) is np.int64 and a["clip_len"] == 8
            assert a["img_shape"] == (224, 224) and a["num_classes"] == 5

    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"clip{i}\n" for i in range(6)), "utf-8")
    vs = read_one(tmp_path / "p2.pkl", ids_file=ids)
    expected = np.stack([it["pred_score"].numpy().astype(np.float64) for it in items])
    np.testing.assert_array_equal(vs.scores, expected)
    assert list(vs.ids) == [f"clip{i}" for i in range(6)]


def test_truncated_pickle_is_a_clean_error(tmp_path: Path) -> None:
    blob = pickle.dumps(_dump_items(), protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VideoScoreError, match=r"cut\.pkl") as err:
        read_one(path, ids_file=tmp_path / "ids.txt")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- checkpoints


def _panns_like_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], np.random.RandomState]:
    """A released-PANNs-style file: weights plus a data sampler holding a numpy RandomState."""
    model = build_model("panns", 4, 0.25)
    rng = np.random.RandomState(1234)
    rng.randint(0, 100, size=37)  # a state some way into the stream
    ckpt = {
        "iteration": 5000,
        "model": model.state_dict(),
        "sampler": {
            "indexes": np.arange(50, dtype=np.int64),
            "pointer": np.int64(17),
            "random_state": rng,
        },
    }
    torch.save(ckpt, path)
    return model.state_dict(), rng


def test_checkpoint_with_numpy_randomstate_loads(tmp_path: Path) -> None:
    path = tmp_path / "Cnn14.pth"
    weights, rng = _panns_like_checkpoint(path)
    got = load_torch(path)
    sampler = got["sampler"]
    assert got["iteration"] == 5000 and sampler["pointer"] == 17
    np.testing.assert_array_equal(sampler["indexes"], np.arange(50))
    # The restored generator continues the saved stream exactly.
    np.testing.assert_array_equal(
        sampler["random_state"].randint(0, 10**6, size=20), rng.randint(0, 10**6, size=20)
    )
    for k, v in weights.items():
        assert torch.equal(got["model"][k], v)

    # --init takes such a file as it is.
    model = build_model("panns", 4, 0.25)
    assert load_init(model, path) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])

    # Without the numpy RNG globals the same file is refused, naming a numpy global.
    with pytest.raises(UnsafePickleError, match=r"refusing to load numpy\."):
        load_torch(path, allow_numpy_rng=False)


_OLD_CTOR = getattr(np.random, "__RandomState_ctor")


class _OldRandomState:
    """Pickles like a RandomState written by numpy < 1.17 (a constructor, then its state)."""

    def __init__(self, rng: np.random.RandomState) -> None:
        self.state = rng.get_state()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_OLD_CTOR, (), self.state)


def test_checkpoint_with_an_old_numpy_randomstate_loads(tmp_path: Path) -> None:
    rng = np.random.RandomState(99)
    rng.random_sample(5)
    torch.save({"sampler": _OldRandomState(rng)}, tmp_path / "old.pth")
    got = load_torch(tmp_path / "old.pth")["sampler"]
    assert isinstance(got, np.random.RandomState)
    np.testing.assert_array_equal(got.random_sample(10), rng.random_sample(10))


def test_hostile_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = build_model("panns", 4, 0.25).state_dict()
    torch.save({"model": weights, "x": _Call(os.system, f"touch {marker}")}, tmp_path / "e.pt")
    for load in (load_torch, load_checkpoint, lambda p: load_init(build_model("panns", 4), p)):
        with pytest.raises(UnsafePickleError, match=rf"refusing to load {_qualname(os.system)}"):
            load(tmp_path / "e.pt")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.97])
def test_truncated_checkpoint_is_one_clean_error(tmp_path: Path, keep: float) -> None:
    whole = tmp_path / "whole.pt"
    _panns_like_checkpoint(whole)
    blob = whole.read_bytes()
    cut = tmp_path / "last.pt"
    cut.write_bytes(blob[: int(len(blob) * keep)])
    for load in (load_torch, load_checkpoint, lambda p: load_init(build_model("panns", 4), p)):
        with pytest.raises(CorruptCheckpointError) as err:
            load(cut)
        assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_damaged_pickle_inside_a_checkpoint_is_corrupt_not_hostile(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    with (
        zipfile.ZipFile(tmp_path / "ok.pt") as zin,
        zipfile.ZipFile(tmp_path / "bad.pt", "w") as zout,
    ):
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                data = data[:2] + b"\xff" + data[3:]  # an opcode no pickle has
            zout.writestr(name, data)
    with pytest.raises(CorruptCheckpointError, match=r"bad\.pt.*Unsupported operand") as err:
        load_torch(tmp_path / "bad.pt")
    assert "\n" not in str(err.value) and "documentation" not in str(err.value)


# --------------------------------------------------------------------------- paths


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (len(rel) + 3))


def _files_outside(top: Path, work: Path) -> set[Path]:
    return {p for p in top.rglob("*") if not p.is_dir() and work not in p.parents}


def _kinetics(path: Path, lines: list[str]) -> Path:
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
    _touch(root, "train/abseiling/aaaaaaaaaaa_000010_000020.mp4")
    row = {"label": "abseiling", "youtube_id": "aaaaaaaaaaa", "split": "train"}
    row[column] = value
    csv_path = _kinetics(
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
    _touch(root, "train/ok/x.mp4", "train/bad\nname/y.mp4")
    with pytest.raises(UnsafeNameError, match="control characters or line breaks"):
        scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert not (tmp_path / "w" / "classes.txt").exists()


def test_trailing_space_in_a_class_folder_is_refused_on_every_scan(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/jogging /x.mp4", "train/walking/y.mp4")
    messages = []
    for _ in range(2):
        with pytest.raises(UnsafeNameError, match="jogging ") as err:
            scan(ScanConfig(root=root, work=tmp_path / "w"))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "whitespace" in messages[0]


def test_unsafe_file_names_are_listed_not_lost(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/good.mp4", "train/a/bad\tname.mp4", "train/a/back\\slash.mp4")
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


def test_safe_join_refuses_paths_leaving_work(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert safe_join(work, "audio/train/a/x.flac") == work / "audio/train/a/x.flac"
    for bad in ("audio/../../x.flac", "/etc/passwd", "audio/\0x", "..", "."):
        with pytest.raises(PathEscapeError):
            safe_join(work, bad)


def test_extract_never_writes_outside_work(tmp_path: Path) -> None:
    """A manifest edited by hand (scan would refuse the id) still cannot place files."""
    src = write_tone_video(tmp_path / "src" / "v.mp4", duration=0.5)
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    ids = ["../../../escaped", "train/a/fine"]
    write_table(
        pd.DataFrame(
            {
                "video_id": ids,
                "split": ["train", "train"],
                "label": ["a", "a"],
                "label_index": [0, 0],
                "path": [str(src), str(src)],
                "size_bytes": [src.stat().st_size] * 2,
                "scan_status": ["found", "found"],
            }
        ),
        work / "manifest.parquet",
    )
    write_class_list(work / "classes.txt", ["a"])
    before = _files_outside(tmp_path, work)
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert _files_outside(tmp_path, work) == before
    table = res.table.set_index("video_id")
    assert table.loc["train/a/fine", "status"] == "ok"
    assert (work / "audio/train/a/fine.flac").is_file()
    assert table.loc["../../../escaped", "status"] != "ok"
    assert "leaves" in table.loc["../../../escaped", "reason"]


# --------------------------------------------------------------------------- scan loses nothing


def _warnings(work: Path) -> dict[str, str]:
    with open(WorkDir(work).scan_warnings, newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r["kind"] for r in csv.DictReader(fh)}


def test_symlinked_split_and_class_folders_are_followed_without_loops(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _touch(elsewhere, "val_store/a/v1.mp4", "class_b/t2.mp4", "class_b/t3.mp4")
    root = tmp_path / "d"
    _touch(root, "train/a/t1.mp4")
    (root / "val").symlink_to(elsewhere / "val_store", target_is_directory=True)
    (root / "train" / "b").symlink_to(elsewhere / "class_b", target_is_directory=True)
    (root / "train" / "a" / "again").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "a" / "self").symlink_to(root / "train" / "a", target_is_directory=True)

    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert list(df["video_id"]) == ["train/a/t1", "train/b/t2", "train/b/t3", "val/a/v1"]
    sizes = dict(zip(df["video_id"], df["size_bytes"], strict=True))
    assert sizes["train/b/t2"] == (elsewhere / "class_b/t2.mp4").stat().st_size
    assert Path(df.set_index("video_id").loc["train/b/t3", "path"]).read_bytes()
    assert _warnings(tmp_path / "w") == {"again": "symlink_loop", "self": "symlink_loop"}


def test_scan_reports_what_it_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/ok.mp4", "train/a/clip.mp4/frame0.jpg", "train/locked/x.mp4", "stray.mp4")
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
    assert _warnings(tmp_path / "w") == {
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
    _touch(root, *rels)
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
    _touch(root, "train/a/x.mp4", "work/audio/train/a/x.flac")
    df = scan(ScanConfig(root=root, work=root / "work"))
    assert list(df["video_id"]) == ["train/a/x"]
    assert _warnings(root / "work") == {"work": "work_folder"}


# --------------------------------------------------------------------------- Kinetics CSVs


def test_kinetics_annotation_files_as_distributed(tmp_path: Path) -> None:
    root = tmp_path / "k700"
    _touch(
        root,
        "train/abseiling/aaaaaaaaaaa_000010_000020.mp4",
        "train/air drumming/bbbbbbbbbbb_000000_000010.mp4",
        "validate/abseiling/ccccccccccc_000005_000015.mp4",
        "test/ddddddddddd_000001_000011.mp4",
    )
    train = _kinetics(
        tmp_path / "train.csv",
        [
            "label,youtube_id,time_start,time_end,split,is_cc",
            "abseiling,aaaaaaaaaaa,10,20,train,0",
            "air drumming,bbbbbbbbbbb,0,10,train,1",
        ],
    )
    # validate + test concatenated with `cat`: a second header, without the label column.
    both = _kinetics(
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
    _touch(root, "train/a/x.mp4", "dev/a/y.mp4", "validate/a/z.mp4")
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
    csv_path = _kinetics(tmp_path / "kinetics700_train.csv", lines)
    with pytest.raises(AnnotationError, match=rf"kinetics700_train\.csv:{line}: .*{reason}"):
        scan(ScanConfig(root=root, work=tmp_path / "w", annotations=(csv_path,)))


# --------------------------------------------------------------------------- class names


def test_scan_with_a_label_map_matches_underscored_folders(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/air_drumming/x.mp4", "train/Abseiling/y.mp4", "val/air_drumming/z.mp4")
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
    _touch(root, "train/Jogging/x.mp4", "train/jogging/y.mp4", "val/jogging/z.mp4")
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    got = dict(zip(df["video_id"], df["label_index"], strict=True))
    assert load_classes(tmp_path / "w") == ["Jogging", "jogging"]
    assert got == {"train/Jogging/x": 0, "train/jogging/y": 1, "val/jogging/z": 1}
    # A map with only one of the two cannot give both folders one class.
    one = tmp_path / "one.txt"
    one.write_text("jogging\n", "utf-8")
    with pytest.raises(UnknownClassError, match="'Jogging'"):
        scan(ScanConfig(root=root, work=tmp_path / "w2", classes=one))


# --------------------------------------------------------------------------- audio-only


def test_audio_only_dataset_is_scanned_by_default(tmp_path: Path) -> None:
    root = tmp_path / "esc"
    exts = ["wav", "flac", "mp3", "ogg", "opus", "m4a"]
    _touch(root, *[f"train/dog/d.{e}" for e in exts], "val/dog/v.wav")
    df = scan(ScanConfig(root=root, work=tmp_path / "w"))
    assert sorted(df["video_id"]) == sorted([f"train/dog/d.{e}" for e in exts] + ["val/dog/v"])


def test_no_files_found_names_the_extensions_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _touch(root, "train/a/x.aiff")
    cfg = ScanConfig(root=root, work=tmp_path / "w")
    with pytest.raises(ValueError, match=r"\.wav.*--set 'extensions=") as err:
        scan(cfg)
    assert ".mp4" in str(err.value) and ".aiff" not in str(err.value)
    df = scan(apply_overrides(cfg, ['extensions=[".aiff"]']))
    assert list(df["video_id"]) == ["train/a/x"]


def test_scan_cli_takes_several_annotation_files_and_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse.cli import main

    root = tmp_path / "k"
    _touch(root, "train/a/aaaaaaaaaaa_000000_000010.mp4", "val/a/bbbbbbbbbbb_000000_000010.mp4")
    head = "label,youtube_id,time_start,time_end,split"
    tr = _kinetics(tmp_path / "train.csv", [head, "a,aaaaaaaaaaa,0,10,train"])
    va = _kinetics(tmp_path / "validate.csv", [head, "a,bbbbbbbbbbb,0,10,validate"])
    assert main(["scan", str(root), "-o", str(tmp_path / "w"), "--annotations", f"{tr},{va}"]) == 0
    df = pd.read_parquet(tmp_path / "w" / "manifest.parquet")
    assert dict(zip(df["video_id"], df["split"], strict=True)) == {
        "train/a/aaaaaaaaaaa_000000_000010": "train",
        "val/a/bbbbbbbbbbb_000000_000010": "val",
    }
    bad = _kinetics(tmp_path / "bad.csv", [head, "a,ccccccccccc,0,,train"])
    capsys.readouterr()
    assert main(["scan", str(root), "-o", str(tmp_path / "w2"), "--annotations", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bad}:2: empty time_end" in err
