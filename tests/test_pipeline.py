"""`avfuse run`: config file, overrides, and redoing exactly the stages a change requires."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse import cli, demo, features
from avfuse.config import apply_overrides, to_dict
from avfuse.embed import EmbedConfig
from avfuse.extract import load_audio
from avfuse.io import read_json, write_json, write_table
from avfuse.pipeline import run, stage_keys
from avfuse.runconfig import STAGES, RunConfig, load_run_config, save_run_config, stage_configs
from avfuse.store import CorruptStoreError, FeatureStore, store_problem
from tests.media import peak_frequency, write_tone_video
from tests.released import finetune_work
from tests.workfolders import copy_work, stage_status, tone_dataset, truncate


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


def test_run_keys_training_by_the_embeddings_it_reads(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path
) -> None:
    work0, _ = embedded
    work = copy_work(work0, tmp_path)
    cfg = apply_overrides(
        RunConfig(root=tmp_path / "data", work=work), ['train.from_embeddings="cnn10"']
    )
    k0 = stage_keys(stage_configs(cfg))
    meta_path = work / "embeddings" / "cnn10" / "store.json"
    meta = read_json(meta_path)
    write_json(meta_path, {**meta, "frontend_hash": "other-weights"})  # rebuilt elsewhere
    k1 = stage_keys(stage_configs(cfg))
    changed = [s for s in k0 if k0[s]["key"] != k1[s]["key"]]
    assert changed[0] == "train" and "predict" in changed and "features" not in changed
    assert k0["train"]["config"] != k1["train"]["config"]  # a redo, not a resume
    plain = RunConfig(root=tmp_path / "data", work=work)  # no embeddings: keys unaffected
    assert stage_keys(stage_configs(plain))["train"] == stage_keys(stage_configs(plain))["train"]


def test_run_does_not_call_a_truncated_feature_store_up_to_date(tmp_path: Path) -> None:
    work = finetune_work(tmp_path / "w", n_mels=64, example_frames=96, frames=(96, 300))
    sc = stage_configs(RunConfig(root=tmp_path / "data", work=work))
    assert not features.is_done(sc.features)  # the store without the stage's table
    ids = FeatureStore(work / "features").ids
    write_table(pd.DataFrame({"video_id": ids, "feature_status": "ok"}), work / "features.parquet")
    assert store_problem(work / "features") == "" and features.is_done(sc.features)
    shard = sorted((work / "features" / "shards").iterdir())[0]
    truncate(shard)
    assert not features.is_done(sc.features)
    assert str(shard) in store_problem(work / "features")
    for name in ("index.parquet", "store.json"):
        shutil.rmtree(work)
        work = finetune_work(tmp_path / "w", n_mels=64, example_frames=96, frames=(96, 300))
        (work / "features" / name).write_text("garbage")
        problem = store_problem(work / "features")
        assert str(work / "features" / name) in problem and "avfuse features" in problem
        with pytest.raises(CorruptStoreError, match=name):
            FeatureStore(work / "features")


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


# ---------------------------------------------------------- a lost pipeline.json, a changed dataset


def _run_cfg(tmp: Path, *extra: str) -> RunConfig:
    return apply_overrides(
        RunConfig(root=tmp / "data", work=tmp / "work"),
        [
            "extract.num_workers=0",
            "extract.progress=false",
            "features.num_workers=0",
            "features.progress=false",
            "train.epochs=1",
            "train.width=0.25",
            "train.batch_size=4",
            "train.num_workers=0",
            "train.progress=false",
            "train.min_steps=0",  # bookkeeping is under test, not learning: one epoch
            *extra,
        ],
    )


def test_corrupt_pipeline_json_is_reported_and_finished_stages_are_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tone_dataset(tmp_path / "data")
    cfg = _run_cfg(tmp_path, "stop_after='evaluate'")
    first = _statuses(run(cfg))
    assert first["train"] == "ran"
    work = tmp_path / "work"
    best = (work / "runs" / "audio" / "best.pt").stat().st_mtime_ns
    state = work / "pipeline.json"
    state.write_text(state.read_text()[:40])  # a write cut short

    with caplog.at_level("WARNING", logger="avfuse"):
        st = _statuses(run(cfg))
    assert any(str(state) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert [s for s, v in st.items() if v == "skipped"] == [
        "scan",
        "extract",
        "features",
        "train",
        "predict",
        "evaluate",
    ]
    assert (work / "runs" / "audio" / "best.pt").stat().st_mtime_ns == best  # not retrained
    assert read_json(state)["stages"]["train"]["state"] == "done"

    # Settings that differ from the saved ones are not reused.
    state.unlink()
    st = _statuses(run(apply_overrides(cfg, ["train.seed=5"])))
    assert st["features"] == "skipped" and st["train"] == "ran"


def test_a_changed_dataset_is_noticed_and_only_what_changed_is_redone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tone_dataset(data)
    cfg = _run_cfg(tmp_path, "stop_after='features'")
    work = tmp_path / "work"
    assert set(_statuses(run(cfg)).values()) == {"ran", "not run"}
    assert _statuses(run(cfg))["scan"] == "skipped"

    def rerun() -> dict[str, str]:
        st = _statuses(run(cfg))
        assert st["scan"] == st["extract"] == st["features"] == "ran", st
        return stage_status(work, "features.parquet", "feature_status")

    # Added.
    write_tone_video(data / "val" / "a" / "new.mp4", freq=440, duration=1.3, rate=16000, fps=2)
    status = rerun()
    assert status["val/a/new"] == "ok"
    assert "val/a/new" in FeatureStore(work / "features")

    # Deleted.
    (data / "train" / "a" / "x2.mp4").unlink()
    status = rerun()
    assert "train/a/x2" not in status and "train/a/x2" not in FeatureStore(work / "features")

    # Replaced in place: same name, other sound.
    before = np.array(FeatureStore(work / "features")["train/b/y1"], np.float32)
    y1 = data / "train" / "b" / "y1.mp4"
    y1.unlink()
    write_tone_video(y1, freq=220, duration=1.3, rate=16000, channels=1, fps=2)
    status = rerun()
    audio = load_audio(work / "audio" / "train" / "b" / "y1.flac")
    assert peak_frequency(audio, 16000) == pytest.approx(220, abs=5)
    after = np.array(FeatureStore(work / "features")["train/b/y1"], np.float32)
    assert before.shape[1] == after.shape[1] and not np.allclose(before[:10], after[:10])
    assert set(status.values()) == {"ok"}
    assert read_json(work / "pipeline.json")["dataset"]
