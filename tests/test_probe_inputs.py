"""User-named inputs of every kind, beyond the ones each stage was first hardened against:
pipes and devices in place of config, score and checkpoint files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    # A reader that opens a FIFO waits for a writer forever: the timeout turns that hang into
    # a failure instead of a stuck suite.
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)])),
        timeout=120,
    )


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
    out = _python(_READERS, str(path))
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert set(seen) == {"config", "checkpoint", "scores", "video"}
    for name, message in seen.items():
        assert path.name in message and "not a regular file" in message, (name, message)
        assert ("FIFO" if kind == "fifo" else "device") in message, (name, message)


def test_run_with_a_pipe_as_config_is_one_line_exit_2(tmp_path: Path) -> None:
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    out = _python(
        "import sys; from avfuse.cli import main; sys.exit(main(sys.argv[1:]))",
        "run",
        "--config",
        str(fifo),
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.toml" in lines[0] and "not a regular file" in lines[0]


# A count or rate that is negative (or zero where zero means nothing) is refused by name
# before any stage runs, through every path a value can take.
_OUT_OF_RANGE = [
    ("fuse", "grid=0"),
    ("fuse", "bootstrap=0"),
    ("fuse", "seed=-1"),
    ("fuse", "stack_l2=-1"),
    ("evaluate", "top_confused=-1"),
    ("evaluate", "baseline_max_train=-5"),
    ("extract", "sample_rate=0"),
    ("extract", "batch_size=0"),
    ("extract", "num_workers=-2"),
    ("features", "shard_mb=0"),
    ("train", "lr=0"),
    ("train", "lr=-0.1"),
    ("train", "label_smoothing=1.5"),
    ("train", "num_masks=-1"),
    ("train", "base_batch_size=0"),
    ("train", "mixup_alpha=-1"),
    ("predict", "num_workers=-1"),
    ("demo", "classes=0"),
    ("demo", "classes=99"),
    ("demo", "fps=0"),
    ("demo", "seconds=-1"),
    ("demo", "epochs=0"),
    ("demo", "seconds=1000000"),
    ("demo", "fps=100000"),
]


def test_demo_refuses_an_odd_frame_size_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse.cli import main

    assert main(["demo", "-o", str(tmp_path / "w"), "--size", "17", "--classes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size" in err[0] and "even" in err[0], err


@pytest.mark.parametrize(("command", "setting"), _OUT_OF_RANGE)
@pytest.mark.parametrize("route", ["set", "toml", "json"])
def test_out_of_range_counts_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, setting: str, route: str
) -> None:
    from avfuse.cli import main

    key, value = setting.split("=")
    args = [command, str(tmp_path / "missing-work")]
    if command == "demo":
        args = [command, "-o", str(tmp_path / "missing-work")]
    if route == "set":
        args += ["--set", setting]
    else:
        conf = tmp_path / f"c.{route}"
        number = float(value) if "." in value else int(value)
        if route == "json":
            conf.write_text(json.dumps({key: number}), "utf-8")
        else:
            conf.write_text(f"{key} = {number}\n", "utf-8")
        args += ["--config", str(conf)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "out of range" in err[0], err
    assert not (tmp_path / "missing-work").exists()


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


def test_escape_sequences_in_names_never_reach_the_terminal(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in ("train/cat/a.mp4", "train/dog/b.mp4", "train/dog/x\x1b[2J\x1b[31mRED.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 64)
    cli = "import sys; from avfuse.cli import main; sys.exit(main(sys.argv[1:]))"
    scan = _python(cli, "scan", str(root), "-o", str(tmp_path / "w"))
    assert scan.returncode == 0, scan.stderr
    bad = tmp_path / "c\x1b]0;title\x07\u202e.toml"
    bad.write_text("\x1b[31m = 1\n", "utf-8")
    err = _python(cli, "run", "--config", str(bad))
    assert err.returncode == 2
    for out in (scan, err):
        text = out.stdout + out.stderr
        assert not any(c in text for c in "\x1b\x07\u202e"), text
    # The names stay recognisable, written as escapes.
    assert "x\\x1b[2J\\x1b[31mRED.mp4" in scan.stderr
    assert "c\\x1b]0;title\\x07\\u202e.toml" in err.stderr


@pytest.mark.parametrize("kind", ["long_index", "oversize", "long_bad_name", "long_duplicate"])
def test_a_hostile_label_map_is_refused_in_one_short_line_naming_it(
    tmp_path: Path, kind: str
) -> None:
    from avfuse.labels import ClassNameError, read_label_map

    path = tmp_path / "label_map.txt"
    if kind == "long_index":
        path.write_text("9" * 100_000 + " abseiling\n1 zumba\n", "utf-8")
    elif kind == "oversize":
        with open(path, "wb") as fh:  # sparse: a size on paper, nothing to read
            fh.truncate(200 << 20)
    elif kind == "long_bad_name":
        path.write_text("a\n" + "\x01" * 1_000_000 + "\n", "utf-8")
    else:
        path.write_text(("y" * 1_000_000 + "\n") * 2, "utf-8")
    with pytest.raises(ClassNameError) as err:
        read_label_map(path)
    message = str(err.value)
    assert str(path) in message and len(message) < 1000, message[:300]


@pytest.mark.parametrize("which", ["train.init", "predict.checkpoint"])
def test_run_keys_stages_by_the_checkpoint_files_they_read(tmp_path: Path, which: str) -> None:
    from avfuse.config import apply_overrides
    from avfuse.pipeline import stage_keys
    from avfuse.runconfig import RunConfig, stage_configs

    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"first weights")
    cfg = apply_overrides(
        RunConfig(root=tmp_path / "data", work=tmp_path / "w"), [f'{which}="{ckpt}"']
    )
    k0 = stage_keys(stage_configs(cfg))
    assert stage_keys(stage_configs(cfg)) == k0  # nothing changed: nothing to redo
    ckpt.write_bytes(b"other weights, same path")
    os.utime(ckpt, ns=(10**18, 10**18))
    k1 = stage_keys(stage_configs(cfg))
    changed = [s for s in k0 if k0[s]["key"] != k1[s]["key"]]
    stage = which.split(".")[0]
    assert changed[0] == stage and "fuse" in changed and "features" not in changed


@pytest.mark.parametrize("command", ["extract", "features", "train", "predict", "evaluate"])
def test_a_stage_pointed_at_a_folder_that_is_no_work_folder_leaves_it_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from avfuse.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg")
    assert main([command, str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and "not an avfuse work folder" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


_BAD_NAMES = ["../../outside", "/tmp/elsewhere", "a/b", "..", ".hidden", "", "a\x1b[2J", "x" * 200]


@pytest.mark.parametrize("bad", _BAD_NAMES)
def test_run_and_embedding_names_never_leave_their_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    from avfuse.cli import main
    from avfuse.workdir import WorkDir

    work = tmp_path / "deep" / "w"
    work.mkdir(parents=True)
    (work / "manifest.parquet").touch()
    for call in (lambda: WorkDir(work).run(bad), lambda: WorkDir(work).embeddings(bad)):
        with pytest.raises(ValueError, match="name"):
            call()
    for args in (["train", str(work), "--name", bad], ["predict", str(work), "--run-name", bad]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "invalid run name" in err[0], err
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["w"]
    assert WorkDir(work).run("ñame-2.b") == work / "runs" / "ñame-2.b"


def test_fuse_output_naming_someones_folder_is_refused_and_left_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse.cli import main
    from avfuse.io import atomic_dir

    mine = tmp_path / "Documents"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work", "utf-8")
    work = tmp_path / "w"
    work.mkdir()
    (work / "manifest.parquet").touch()
    args = ["fuse", str(work), "--video-scores", str(tmp_path / "v.csv"), "--output", str(mine)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and "refusing to replace" in err[0], err
    with pytest.raises(FileExistsError), atomic_dir(mine, "fusion.json") as tmp:
        (tmp / "fusion.json").write_text("{}", "utf-8")
    assert (mine / "thesis.txt").read_text("utf-8") == "years of work"
    assert sorted(p.name for p in mine.iterdir()) == ["sub", "thesis.txt"]
    # An earlier fusion output (or an empty folder) is replaced as before.
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, "fusion.json") as tmp:
        (tmp / "fusion.json").write_text("{}", "utf-8")
    with atomic_dir(empty, "fusion.json") as tmp:
        (tmp / "fusion.json").write_text('{"second": 1}', "utf-8")
    assert json.loads((empty / "fusion.json").read_text("utf-8")) == {"second": 1}


def test_demo_force_cleans_only_a_folder_a_scan_wrote(tmp_path: Path) -> None:
    from avfuse.demo.runner import _clean_work

    theirs = tmp_path / "home"
    (theirs / "audio").mkdir(parents=True)
    (theirs / "audio" / "song.flac").write_bytes(b"fLaC")
    (theirs / "report.md").write_text("my report", "utf-8")
    _clean_work(theirs)
    assert (theirs / "audio" / "song.flac").read_bytes() == b"fLaC"
    assert (theirs / "report.md").read_text("utf-8") == "my report"
    (theirs / "manifest.parquet").touch()  # a work folder: its outputs are the demo's to redo
    _clean_work(theirs)
    assert not (theirs / "audio").exists() and not (theirs / "report.md").exists()


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
