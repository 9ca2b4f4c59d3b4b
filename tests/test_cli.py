"""The command line: one progress switch for every command, usage errors name the subcommand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from avfuse.cli import COMMANDS, build_parser, main
from avfuse.runconfig import RunConfig, stage_configs
from tests.synthetic import make_synthetic_work

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
