"""Hostile inputs that aim at memory or at silently wrong numbers: every reader bounds what it
allocates from a declared size before allocating, and no number read from a user is NaN,
infinite or a boolean in disguise. Each refusal is one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from avfuse import cli
from avfuse.config import read_mapping
from avfuse.model_config import TrainConfig


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- config files

_YAML_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
)


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("bomb.yaml", _YAML_BOMB, "aliases"),
        ("tag.yaml", 'work: !!python/object/apply:os.system ["true"]\n', "python/object"),
        ("tag2.yaml", "work: !!python/name:os.system\n", "python/name"),
        ("deep.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
        ("deep2.json", '{"a": ' + "[" * 500 + "]" * 500 + "}", "nested deeper"),
        ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
        ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper"),
        ("bin.toml", "work = '\xff'", "not"),
    ],
)
def test_hostile_config_files_are_one_line_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    path = tmp_path / name
    if name == "bin.toml":
        path.write_bytes(b"work = '\xff'\n")
    else:
        path.write_text(text, "utf-8")
    with pytest.raises(ValueError, match=says) as info:
        read_mapping(path)
    assert str(path) in str(info.value)
    assert cli.main(["train", str(tmp_path / "w"), "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and says in line


def test_oversized_config_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * (5 << 20) + "\n", "utf-8")
    with pytest.raises(ValueError, match="MiB"):
        read_mapping(path)


def test_yaml_anchor_without_alias_and_plain_yaml_still_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("work: w\ntrain: &t {epochs: 3}\n", "utf-8")
    assert read_mapping(path) == {"work": "w", "train": {"epochs": 3}}


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("lr=nan", "lr: nan is not a finite number"),
        ("lr=inf", "lr: inf is not a finite number"),
        ("weight_decay=-inf", "weight_decay: -inf is not a finite number"),
        ("epochs=true", "epochs: True is not an integer"),
        ("lr=true", "lr: True is not a number"),
        ("width=0", "width: 0.0 is out of range"),
        ("width=-1", "width: -1.0 is out of range"),
        ("window=1000000000", "window: 1000000000 is out of range"),
        ('epochs="3"', None),
    ],
)
def test_non_finite_boolean_and_absurd_numbers_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, says: str | None
) -> None:
    rc = cli.main(["train", str(tmp_path / "w"), "--set", override])
    line = _one_error_line(capsys)
    if says is None:  # a number written as text is still that number: fails later, on the store
        assert "feature store" in line
        return
    assert rc == 2
    assert says in line


def test_non_finite_number_in_a_config_file_and_direct_construction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"work = '{tmp_path / 'w'}'\ntolerance = nan\n", "utf-8")
    assert cli.main(["fuse", "--config", str(path), "--video-scores", "v.npz"]) == 2
    assert "tolerance: nan is not a finite number" in _one_error_line(capsys)
    with pytest.raises(ValueError, match="dropout: nan is not a finite"):
        TrainConfig(work=Path("w"), dropout=float("nan"))
    with pytest.raises(ValueError, match="epochs: True is a boolean"):
        TrainConfig(work=Path("w"), epochs=True)


def test_config_file_need_not_repeat_work_given_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("epochs = 5\n", "utf-8")
    assert cli.main(["train", str(tmp_path / "w"), "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert "missing required" not in line and "feature store" in line
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "missing required key(s) for TrainConfig: work" in _one_error_line(capsys)
