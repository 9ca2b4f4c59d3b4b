"""The command line: one progress switch for every command, usage errors name the subcommand;
every refusal is one line with exit code 2, Ctrl-C exits 130 and says how to resume, and names
from the data never reach the terminal as escape sequences."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse import cli
from avfuse.cli import COMMANDS, build_parser, main
from avfuse.extract import extract
from avfuse.features import compute_features
from avfuse.io import read_table
from avfuse.runconfig import RunConfig, stage_configs
from tests.commands import (
    avfuse_env,
    hook_folder,
    one_line_error,
    run_avfuse,
    run_avfuse_alone,
    run_python,
    stderr_line,
)
from tests.media import make_dataset
from tests.synthetic import make_synthetic_work
from tests.test_manifest import _kinetics_lines, _stub_files
from tests.workfolders import extract_cfg, features_cfg, scanned_tones, tone_dataset

# The commands whose stages draw progress bars (tqdm in the stage or in map_batches).
DRAWS_BARS = ("extract", "features", "embed", "train", "predict", "run", "demo")


@pytest.mark.parametrize("command", DRAWS_BARS)
def test_every_command_with_bars_takes_no_progress(command: str) -> None:
    parser = build_parser(command)
    args = [command] if command == "demo" else [command, "x"]  # the demo has no positional
    assert parser.parse_args([*args, "--no-progress"]).progress is False
    assert parser.parse_args([*args, "--progress"]).progress is True
    assert parser.parse_args(args).progress is None  # unset: the config's default


def test_run_no_progress_reaches_every_stage(tmp_path: Path) -> None:
    quiet = stage_configs(RunConfig(root=tmp_path, work=tmp_path / "w", progress=False))
    loud = stage_configs(RunConfig(root=tmp_path, work=tmp_path / "w"))
    sections = [quiet.extract, quiet.features, quiet.train, *quiet.predict.values()]
    assert [s.progress for s in sections] == [False] * 4
    assert [s.progress for s in (loud.extract, loud.features, loud.train)] == [True] * 3
    assert all(p.progress for p in loud.predict.values())
    # Nothing else changes: a quiet run redoes no stage of a loud one.
    assert dataclasses.replace(quiet.train, progress=True) == loud.train


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_usage_error_prints_the_subcommand_usage(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--no-such-option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: avfuse {command} "), err
    assert f"avfuse {command}: error: unrecognized arguments: --no-such-option" in err


def test_bad_choice_prints_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "x", "--model", "nope"])
    err = capsys.readouterr().err
    assert err.startswith("usage: avfuse train ") and "--model" in err


def _bars(err: str, unit: str) -> bool:
    # tqdm's rate field: "3.2step/s" or "1.5s/step" (what a log line never prints)
    return f"{unit}/s" in err or f"s/{unit}" in err


def test_no_progress_leaves_stderr_without_bars(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "w"
    make_synthetic_work(work, n_classes=2, videos_per_class=3, frames_range=(100, 120), seed=3)
    train = [
        "train", str(work), "--model", "panns", "--width", "0.125", "--epochs", "1",
        "--device", "cpu", "--amp", "off", "--min-steps", "2", "--batch-size", "4",
        "--val-split", "val",
    ]  # fmt: skip
    predict = ["predict", str(work), "--device", "cpu", "--amp", "off", "--batch-size", "1"]

    assert main([*train, "--name", "loud"]) == 0
    assert main([*predict, "--run-name", "loud"]) == 0
    err = capsys.readouterr().err
    assert _bars(err, "step") and _bars(err, "batch"), err  # the bars a quiet run must not draw

    assert main([*train, "--name", "quiet", "--no-progress"]) == 0
    assert main([*predict, "--run-name", "quiet", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not _bars(err, "step") and not _bars(err, "batch") and "\r" not in err, err


# ------------------------------------------------------------------------------------- config files


def test_config_file_need_not_repeat_work_given_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("epochs = 5\n", "utf-8")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "manifest.parquet").touch()  # a work folder, its store not yet built
    assert cli.main(["train", str(tmp_path / "w"), "--config", str(path)]) == 2
    line = stderr_line(capsys)
    assert "missing required" not in line and "feature store" in line
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "missing required key(s) for TrainConfig: work" in stderr_line(capsys)


def test_ctrl_c_in_train_says_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import avfuse.train

    def interrupted(cfg: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(avfuse.train, "train", interrupted)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "manifest.parquet").touch()  # a work folder (train itself is faked)
    assert cli.main(["train", str(tmp_path / "w")]) == 130
    line = capsys.readouterr().err.strip()
    assert "--resume" in line and "\n" not in line


# ---------------------------------------------------- pipes, ranges, escapes, folders no scan wrote


def test_run_with_a_pipe_as_config_is_one_line_exit_2(tmp_path: Path) -> None:
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    out = run_python(
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


def test_escape_sequences_in_names_never_reach_the_terminal(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in ("train/cat/a.mp4", "train/dog/b.mp4", "train/dog/x\x1b[2J\x1b[31mRED.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 64)
    cli = "import sys; from avfuse.cli import main; sys.exit(main(sys.argv[1:]))"
    scan = run_python(cli, "scan", str(root), "-o", str(tmp_path / "w"))
    assert scan.returncode == 0, scan.stderr
    bad = tmp_path / "c\x1b]0;title\x07\u202e.toml"
    bad.write_text("\x1b[31m = 1\n", "utf-8")
    err = run_python(cli, "run", "--config", str(bad))
    assert err.returncode == 2
    for out in (scan, err):
        text = out.stdout + out.stderr
        assert not any(c in text for c in "\x1b\x07\u202e"), text
    # The names stay recognisable, written as escapes.
    assert "x\\x1b[2J\\x1b[31mRED.mp4" in scan.stderr
    assert "c\\x1b]0;title\\x07\\u202e.toml" in err.stderr


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


# -------------------------------------------------------------- one-line errors, exit codes, Ctrl-C


AVFUSE = [sys.executable, "-m", "avfuse"]


@pytest.fixture(scope="module")
def featured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder through features; split ``heldout`` holds only an undecodable file."""
    tmp = tmp_path_factory.mktemp("clean")
    tone_dataset(tmp / "data")
    junk = tmp / "data" / "heldout" / "a" / "junk.mp4"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(np.random.default_rng(1).bytes(3000))
    work = scanned_tones(tmp)
    extract(extract_cfg(work))
    compute_features(features_cfg(work))
    return work


