"""Config dataclasses: TOML round trip, overrides, CLI flags generated from the fields, hashes."""

from __future__ import annotations

import argparse
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from avfuse.config import (
    add_arguments,
    apply_overrides,
    config_hash,
    from_arguments,
    from_dict,
    load_config,
    read_mapping,
    save_config,
    to_dict,
)
from avfuse.extract import ExtractConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1
    milestones: tuple[int, ...] = (10, 20)


@dataclass(frozen=True)
class Outer:
    work: Path = field(metadata={"help": "work folder", "positional": True})
    name: str = field(default="run", metadata={"help": "run name", "flags": ("-n",)})
    mode: Literal["fast", "exact"] = field(default="fast", metadata={"help": "speed or accuracy"})
    workers: int | None = field(default=None, metadata={"help": "worker count"})
    splits: tuple[str, ...] = field(default=(), metadata={"help": "splits"})
    amp: bool = field(default=True, metadata={"help": "mixed precision"})
    secret: str = field(default="x", metadata={"help": "hidden", "cli": False})
    inner: Inner = field(default_factory=Inner)


def test_toml_round_trip(tmp_path) -> None:
    cfg = Outer(
        work=Path("w d"),
        name="ñame",
        mode="exact",
        workers=3,
        splits=("train", "val"),
        amp=False,
        inner=Inner(lr=0.5, milestones=(1, 2, 3)),
    )
    path = save_config(cfg, tmp_path / "c.toml")
    raw = tomllib.loads(path.read_text("utf-8"))  # plain TOML, readable without avfuse
    assert raw["inner"] == {"lr": 0.5, "milestones": [1, 2, 3]}
    assert raw["work"] == "w d" and raw["splits"] == ["train", "val"]
    assert load_config(Outer, path) == cfg
    # None fields are left out (TOML has no null) and come back as their default.
    default = Outer(work=Path("w"))
    assert "workers" not in tomllib.loads(save_config(default, tmp_path / "d.toml").read_text())
    assert load_config(Outer, tmp_path / "d.toml") == default


def test_extract_config_round_trip(tmp_path) -> None:
    cfg = ExtractConfig(
        work=tmp_path, sample_rate=8000, format="wav", scheduler="tcp://h:8786", splits=("val",)
    )
    assert load_config(ExtractConfig, save_config(cfg, tmp_path / "e.toml")) == cfg


def test_unknown_keys_and_bad_values_are_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\).*wrkers.*known:.*workers"):
        from_dict(Outer, {"work": "w", "wrkers": 2})
    with pytest.raises(ValueError, match="not one of"):
        from_dict(Outer, {"work": "w", "mode": "quick"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) for Inner at inner: momentum"):
        from_dict(Outer, {"work": "w", "inner": {"lr": 1, "momentum": 0.9}})
    with pytest.raises(ValueError, match="not an integer"):
        from_dict(Outer, {"work": "w", "workers": 2.5})
    with pytest.raises(ValueError, match="boolean"):
        from_dict(Outer, {"work": "w", "amp": "maybe"})


def test_overrides_reach_nested_keys() -> None:
    cfg = apply_overrides(
        Outer(work=Path("w")),
        ["inner.lr=0.01", "inner.milestones=[5, 7]", "name=my run", "amp=false", "splits=a,b"],
    )
    assert cfg.inner == Inner(lr=0.01, milestones=(5, 7))
    assert (cfg.name, cfg.amp, cfg.splits) == ("my run", False, ("a", "b"))
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["inner.lr"])


def test_read_mapping_yaml_json_toml(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("work: w\ninner:\n  lr: 0.2\n")
    (tmp_path / "a.json").write_text(json.dumps({"work": "w", "inner": {"lr": 0.2}}))
    (tmp_path / "a.toml").write_text('work = "w"\n[inner]\nlr = 0.2\n')
    cfgs = {
        from_dict(Outer, read_mapping(tmp_path / f"a.{ext}")) for ext in ("yaml", "json", "toml")
    }
    assert cfgs == {Outer(work=Path("w"), inner=Inner(lr=0.2))}


def _parser(cls: type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p, cls)
    return p


def test_cli_flags_are_generated_from_fields() -> None:
    parser = _parser(Outer)
    help_text = parser.format_help()
    for flag in ("--name", "-n", "--mode", "--workers", "--splits", "--amp", "--no-amp"):
        assert flag in help_text
    assert "--secret" not in help_text and "--inner" not in help_text
    assert "speed or accuracy" in help_text and "{fast,exact}" in help_text

    ns = parser.parse_args(["W", "-n", "x", "--workers", "4", "--splits", "a,b", "--no-amp"])
    cfg = from_arguments(Outer, ns)
    assert cfg == Outer(work=Path("W"), name="x", workers=4, splits=("a", "b"), amp=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["W", "--mode", "quick"])


def test_cli_only_overrides_what_was_given() -> None:
    base = Outer(work=Path("from_file"), name="file", workers=2, inner=Inner(lr=0.3))
    ns = _parser(Outer).parse_args(["--workers", "8"])
    cfg = from_arguments(Outer, ns, base)
    assert cfg == Outer(work=Path("from_file"), name="file", workers=8, inner=Inner(lr=0.3))
    with pytest.raises(ValueError, match=r"missing required key.*work"):
        from_arguments(Outer, ns)  # no WORK on the command line nor in a config file


def test_extract_cli_flags() -> None:
    parser = _parser(ExtractConfig)
    ns = parser.parse_args(
        ["WORK", "--sample-rate", "22050", "--format", "wav", "--num-workers", "0", "--force"]
    )
    cfg = from_arguments(ExtractConfig, ns)
    assert cfg == ExtractConfig(
        work=Path("WORK"), sample_rate=22050, format="wav", num_workers=0, force=True
    )
    ns = parser.parse_args(["WORK", "--scheduler", "tcp://10.0.0.1:8786", "--splits", "val"])
    cfg = from_arguments(ExtractConfig, ns)
    assert (cfg.scheduler, cfg.splits, cfg.num_workers) == ("tcp://10.0.0.1:8786", ("val",), None)


def test_config_hash_is_sha256_of_canonical_json() -> None:
    cfg = Outer(work=Path("w"), inner=Inner(lr=0.2))
    blob = json.dumps(
        {
            "amp": True,
            "inner": {"lr": 0.2, "milestones": [10, 20]},
            "mode": "fast",
            "name": "run",
            "secret": "x",
            "splits": [],
            "work": "w",
            "workers": None,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert config_hash(cfg) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert config_hash(cfg) != config_hash(Outer(work=Path("w"), inner=Inner(lr=0.21)))
    assert to_dict(cfg)["inner"]["milestones"] == [10, 20]


@dataclass(frozen=True)
class _IntDefaultForFloat:
    size_mb: float = 256


def test_int_default_of_float_field_hashes_like_its_round_trip(tmp_path: Path) -> None:
    cfg = _IntDefaultForFloat()
    save_config(cfg, tmp_path / "c.toml")
    again = load_config(_IntDefaultForFloat, tmp_path / "c.toml")
    assert isinstance(again.size_mb, float)
    assert config_hash(cfg) == config_hash(again)


def test_cli_reports_a_bad_config_file_key_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse import cli

    bad = tmp_path / "bad.toml"
    bad.write_text("work = 'w'\nbogus_key = 1\n", "utf-8")
    assert cli.main(["extract", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("avfuse extract: error: unknown key(s) for ExtractConfig: bogus_key")
