"""`avfuse run`: config file, overrides, and redoing exactly the stages a change requires."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse import cli, demo
from avfuse.config import apply_overrides, to_dict
from avfuse.io import read_json, write_json
from avfuse.pipeline import (
    STAGES,
    RunConfig,
    default_config_path,
    load_run_config,
    render_config_toml,
    run,
    stage_configs,
    stage_keys,
)

# ------------------------------------------------------------------------- config file


def test_default_file_is_generated_from_the_dataclasses() -> None:
    text = default_config_path().read_text("utf-8")
    assert text == render_config_toml(), (
        "default_run.toml is stale: regenerate it with "
        "python -c 'from avfuse.pipeline import *; "
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
    first = run(cfg)
    assert set(_statuses(first).values()) == {"ran"}
    assert first.report == work / "report.md"
    t1 = _mtimes(work)

    # Second run, through the CLI with a config file: nothing is redone, nothing rewritten.
    from avfuse.pipeline import save_run_config

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


def test_dataset_listing_is_every_file_sorted_and_survives_undecodable_names(tmp_path) -> None:
    """The fingerprint walk against os.walk, and its hash against the per-row definition."""
    import hashlib
    import os

    from avfuse.pipeline import dataset_listing, listing_hash

    root = tmp_path / "data"
    for rel, size in (("train/b/x.mp4", 3), ("train/a/é.mp4", 5), ("val/a/y.mkv", 0)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"z" * size)
    # A name that is not UTF-8 (a Latin-1 file system): listed escaped instead of crashing.
    # Some file systems (APFS, ZFS with utf8only) refuse such names: then only the rest is checked.
    bad = os.path.join(os.fsencode(root / "val" / "a"), b"caf\xe9.mp4")
    try:
        with open(bad, "wb") as fh:
            fh.write(b"1234")
        has_bad = True
    except OSError:
        has_bad = False
    got = dataset_listing(root)
    want = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            rel = os.fsencode(rel).decode("utf-8", "backslashreplace")
            want.append((rel, st.st_size, st.st_mtime_ns))
    want.sort()
    cols = [got.column(c).to_pylist() for c in ("path", "size", "mtime_ns")]
    assert list(zip(*cols, strict=True)) == want
    assert ("val/a/caf\\xe9.mp4" in set(cols[0])) == has_bad
    h = hashlib.sha256()
    for path, size, mtime in want:
        h.update(f"{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    assert listing_hash(got) == h.hexdigest()[:16]
