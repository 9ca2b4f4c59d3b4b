"""Cached results are keyed by what they came from, damaged caches are rebuilt by a plain
rerun (or named with the command that rebuilds them), and a full disk or Ctrl-C ends in one
line that says what to do."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from avfuse import cli, features
from avfuse.config import apply_overrides
from avfuse.embed import EmbedConfig, embed
from avfuse.io import read_json, write_json, write_table
from avfuse.models import Cnn10
from avfuse.pipeline import stage_keys
from avfuse.runconfig import RunConfig, stage_configs
from avfuse.store import CorruptStoreError, FeatureStore, store_problem
from avfuse.train import TrainConfig, train
from tests.test_pretrained import _randomise, _save_released, _work
from tests.test_train import TINY


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1, err
    return err[0]


def _truncate(path: Path, keep: int = 200) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])


def _rows(store: FeatureStore) -> dict[str, np.ndarray]:
    return {v: np.asarray(store[v]).copy() for v in store.ids}


def _copy(work0: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped work folder, for a test that changes it."""
    work = tmp_path / "w"
    shutil.copytree(work0, work)
    return work


def _cnn10_weights(seed: int, path: Path) -> Path:
    return _save_released(_randomise(Cnn10(3, width=0.125), seed), path)


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EmbedConfig]:
    tmp = tmp_path_factory.mktemp("emb")
    work = _work(tmp / "w", n_mels=64, example_frames=96, frames=(96, 300))
    init = _cnn10_weights(8, tmp / "i.pth")
    cfg = EmbedConfig(
        work,
        model="cnn10",
        init=init,
        width=0.125,
        device="cpu",
        amp="off",
        channels_last=False,
        progress=False,
        chunk_videos=3,
    )
    embed(cfg)
    return work, cfg


def test_truncated_embedding_shard_names_embed_and_a_plain_rerun_repairs_it(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path
) -> None:
    work0, cfg0 = embedded
    work = _copy(work0, tmp_path)
    cfg = EmbedConfig(**{**cfg0.__dict__, "work": work})
    root = work / "embeddings" / "cnn10"
    before = _rows(FeatureStore(root))
    shards = sorted((root / "shards").iterdir())
    assert len(shards) > 1
    _truncate(shards[0])
    with pytest.raises(CorruptStoreError, match="run `avfuse embed` again") as info:
        FeatureStore(root)
    assert str(shards[0]) in str(info.value)
    assert "avfuse embed" in store_problem(root)

    res = embed(cfg)  # plain rerun
    in_bad = len(
        pd.read_parquet(work0 / "embeddings" / "cnn10" / "index.parquet").query(
            "shard == @shards[0].name"
        )
    )
    assert res.embedded == in_bad > 0 and res.skipped == len(before) - in_bad
    after = _rows(FeatureStore(root))
    assert after.keys() == before.keys()
    for v in before:
        np.testing.assert_allclose(after[v], before[v], rtol=1e-6, atol=1e-6)


def test_embed_force_redoes_everything_and_replaces_other_settings(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path
) -> None:
    work0, cfg0 = embedded
    work = _copy(work0, tmp_path)
    root = work / "embeddings" / "cnn10"
    before = _rows(FeatureStore(root))
    other = _cnn10_weights(9, tmp_path / "o.pth")
    cfg = EmbedConfig(**{**cfg0.__dict__, "work": work, "init": other})
    with pytest.raises(ValueError, match="pass --force"):
        embed(cfg)
    res = embed(EmbedConfig(**{**cfg.__dict__, "force": True}))
    assert res.embedded == len(before) and res.skipped == 0
    after = _rows(FeatureStore(root))
    assert after.keys() == before.keys()
    assert not all(np.allclose(after[v], before[v]) for v in before)  # other weights


def test_run_keys_training_by_the_embeddings_it_reads(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path
) -> None:
    work0, _ = embedded
    work = _copy(work0, tmp_path)
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