def _copy(work: Path, dst: Path) -> Path:
    shutil.copytree(work, dst)
    return dst


CleanCase = Callable[[Path, Path], list[str]]


@pytest.mark.parametrize(
    ("name", "make_args", "needle"),
    [
        ("output is a file", lambda w, t: ["scan", str(t / "d"), "-o", str(t / "f")], "file"),
        (
            "foreign npz",
            lambda w, t: ["evaluate", str(w), "--scores", str(t / "foreign.npz")],
            "foreign.npz",
        ),
        (
            "split typo (train)",
            lambda w, t: ["train", str(w), "--train-split", "trian", "--no-progress"],
            "val",
        ),
        (
            "split typo (evaluate)",
            lambda w, t: ["evaluate", str(w), "--scores", str(t / "s.npz"), "--split", "vall"],
            "train",
        ),
        (
            "split without usable videos",
            lambda w, t: ["train", str(w), "--train-split", "heldout", "--no-progress"],
            "heldout",
        ),
        (
            "corrupt --init",
            lambda w, t: ["train", str(w), "--init", str(t / "bad.pt"), "--no-progress"],
            "",
        ),
        (
            "corrupt checkpoint",
            lambda w, t: ["predict", str(w), "--checkpoint", str(t / "bad.pt")],
            "",
        ),
        (
            "negative tolerance",
            lambda w, t: [
                "fuse",
                str(w),
                "--video-scores",
                str(t / "foreign.npz"),
                "--tolerance",
                "-1",
            ],
            "tolerance",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_code_2(
    featured: Path, tmp_path: Path, name: str, make_args: CleanCase, needle: str
) -> None:
    work = _copy(featured, tmp_path / "work")
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("not a folder")
    np.savez(tmp_path / "foreign.npz", logits=np.zeros((3, 2)), names=np.array(["a", "b"]))
    from avfuse.scores import ScoreFile

    ids = np.array(["val/a/v1", "val/b/w1"])
    ScoreFile(ids, ["a", "b"], np.eye(2, dtype=np.float32), np.ones(2), np.array(["ok"] * 2)).save(
        tmp_path / "s.npz"
    )
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + os.urandom(500))  # a cut-off zip
    out = run_avfuse(make_args(work, tmp_path), tmp_path)
    line = one_line_error(out)
    assert line.startswith("avfuse ") and "error" in line
    assert needle in line


def test_verbose_shows_the_traceback(featured: Path, tmp_path: Path) -> None:
    out = run_avfuse(["-v", "train", str(featured), "--train-split", "trian"], tmp_path)
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_cuda_without_a_gpu_is_one_line(featured: Path, tmp_path: Path) -> None:
    # Hiding every GPU makes this machine one without CUDA, also where a GPU is present.
    env = dict(avfuse_env(), CUDA_VISIBLE_DEVICES="")
    args = ["train", str(featured), "--device", "cuda", "--no-progress"]
    out = run_avfuse(args, tmp_path, env)
    assert "CUDA" in one_line_error(out)


def test_full_disk_from_the_cli_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    work = scanned_tones(tmp_path)
    hook = hook_folder(
        tmp_path,
        """
        import errno
        import av
        _open = av.open
        def full(path, mode="r", *a, **k):
            if mode == "w":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return _open(path, mode, *a, **k)
        av.open = full
        """,
    )
    out = run_avfuse(
        ["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path, avfuse_env(hook)
    )
    line = one_line_error(out)
    assert "no space left" in line and str(work / "audio") in line
    assert "rerun" in line


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_ctrl_c_exits_130_and_a_rerun_resumes(tmp_path: Path, workers: str) -> None:
    work = scanned_tones(tmp_path)
    hook = hook_folder(
        tmp_path,
        """
        import time
        import avfuse.extract as e
        _orig = e.decode_audio
        _calls = [0]
        def slow(*a, **k):
            # Each process decodes its first video quickly and then stalls, so
            # the interrupt always lands with videos left, whatever the pool.
            _calls[0] += 1
            time.sleep(0.4 if _calls[0] == 1 else 8.0)
            return _orig(*a, **k)
        e.decode_audio = slow
        """,
    )
    args = ["extract", str(work), "--num-workers", workers, "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(
        [*AVFUSE, *args],
        env=avfuse_env(hook),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A suite started in the background (`make test &`) inherits an ignored SIGINT, which
        # Python then keeps ignoring: give the run the terminal's default, as a user's shell does.
        preexec_fn=_default_sigint,
    )
    parts = work / "extract" / "parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(parts.glob("part-*.parquet")):
        assert proc.poll() is None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the run
    _, err = proc.communicate(timeout=60)
    out = subprocess.CompletedProcess(args, proc.returncode, "", err)
    assert "rerun resumes" in one_line_error(out, 130)
    done = len(pd.concat([read_table(p) for p in parts.glob("part-*.parquet")]))
    assert 0 < done < 6  # the workers stopped too, not only the driver
    again = run_avfuse(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert again.returncode == 0 and f"{done} already done" in again.stdout


# --------------------------------------------------------------------------------- annotation files


def test_scan_cli_takes_several_annotation_files_and_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse.cli import main

    root = tmp_path / "k"
    _stub_files(
        root, "train/a/aaaaaaaaaaa_000000_000010.mp4", "val/a/bbbbbbbbbbb_000000_000010.mp4"
    )
    head = "label,youtube_id,time_start,time_end,split"
    tr = _kinetics_lines(tmp_path / "train.csv", [head, "a,aaaaaaaaaaa,0,10,train"])
    va = _kinetics_lines(tmp_path / "validate.csv", [head, "a,bbbbbbbbbbb,0,10,validate"])
    assert main(["scan", str(root), "-o", str(tmp_path / "w"), "--annotations", f"{tr},{va}"]) == 0
    df = pd.read_parquet(tmp_path / "w" / "manifest.parquet")
    assert dict(zip(df["video_id"], df["split"], strict=True)) == {
        "train/a/aaaaaaaaaaa_000000_000010": "train",
        "val/a/bbbbbbbbbbb_000000_000010": "val",
    }
    bad = _kinetics_lines(tmp_path / "bad.csv", [head, "a,ccccccccccc,0,,train"])
    capsys.readouterr()
    assert main(["scan", str(root), "-o", str(tmp_path / "w2"), "--annotations", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bad}:2: empty time_end" in err


# ---------------------------------------------------------------------------- a missing work folder


SMALL_LAYOUT = {"train": {"a": ["x1.mp4"], "b": ["y1.mp4"]}, "val": {"a": ["v1.mp4"]}}


@pytest.mark.parametrize("command", ["extract", "features", "train", "predict", "evaluate"])
def test_stages_refuse_a_missing_work_folder_and_create_nothing(
    tmp_path: Path, command: str
) -> None:
    work = tmp_path / "typo" / "deep" / "work"
    line = one_line_error(run_avfuse_alone([command, str(work)], tmp_path))
    assert str(work) in line and "does not exist" in line
    assert not (tmp_path / "typo").exists()


def test_scan_creates_its_work_folder(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", SMALL_LAYOUT, duration=0.6)
    work = tmp_path / "new" / "work"
    out = run_avfuse_alone(["scan", str(tmp_path / "data"), "-o", str(work)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (work / "manifest.parquet").is_file()
