"""The run config: its sections, the documented TOML file, saving and loading run configs."""

from __future__ import annotations

import dataclasses
import pickle
import tomllib
from pathlib import Path

import pytest

from avfuse.config import apply_overrides, field_types, from_arguments, to_dict
from avfuse.evaluate import EvaluateConfig
from avfuse.extract import ExtractConfig
from avfuse.features import FeaturesConfig
from avfuse.fuse import FuseConfig
from avfuse.manifest import ScanConfig
from avfuse.melspec import FrontendConfig
from avfuse.model_config import PredictConfig, TrainConfig
from avfuse.runconfig import (
    RunConfig,
    default_config_path,
    load_run_config,
    render_config_toml,
    save_run_config,
    stage_configs,
)

DATA = Path(__file__).parent / "data"
STAGE_CONFIGS = {
    "scan": ScanConfig,
    "extract": ExtractConfig,
    "features": FeaturesConfig,
    "train": TrainConfig,
    "predict": PredictConfig,
    "evaluate": EvaluateConfig,
    "fuse": FuseConfig,
}


def test_default_file_is_generated_from_the_dataclasses() -> None:
    text = default_config_path().read_text("utf-8")
    assert text == render_config_toml(), (
        "default_run.toml is stale: regenerate it with "
        "python -c 'from avfuse.runconfig import *; "
        "default_config_path().write_text(render_config_toml())'"
    )
    assert load_run_config(default_config_path()) == RunConfig()


def _leaf_paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaf_paths(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def test_every_key_of_every_stage_is_documented() -> None:
    text = default_config_path().read_text("utf-8")
    lines = text.splitlines()
    data = tomllib.loads(text)
    # Every field of every section appears (unset optional ones as a commented-out key).
    cfg = RunConfig()
    for section in ("scan", "extract", "features", "train", "predict", "evaluate", "fuse"):
        fields = {f.name for f in dataclasses.fields(getattr(cfg, section))} - {"work", "root"}
        present = set(data[section]) | {
            ln.split()[1] for ln in lines if ln.startswith("# ") and " =   (unset" in ln
        }
        assert fields <= present, (section, sorted(fields - present))
    # Every key line is preceded by a comment explaining it.
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[", " ", "]")) and "=" in line:
            assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 4, line
    assert len(_leaf_paths(data)) > 80


def test_work_is_set_once() -> None:
    cfg = apply_overrides(RunConfig(root=Path("data")), ['extract.work="elsewhere"'])
    with pytest.raises(ValueError, match=r"\[extract\]\.work"):
        stage_configs(cfg)
    sc = stage_configs(RunConfig(root=Path("data"), work=Path("w")))
    assert {sc.extract.work, sc.features.work, sc.train.work, sc.scan.work} == {Path("w")}
    assert sc.scan.root == Path("data").resolve()
    assert sc.fuse is None  # no video scores: an audio-only run


def test_each_section_is_its_stage_config_with_the_run_filled_paths_optional() -> None:
    cfg = RunConfig()
    for name, stage_cls in STAGE_CONFIGS.items():
        sec = getattr(cfg, name)
        assert isinstance(sec, stage_cls), name
        assert dataclasses.is_dataclass(sec) and type(sec).__dataclass_params__.frozen
        theirs = {f.name: f for f in dataclasses.fields(stage_cls)}
        mine = {f.name: f for f in dataclasses.fields(sec)}
        assert list(mine) == list(theirs), name  # same keys, same order in the file
        # (by repr: a registry field's OneOf is made anew each time its annotation is resolved)
        mine_types, their_types = field_types(type(sec)), field_types(stage_cls)
        assert {k: repr(t) for k, t in mine_types.items()} == {
            k: repr(t) for k, t in their_types.items()
        }, name
        filled = {"work", "root"} if name == "scan" else {"work"}
        for key, f in mine.items():
            if key in filled:
                assert f.default == Path(".") and f.metadata["cli"] is False, (name, key)
            else:
                assert f.metadata.get("help") == theirs[key].metadata.get("help"), (name, key)
    # The one default a run changes: it keeps whichever audio model does best.
    assert cfg.predict.model_choice == "best"
    assert PredictConfig(work=Path("w")).model_choice == "network"
    # Sections are checked as their stage config is.
    with pytest.raises(ValueError, match="epochs"):
        apply_overrides(cfg, ["train.epochs=0"])


def test_a_section_key_that_does_not_exist_is_refused_by_its_section_name() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) for TrainSection at train: epoch;"):
        apply_overrides(RunConfig(), ["train.epoch=3"])


