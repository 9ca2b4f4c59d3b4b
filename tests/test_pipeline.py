"""`avfuse run`: config file, overrides, and redoing exactly the stages a change requires."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse import cli, demo
from avfuse.config import apply_overrides, to_dict
from avfuse.io import read_json, write_json
from avfuse.pipeline import run, stage_keys
from avfuse.runconfig import (
    STAGES,
    RunConfig,
    load_run_config,
    save_run_config,
    stage_configs,
)


def test_keys_follow_the_dependency_chain() -> None:
    base = apply_overrides(
        RunConfig(root=Path("data"), work=Path("w")), ['fuse.video_scores=["v.csv"]']
    )
    k0 = stage_keys(stage_configs(base))

    def changed(*overrides: str) -> list[str]:
        k = stage_keys(stage_configs(apply_overrides(base, list(overrides))))
        return [s for s in STAGES if k[s]["key"] != k0[s]["key"]]

    assert changed("train.lr=0.01") == ["train", "predict", "evaluate", "fuse", "report"]
    assert changed("features.dtype='float32'") == list(STAGES[2:])
    assert changed("fuse.method='logprob'") == ["fuse", "report"]
    # How a stage runs is not what it produces.
    assert changed("extract.num_workers=1", "train.progress=false", "features.batch_size=3") == []


# ------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    tmp = tmp_path_factory.mktemp("pipe")
    info = demo.generate_dataset(
        tmp / "data",
        seed=11,
        classes=3,
        per_split={"train": 3, "val": 3},
        seconds=2.0,
        no_audio_fraction=0,
        short_fraction=0,
        unreadable=0,
        num_workers=0,
        progress=False,
    )
    # A video model's scores: a CSV with file names and one logit column per class.
    rng = np.random.default_rng(0)
    classes = sorted({s.label for s in info.specs})
    val = [s for s in info.specs if s.split == "val"]
    logits = rng.normal(0, 1, (len(val), len(classes)))
    for row, s in zip(logits, val, strict=True):
        row[classes.index(s.label)] += 1.5
    csv = tmp / "video_val.csv"
    df = pd.DataFrame(logits, columns=classes)
    df.insert(0, "filename", [Path(s.rel).name for s in val])
    df.to_csv(csv, index=False)
    cfg = apply_overrides(
        RunConfig(root=tmp / "data", work=tmp / "work"),
        [
            "extract.num_workers=0",
            "extract.progress=false",
            "features.num_workers=0",
            "features.progress=false",
            "train.epochs=1",
            "train.width=0.25",
            "train.batch_size=16",
            "train.min_steps=0",
            "train.num_workers=0",
            "train.progress=false",
            f'fuse.video_scores=["{csv}"]',
            "fuse.folds=2",
            "fuse.bootstrap=200",
        ],
    )
    return cfg, tmp


def _statuses(res: object) -> dict[str, str]:
    return {s.name: s.status for s in res.stages}  # type: ignore[attr-defined]


def _mtimes(work: Path) -> dict[str, int]:
    files = [
        "manifest.parquet",
        "extract.parquet",
        "features/index.parquet",
        "runs/audio/best.pt",
        "scores/audio_val.npz",
        "scores/audio_val.metrics.json",
        "fusion/fused_val.npz",
        "report.md",
    ]
    return {f: (work / f).stat().st_mtime_ns for f in files}


def test_rerun_redoes_only_what_changed(
    setup: tuple[RunConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, tmp = setup
    work = Path(cfg.work)
    capsys.readouterr()
    first = run(cfg)
    assert set(_statuses(first).values()) == {"ran"}
    # run() prints nothing: each stage's own summary comes back in its outcome, and the
    # command line prints them before the run's table.
    assert capsys.readouterr().out == ""
    said = {s.name: s.summary for s in first.stages}
    assert said["extract"].startswith("extract: 18 videos") and said["report"] == ""
    text = first.summary()
    assert text.index(said["extract"]) < text.index(said["fuse"]) < text.index("avfuse run ->")
    assert first.report == work / "report.md"
    t1 = _mtimes(work)

    # Second run, through the CLI with a config file: nothing is redone, nothing rewritten.
    path = save_run_config(cfg, tmp / "my_run.toml")
    capsys.readouterr()
    assert cli.main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(STAGES)
    assert _mtimes(work) == t1

    # A training key: train and what follows, never extract or features.
    res = run(apply_overrides(cfg, ["train.seed=1"]))
    st = _statuses(res)
    assert [s for s in STAGES if st[s] == "ran"] == [
        "train",
        "predict",
        "evaluate",
        "fuse",
        "report",
    ]
    t2 = _mtimes(work)
    for f in ("manifest.parquet", "extract.parquet", "features/index.parquet"):
        assert t2[f] == t1[f], f
    for f in ("runs/audio/best.pt", "scores/audio_val.npz", "fusion/fused_val.npz"):
        assert t2[f] > t1[f], f

    # A fusion key: fusion and the report only.
    cfg2 = apply_overrides(cfg, ["train.seed=1", "fuse.method='logprob'"])
    st = _statuses(run(cfg2))
    assert [s for s in STAGES if st[s] == "ran"] == ["fuse", "report"]

    # A lost output is redone, with what depends on it.
    (work / "fusion" / "report.md").unlink()
    st = _statuses(run(cfg2))
    assert [s for s in STAGES if st[s] == "ran"] == ["fuse", "report"]

    # A kill during evaluate: its record says running, its output is gone. The rerun resumes
    # there and redoes what follows.
    state_path = work / "pipeline.json"
    state = read_json(state_path)["stages"]
    state["evaluate"]["state"] = "running"
    write_json(state_path, {"stages": state})
    (work / "scores" / "audio_val.metrics.json").unlink()
    st = _statuses(run(cfg2))
    assert [s for s in STAGES if st[s] in ("ran", "resumed")] == ["evaluate", "fuse", "report"]
    assert st["evaluate"] == "resumed"
    assert (work / "scores" / "audio_val.metrics.json").exists()

    # The state file records every stage as done with the current keys.
    state = read_json(state_path)["stages"]
    keys = stage_keys(stage_configs(cfg2))
    assert all(state[s]["state"] == "done" and state[s]["key"] == keys[s]["key"] for s in STAGES)
    assert to_dict(load_run_config(work / "run.toml")) == to_dict(cfg2)

    # A feature key forces the store to be rebuilt (no mismatch error); extract stays, and
    # every later stage is marked stale (stop_after keeps this test short).
    cfg3 = apply_overrides(cfg2, ["features.dtype='float32'", "stop_after='features'"])
    t3 = _mtimes(work)
    st = _statuses(run(cfg3))
    assert [s for s in STAGES if st[s] == "ran"] == ["features"]
    assert all(st[s] == "not run" for s in STAGES[3:])
    assert _mtimes(work)["extract.parquet"] == t3["extract.parquet"]
    from avfuse.store import FeatureStore

    store = FeatureStore(work / "features")
    assert str(store.dtype) == "float32"
    man = pd.read_parquet(work / "manifest.parquet")
    assert set(store.ids) == set(man["video_id"])
    state = read_json(state_path)["stages"]
    assert {state[s]["state"] for s in STAGES[3:]} == {"stale"}


def test_a_stage_rerun_by_hand_makes_the_run_redo_what_follows(
    setup: tuple[RunConfig, Path],
) -> None:
    cfg, _ = setup
    work = Path(cfg.work)
    run(cfg)
    assert set(_statuses(run(cfg)).values()) == {"skipped"}
    before = _mtimes(work)
    # The user recomputes the features outside `avfuse run`: no setting changed, the store did.
    from avfuse.features import compute_features

    compute_features(dataclasses.replace(stage_configs(cfg).features, force=True))
    st = _statuses(run(cfg))
    assert [s for s in STAGES if st[s] == "ran"] == [
        "train",
        "predict",
        "evaluate",
        "fuse",
        "report",
    ]
    assert st["features"] == "skipped"
    after = _mtimes(work)
    assert after["runs/audio/best.pt"] > before["runs/audio/best.pt"]
    # ... and once redone, nothing more: the run's own outputs are not mistaken for a change.
    assert set(_statuses(run(cfg)).values()) == {"skipped"}


def test_run_level_scheduler_reaches_extract_and_features_unless_overridden(
    tmp_path: Path,
) -> None:
    cfg = apply_overrides(
        RunConfig(root=tmp_path, work=tmp_path / "w"),
        ['scheduler="tcp://10.0.0.1:8786"', 'features.scheduler="tcp://10.0.0.2:8786"'],
    )
    sc = stage_configs(cfg)
    assert sc.extract.scheduler == "tcp://10.0.0.1:8786"
    assert sc.features.scheduler == "tcp://10.0.0.2:8786"
    # Where to run does not change results: the stage keys ignore it.
    plain = stage_keys(stage_configs(RunConfig(root=tmp_path, work=tmp_path / "w")))
    assert stage_keys(sc) == plain


def test_the_orchestrator_leaves_record_logs_and_their_columns_to_the_stages() -> None:
    """Each stage writes its own record log and knows its columns: the orchestrator asks the
    stage (``invalidate``, ``is_done``, ...) instead of writing records by hand."""
    import ast

    import avfuse.pipeline

    tree = ast.parse(Path(avfuse.pipeline.__file__).read_text("utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not names & {"RecordLog", "extract_parts", "features_parts", "store_problem"}
    strings = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    columns = {"status", "reason", "audio_path", "feature_status", "feature_reason", "shard"}
    assert not strings & (columns | {"offset", "num_frames", "epoch"})