def test_from_embeddings_refuses_settings_it_would_ignore_and_records_none(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work0, _ = embedded
    work = _copy(work0, tmp_path)
    for extra in (["--model", "cnn14"], ["--window", "64"]):
        rc = cli.main(["train", str(work), "--from-embeddings", "cnn10", *extra])
        assert rc == 2
        line = _one_error_line(capsys)
        assert f"--{extra[0][2:]} {extra[1]} would be ignored" in line
    opts = {k: v for k, v in TINY.items() if k != "model"}
    out = train(TrainConfig(work, name="head", from_embeddings="cnn10", **{**opts, "epochs": 1}))
    assert out is not None
    saved = tomllib.loads((work / "runs" / "head" / "config.toml").read_text("utf-8"))
    assert saved["from_embeddings"] == "cnn10" and "model" not in saved and "window" not in saved


# --------------------------------------------------------------------------- feature store


def test_run_does_not_call_a_truncated_feature_store_up_to_date(tmp_path: Path) -> None:
    work = _work(tmp_path / "w", n_mels=64, example_frames=96, frames=(96, 300))
    sc = stage_configs(RunConfig(root=tmp_path / "data", work=work))
    assert not features.is_done(sc.features)  # the store without the stage's table
    ids = FeatureStore(work / "features").ids
    write_table(pd.DataFrame({"video_id": ids, "feature_status": "ok"}), work / "features.parquet")
    assert store_problem(work / "features") == "" and features.is_done(sc.features)
    shard = sorted((work / "features" / "shards").iterdir())[0]
    _truncate(shard)
    assert not features.is_done(sc.features)
    assert str(shard) in store_problem(work / "features")
    for name in ("index.parquet", "store.json"):
        shutil.rmtree(work)
        work = _work(tmp_path / "w", n_mels=64, example_frames=96, frames=(96, 300))
        (work / "features" / name).write_text("garbage")
        problem = store_problem(work / "features")
        assert str(work / "features" / name) in problem and "avfuse features" in problem
        with pytest.raises(CorruptStoreError, match=name):
            FeatureStore(work / "features")


# --------------------------------------------------------------------------- Ctrl-C and disks


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


def test_full_disk_while_saving_a_checkpoint_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _work(tmp_path / "w", n_mels=64, example_frames=96, frames=(96, 300))

    def full(obj: object, f: object, *a: object, **k: object) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 1536 vs 1472"
        )

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))  # type: ignore[attr-defined]
    args = ["train", str(work), "--model", "resnet", "--width", "0.125", "--epochs", "1"]
    args += ["--device", "cpu", "--amp", "off", "--num-workers", "0", "--no-progress"]
    args += ["--set", "min_steps=1", "--set", "batch_size=4"]
    assert cli.main(args) == 2
    line = _one_error_line(capsys)
    assert "no space left on the device holding" in line and str(work / "runs" / "audio") in line
    assert "inline_container" in line  # what torch said, kept as the detail


# --------------------------------------------------------------------------- stage tables


@pytest.fixture(scope="module")
def featured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scanned, extracted and featurised work folder of five short tone videos."""
    from avfuse.extract import ExtractConfig, extract
    from avfuse.features import FeaturesConfig, compute_features
    from avfuse.manifest import ScanConfig, scan
    from tests.media import make_dataset

    tmp = tmp_path_factory.mktemp("feat")
    layout = {"train": {"a": ["x1.mp4", "x2.mp4"], "b": ["y1.mp4"]}}
    make_dataset(tmp / "data", {**layout, "val": {"a": ["z1.mp4"], "b": ["z2.mp4"]}}, 1.5)
    work = tmp / "w"
    scan(ScanConfig(tmp / "data", work))
    extract(ExtractConfig(work, num_workers=0, progress=False))
    compute_features(FeaturesConfig(work, num_workers=0, progress=False))
    return work


def _features(work: Path) -> object:
    from avfuse.features import FeaturesConfig, compute_features

    return compute_features(FeaturesConfig(work, num_workers=0, progress=False))


def _state(work: Path) -> tuple[dict[str, np.ndarray], list[list[object]]]:
    table = pd.read_parquet(work / "features.parquet")
    cols = ["video_id", "feature_status", "num_frames"]
    return _rows(FeatureStore(work / "features")), table[cols].values.tolist()


@pytest.mark.parametrize(
    "damaged",
    ["features/index.parquet", "features/store.json", "features.parquet", "log part"],
)
def test_a_damaged_table_or_log_part_is_rebuilt_by_a_plain_rerun(
    featured: Path, tmp_path: Path, damaged: str, caplog: pytest.LogCaptureFixture
) -> None:
    work = _copy(featured, tmp_path)
    want_rows, want_table = _state(work)
    if damaged == "log part":
        target = sorted((work / "features" / "parts").glob("part-*.parquet"))[0]
    else:
        target = work / damaged
    target.write_bytes(b"garbage")
    _features(work)
    got_rows, got_table = _state(work)
    assert got_table == want_table
    assert got_rows.keys() == want_rows.keys()
    for v in want_rows:
        np.testing.assert_array_equal(got_rows[v], want_rows[v])
    assert str(target) in caplog.text  # the rerun says what it rebuilt


def test_a_damaged_extract_table_is_named_with_the_command_that_rebuilds_it(
    featured: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _copy(featured, tmp_path)
    (work / "extract.parquet").write_bytes(b"garbage")
    assert cli.main(["features", str(work), "--num-workers", "0", "--force"]) == 2
    line = _one_error_line(capsys)
    assert f"{work / 'extract.parquet'}: unreadable" in line and "avfuse extract" in line


def test_a_full_disk_while_writing_a_shard_is_one_line_naming_the_folder(
    featured: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = _copy(featured, tmp_path)

    def short_write(fh: object, arr: np.ndarray, *a: object, **k: object) -> None:
        raise OSError(f"{arr.nbytes} requested and 4096 written")

    monkeypatch.setattr(np, "save", short_write)
    assert cli.main(["features", str(work), "--num-workers", "0", "--force"]) == 2
    line = _one_error_line(capsys)
    assert f"no space left on the device holding {work / 'features' / 'shards'}" in line
    assert "requested and" in line and "Traceback" not in line
    monkeypatch.undo()
    _features(work)  # space freed: a rerun completes with the same features
    assert _state(work)[1] == _state(featured)[1]