def test_run_config_pickles() -> None:
    """Sections are made by a function: they must still be importable by name."""
    cfg = apply_overrides(RunConfig(root=Path("d")), ["train.epochs=3", "fuse.method='logprob'"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_render_load_render_round_trips(tmp_path: Path) -> None:
    cfg = apply_overrides(
        RunConfig(root=Path("data"), work=Path("w")),
        [
            "train.epochs=3",
            "features.frontend.n_mels=40",
            'fuse.video_scores=["v.csv"]',
            'force=["fuse"]',
            "predict.split='test'",
        ],
    )
    text = render_config_toml(cfg)
    path = tmp_path / "rendered.toml"
    path.write_text(text, "utf-8")
    assert load_run_config(path) == cfg
    assert render_config_toml(load_run_config(path)) == text
    # The rendered file is commented TOML with the values of cfg, not of the defaults.
    data = tomllib.loads(text)
    assert data["train"]["epochs"] == 3 and data["features"]["frontend"]["n_mels"] == 40
    assert data["fuse"]["video_scores"] == ["v.csv"] and data["predict"]["split"] == "test"
    assert "work" not in data["train"] and "root" not in data["scan"]


def test_a_config_file_written_by_release_0_1_0_loads_unchanged(tmp_path: Path) -> None:
    """``run.toml`` saved by avfuse 0.1.0 (``save_run_config``) loads to the settings it held, and
    saving them again writes every key it had with the same value."""
    old = DATA / "run_config_0_1_0.toml"
    want = apply_overrides(
        RunConfig(root=Path("data/videos"), work=Path("runs/w1")),
        [
            'stop_after="fuse"',
            'force=["train"]',
            'scheduler="tcp://10.0.0.1:8786"',
            "progress=false",
            "extract.num_workers=3",
            "features.frontend.n_mels=32",
            'features.dtype="float32"',
            "train.epochs=7",
            "train.lr=0.01",
            'predict.model_choice="network"',
            'fuse.video_scores=["v.csv", "w.csv"]',
            'fuse.weight_selection="heldout"',
            'fuse.method="logprob"',
            'heldout_split="dev"',
        ],
    )
    got = load_run_config(old)
    assert got == want
    again = tomllib.loads(save_run_config(got, tmp_path / "run.toml").read_text("utf-8"))
    written = tomllib.loads(old.read_text("utf-8"))

    def leaves(d: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
        return out

    new, before = leaves(again), leaves(written)
    assert {k: new.get(k) for k in before} == before


def test_saving_an_unchanged_config_keeps_the_file(tmp_path: Path) -> None:
    cfg = RunConfig(root=Path("d"), work=Path("w"))
    path = save_run_config(cfg, tmp_path / "run.toml")
    stamp = path.stat().st_mtime_ns
    assert save_run_config(cfg, path) == path and path.stat().st_mtime_ns == stamp
    data = tomllib.loads(path.read_text("utf-8"))
    assert "work" not in data["extract"] and "root" not in data["scan"]  # filled by the run
    assert to_dict(load_run_config(path)) == to_dict(cfg)


def test_the_command_line_builds_a_run_config() -> None:
    from avfuse.cli import build_parser

    ns = build_parser("run").parse_args(["run", "data", "-o", "w", "--no-progress"])
    cfg = from_arguments(RunConfig, ns)
    assert (cfg.root, cfg.work, cfg.progress) == (Path("data"), Path("w"), False)
    assert stage_configs(cfg).train.progress is False


PANNS = FrontendConfig.panns()


def test_run_extracts_at_the_front_ends_rate() -> None:
    from avfuse.runconfig import RunConfig, stage_configs

    cfg = RunConfig(root=Path("data"), work=Path("w"))
    assert stage_configs(cfg).extract.sample_rate == 16000
    panns = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, frontend=PANNS))
    assert stage_configs(panns).extract.sample_rate == 32000
    clash = dataclasses.replace(panns, extract=dataclasses.replace(cfg.extract, sample_rate=22050))
    with pytest.raises(ValueError, match="sample_rate"):
        stage_configs(clash)
