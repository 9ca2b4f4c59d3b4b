"""Config dataclasses: TOML round trip, overrides, CLI flags generated from the fields, hashes;
every value checked when a config is made; hostile config files are one-line refusals."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import pkgutil
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

import avfuse
from avfuse import cli
from avfuse.config import (
    Config,
    _literal_values,
    add_arguments,
    apply_overrides,
    check_fields,
    config_hash,
    from_arguments,
    from_dict,
    load_config,
    read_mapping,
    save_config,
    to_dict,
)
from avfuse.extract import ExtractConfig
from avfuse.model_config import TrainConfig
from tests.commands import stderr_line


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


# ----------------------------------------------------------------------------- hostile config files


_YAML_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
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
    line = stderr_line(capsys)
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
    (tmp_path / "w").mkdir()
    rc = cli.main(["train", str(tmp_path / "w"), "--set", override])
    line = stderr_line(capsys)
    if says is None:  # a number written as text is still that number: fails later, on WORK
        assert "epochs" not in line and "not an avfuse work folder" in line
        return
    assert rc == 2
    assert says in line


def test_non_finite_number_in_a_config_file_and_direct_construction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"work = '{tmp_path / 'w'}'\ntolerance = nan\n", "utf-8")
    assert cli.main(["fuse", "--config", str(path), "--video-scores", "v.npz"]) == 2
    assert "tolerance: nan is not a finite number" in stderr_line(capsys)
    with pytest.raises(ValueError, match="dropout: nan is not a finite"):
        TrainConfig(work=Path("w"), dropout=float("nan"))
    with pytest.raises(ValueError, match="epochs: True is a boolean"):
        TrainConfig(work=Path("w"), epochs=True)


# ------------------------------------------------------------------- values checked on construction


def _config_classes() -> list[type]:
    """Every config dataclass avfuse defines (frozen dataclasses named *Config or *Section)."""
    found: dict[str, type] = {}
    for mod in pkgutil.walk_packages(avfuse.__path__, "avfuse."):
        if mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__.startswith("avfuse")
                and obj.__name__.endswith(("Config", "Section"))
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def _instance(cls: type) -> Any:
    """A default instance: required fields (paths) get a placeholder."""
    hints = typing.get_type_hints(cls)
    required = {
        f.name: Path("w") if hints[f.name] is Path else "x"
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return cls(**required)


CLASSES = _config_classes()


def test_every_config_class_checks_on_construction() -> None:
    names = {c.__name__ for c in CLASSES}
    # The discovery finds the stage configs (and the test below would be vacuous otherwise).
    assert {"FrontendConfig", "TrainConfig", "FuseConfig", "RunConfig", "DemoConfig"} <= names
    for cls in CLASSES:
        assert issubclass(cls, Config), cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_literal_fields_refuse_other_values(cls: type) -> None:
    base = _instance(cls)
    hints = typing.get_type_hints(cls)
    checked = 0
    for f in dataclasses.fields(cls):
        allowed, per_item = _literal_values(hints[f.name])
        if not allowed:
            continue
        bad: Any = ("bogus-value",) if per_item else "bogus-value"
        with pytest.raises(ValueError) as err:
            dataclasses.replace(base, **{f.name: bad})
        msg = str(err.value)
        assert f"{cls.__name__}.{f.name}" in msg and "bogus-value" in msg
        assert all(repr(a) in msg for a in allowed), msg
        for good in allowed:  # every allowed value still constructs
            dataclasses.replace(base, **{f.name: (good,) if per_item else good})
        checked += 1
    if cls.__name__ in ("FrontendConfig", "TrainConfig", "PredictConfig", "FuseConfig"):
        assert checked >= 2


def test_mel_scale_outside_the_literal_is_refused() -> None:
    from avfuse.melspec import FrontendConfig

    allowed = get_args(typing.get_type_hints(FrontendConfig)["mel_scale"])
    with pytest.raises(ValueError, match=r"FrontendConfig\.mel_scale: 'bark'"):
        FrontendConfig(mel_scale="bark")  # type: ignore[arg-type]
    # Through a run config's nested table too (TOML files and --set come this way).
    from avfuse.runconfig import RunConfig

    with pytest.raises(ValueError, match="mel_scale"):
        apply_overrides(RunConfig(), ["features.frontend.mel_scale='bark'"])
    assert "bark" not in allowed


def test_bounded_numbers_are_refused_by_name() -> None:
    from avfuse.predict import PredictConfig
    from avfuse.runconfig import RunConfig
    from avfuse.train import TrainConfig

    work = Path("w")
    cases: list[tuple[Any, str]] = [
        (lambda: TrainConfig(work, epochs=0), "TrainConfig.epochs: 0"),
        (lambda: TrainConfig(work, batch_size=-4), "TrainConfig.batch_size: -4"),
        (lambda: TrainConfig(work, eval_every=-1), "TrainConfig.eval_every: -1"),
        (lambda: PredictConfig(work, batch_size=0), "PredictConfig.batch_size: 0"),
        (
            lambda: dataclasses.replace(RunConfig().fuse, tolerance=-0.01),
            "FuseSection.tolerance: -0.01",
        ),
        (lambda: dataclasses.replace(RunConfig().fuse, tolerance=1.5), "tolerance: 1.5"),
        (lambda: dataclasses.replace(RunConfig().fuse, folds=1), "folds: 1"),
        (
            lambda: dataclasses.replace(RunConfig().fuse, label_tolerance=-1.0),
            "FuseSection.label_tolerance: -1.0",
        ),
        (lambda: apply_overrides(RunConfig(), ["train.epochs=-3"]), "TrainSection.epochs: -3"),
    ]
    for make, text in cases:
        with pytest.raises(ValueError, match="out of range") as err:
            make()
        assert text in str(err.value)
    # The edges themselves are allowed.
    assert TrainConfig(work, epochs=1, eval_every=0).epochs == 1
    assert dataclasses.replace(RunConfig().fuse, tolerance=0.0).tolerance == 0.0


@dataclass(frozen=True)
class _Probe(Config):
    kind: Literal["a", "b"] | None = None
    stages: tuple[Literal["x", "y"], ...] = ()
    rate: float = field(default=0.5, metadata={"min": 0, "max": 1})
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Runs after the field check: it never sees an invalid value.
        self.seen.append(f"{self.kind}")


def test_generic_check_handles_optional_tuples_bounds_and_own_post_init() -> None:
    assert _Probe().kind is None and _Probe(kind="b").seen == ["b"]
    assert _Probe(stages=("y", "x")).stages == ("y", "x")
    with pytest.raises(ValueError, match=r"_Probe\.kind: 'c' is not one of 'a', 'b'"):
        _Probe(kind="c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"_Probe\.stages: 'z' is not one of 'x', 'y'"):
        _Probe(stages=("x", "z"))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"_Probe\.rate: 1\.5 is out of range; must be >= 0 and <= 1"
    ):
        _Probe(rate=1.5)
    with pytest.raises(ValueError, match="kind"):
        from_dict(_Probe, {"kind": "c"})
    check_fields(_Probe(rate=0.0))  # the bounds are inclusive
    assert get_origin(typing.get_type_hints(_Probe)["kind"]) is not Literal  # an Optional
