"""The features stage: statuses, store contents, resume after kill -9, front-end checks, a Dask
cluster, a full disk, damaged tables and shards rebuilt by a plain rerun."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import avfuse.features as features_mod
from avfuse import cli, features
from avfuse.audio import load_audio, write_audio
from avfuse.extract import COLUMNS as EXTRACT_COLUMNS
from avfuse.extract import extract
from avfuse.features import FeaturesConfig, compute_features
from avfuse.io import DiskFullError, read_json, read_table, write_table
from avfuse.manifest import ScanConfig, load_classes, scan
from avfuse.melspec import FrontendConfig, log_mel
from avfuse.store import CorruptStoreError, FeatureStore, FrontendMismatchError, store_problem
from avfuse.workdir import StoreLayout
from tests.commands import error_line
from tests.workfolders import copy_work, extract_cfg, features_cfg, scanned_tones, store_rows

SR = 16000
REPO = Path(__file__).resolve().parents[1]

# name -> (seconds of audio, extract status); None seconds: no audio file.
LAYOUT: dict[str, tuple[float | None, str]] = {
    "train/run/a": (2.0, "ok"),
    "train/run/b": (1.3, "ok"),
    "train/run/c": (0.9, "ok"),  # 88 frames: stored as they are, padded when windows are cut
    "train/swim/d": (3.1, "partial"),
    "train/swim/e": (None, "no_audio"),
    "train/swim/f": (0.975, "ok"),  # exactly 96 frames
    "val/run/g": (2.4, "ok"),
    "val/swim/h": (1.7, "ok"),
}


def signal(i: int, seconds: float) -> np.ndarray:
    n = round(seconds * SR)
    t = np.arange(n) / SR
    rng = np.random.default_rng(i)
    x = 0.2 * rng.standard_normal(n) + 0.4 * np.sin(2 * np.pi * (300 + 500 * i) * t)
    return x.astype(np.float32)


def make_work(tmp: Path, layout: dict[str, tuple[float | None, str]] = LAYOUT) -> Path:
    """A work folder as stage 1 leaves it: manifest, classes, extract.parquet, FLAC files."""
    root, work = tmp / "data", tmp / "work"
    for vid in layout:
        p = root / f"{vid}.mp4"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not decoded by these tests")
    scan(ScanConfig(root=root, work=work))
    rows = []
    for i, (vid, (seconds, status)) in enumerate(sorted(layout.items())):
        rec = dict.fromkeys(EXTRACT_COLUMNS, "")
        rec.update(video_id=vid, status=status, reason="", codec="aac", sample_rate=SR)
        rec.update(source_sample_rate=44100, channels=2, stream_index=0, n_audio_streams=1)
        if seconds is None:
            rec.update(reason="the file has no audio stream", num_samples=0, duration_s=0.0)
            rec.update(n_audio_streams=0)
        else:
            rel = f"audio/{vid}.flac"
            x = signal(i, seconds)
            write_audio(work / rel, x, SR)
            rec.update(audio_path=rel, num_samples=len(x), duration_s=len(x) / SR)
            if status == "partial":
                rec["reason"] = "decoded 3.10 s of 5.00 s declared"
        rows.append(rec)
    write_table(pd.DataFrame(rows), work / "extract.parquet")
    return work


def expected(work: Path, vid: str, cfg: FrontendConfig | None = None) -> np.ndarray:
    return log_mel(load_audio(work / "audio" / f"{vid}.flac"), cfg or FrontendConfig())


def store_arrays(work: Path) -> dict[str, np.ndarray]:
    st = FeatureStore(work / "features")
    return {v: np.array(st[v]) for v in st.ids}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    return make_work(tmp_path)


def test_features_round_trip_and_statuses(work: Path) -> None:
    # Tiny shards and batches: several shards, several videos per shard.
    cfg = FeaturesConfig(work=work, num_workers=0, shard_mb=0.02, batch_size=3, progress=False)
    res = compute_features(cfg)
    table = read_table(work / "features.parquet").set_index("video_id")
    assert sorted(table.index) == sorted(LAYOUT)
    status = table["feature_status"].to_dict()
    assert status == {
        "train/run/a": "ok",
        "train/run/b": "ok",
        "train/run/c": "padded",
        "train/swim/d": "ok",
        "train/swim/e": "not_extracted",
        "train/swim/f": "ok",
        "val/run/g": "ok",
        "val/swim/h": "ok",
    }
    assert "(88 of 96 frames)" in table.loc["train/run/c", "feature_reason"]
    assert table.loc["train/run/c", "num_frames"] == 88
    assert "no_audio" in table.loc["train/swim/e", "feature_reason"]
    assert "no audio stream" in table.loc["train/swim/e", "feature_reason"]
    assert table.loc["train/swim/f", "num_frames"] == 96

    st = FeatureStore(work / "features")
    ok = sorted(v for v, s in status.items() if s in ("ok", "padded"))
    assert st.ids == ok
    assert st.classes == load_classes(work) == ["run", "swim"]
    assert st.dtype == np.float16 and st.frontend == FrontendConfig()
    assert st.frontend_hash == FrontendConfig().hash()
    assert len({p.name for p in (work / "features" / "shards").iterdir()}) > 1
    for vid in ok:
        want = expected(work, vid)
        got = st[vid]
        assert got.shape == want.shape and st.frames(vid) == len(want)
        assert table.loc[vid, "num_frames"] == len(want)
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=4e-3)
        start = len(want) - 96
        if start >= 0:
            np.testing.assert_array_equal(st.window(vid, start, 96), got[start:])
    assert res.counts == {"ok": 6, "padded": 1, "not_extracted": 1}
    assert "7 of 8 videos" in res.summary()
    saved = (work / "features" / "config.toml").read_text()
    assert "[frontend]" in saved and "n_mels = 64" in saved


def test_rerun_skips_everything_and_keeps_the_store(work: Path) -> None:
    cfg = FeaturesConfig(work=work, num_workers=0, progress=False)
    compute_features(cfg)
    before = store_arrays(work)
    tables = [read_table(work / name) for name in ("features.parquet", "features/index.parquet")]
    res = compute_features(cfg)
    assert res.computed == 0 and res.skipped == 7
    after = store_arrays(work)
    assert before.keys() == after.keys()
    for v in before:
        np.testing.assert_array_equal(before[v], after[v])
    # The first run committed the records it had just computed, the rerun the same records read
    # back from the log: the committed tables are the same.
    pd.testing.assert_frame_equal(read_table(work / "features.parquet"), tables[0])
    pd.testing.assert_frame_equal(read_table(work / "features/index.parquet"), tables[1])


def test_a_finished_rerun_writes_nothing_and_changed_inputs_recommit(work: Path) -> None:
    """Nothing to do: the committed table and index stay as they are (not rewritten), with the
    same figures; a changed extract table or a lost shard recommit."""
    cfg = FeaturesConfig(work=work, num_workers=0, progress=False)
    first = compute_features(cfg)
    table, index = work / "features.parquet", work / "features" / "index.parquet"

    def stamp() -> tuple[int, int]:
        return table.stat().st_ino, index.stat().st_ino

    before = stamp()
    again = compute_features(cfg)
    assert stamp() == before
    assert (again.computed, again.skipped) == (0, 7)
    assert again.counts == first.counts == {"ok": 6, "padded": 1, "not_extracted": 1}
    assert again.stored_frames == first.stored_frames and again.num_shards == first.num_shards
    assert again.summary().splitlines()[0] == first.summary().splitlines()[0]
    assert "train/swim/e: not_extracted" in again.summary()
    pd.testing.assert_frame_equal(again.table, first.table)

    # extract's table changes (a video lost its sound): the commit follows it.
    ext = read_table(work / "extract.parquet")
    ext.loc[ext["video_id"] == "train/run/a", "status"] = "no_audio"
    write_table(ext, work / "extract.parquet")
    third = compute_features(cfg)
    assert stamp() != before and third.counts["not_extracted"] == 2

    # A shard file lost: its videos are recomputed, not reported as done.
    shard = next((work / "features" / "shards").iterdir())
    shard.unlink()
    fourth = compute_features(cfg)
    assert fourth.computed > 0 and FeatureStore(work / "features").ids == sorted(
        v for v, st in read_table(table).set_index("video_id")["feature_status"].items()
        if st in ("ok", "padded")
    )  # fmt: skip


def test_a_damaged_shard_of_a_padded_clip_is_recomputed(work: Path) -> None:
    """A padded clip's frames are stored like any other: a rerun finds its damaged shard and
    recomputes it (a shard holding only padded clips used to go unchecked, left broken)."""
    cfg = FeaturesConfig(work=work, num_workers=0, shard_mb=1e-6, batch_size=1, progress=False)
    compute_features(cfg)
    index = read_table(work / "features" / "index.parquet").set_index("video_id")
    shard = work / "features" / "shards" / index.loc["train/run/c", "shard"]
    assert (index["shard"] == shard.name).sum() == 1  # the padded clip alone in its shard
    shard.write_bytes(shard.read_bytes()[:-100])
    assert str(shard) in store_problem(work / "features")
    again = compute_features(cfg)
    assert again.computed == 1 and store_problem(work / "features") == ""
    got = FeatureStore(work / "features")["train/run/c"]
    np.testing.assert_allclose(
        got.astype(np.float32), expected(work, "train/run/c"), rtol=2e-3, atol=4e-3
    )


def test_invalidated_videos_are_computed_again_and_nothing_else(work: Path) -> None:
    """``invalidate`` is how the orchestrator has chosen videos redone (a replaced file): the
    next run computes exactly those; the store serves their new frames, the rest unchanged."""
    cfg = FeaturesConfig(work=work, num_workers=0, progress=False)
    compute_features(cfg)
    before = store_arrays(work)
    chosen = ["train/run/a", "train/run/c"]
    assert features.invalidate(work, chosen, "the video file changed") == 2
    again = compute_features(cfg)
    assert (again.computed, again.skipped) == (2, 5)
    table = read_table(work / "features.parquet").set_index("video_id")
    assert table.loc[chosen, "feature_status"].tolist() == ["ok", "padded"]
    after = store_arrays(work)
    assert after.keys() == before.keys()
    for vid in after:
        np.testing.assert_array_equal(after[vid], before[vid])


def test_is_done_and_finished_settings_follow_the_files(work: Path) -> None:
    cfg = FeaturesConfig(work=work, num_workers=0, progress=False)
    assert features.outputs(cfg) == [work / "features.parquet", work / "features" / "store.json"]
    assert not features.is_done(cfg) and features.finished_settings(cfg) is None
    compute_features(cfg)
    assert features.is_done(cfg) and features.finished_settings(cfg) == cfg
    # Settings saved after the outputs: a later run started and may not have finished.
    saved = work / "features" / "config.toml"
    later = (work / "features.parquet").stat().st_mtime_ns + 10**9
    os.utime(saved, ns=(later, later))
    assert features.finished_settings(cfg) is None
    # A damaged shard: the outputs are there but cannot serve the index.
    shard = next((work / "features" / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:-10])
    assert not features.is_done(cfg)


def test_float32_store_is_exact(work: Path) -> None:
    cfg = FeaturesConfig(work=work, num_workers=0, dtype="float32", progress=False)
    compute_features(cfg)
    st = FeatureStore(work / "features")
    assert st.dtype == np.float32
    np.testing.assert_array_equal(st["val/run/g"], expected(work, "val/run/g"))


def test_frontend_mismatch_is_refused_unless_forced(work: Path) -> None:
    compute_features(FeaturesConfig(work=work, num_workers=0, progress=False))
    other = FrontendConfig.avslowfast()
    cfg = FeaturesConfig(work=work, num_workers=0, frontend=other, progress=False)
    with pytest.raises(FrontendMismatchError, match="--force"):
        compute_features(cfg)
    with pytest.raises(FrontendMismatchError):  # another dtype is another store too
        compute_features(FeaturesConfig(work=work, num_workers=0, dtype="float32"))
    st = FeatureStore(work / "features")
    assert st.frontend_hash == FrontendConfig().hash()  # untouched
    compute_features(FeaturesConfig(work=work, num_workers=0, frontend=other, force=True))
    st = FeatureStore(work / "features")
    assert st.frontend_hash == other.hash() and st.frontend == other
    want = expected(work, "train/run/a", other)
    assert want.shape == (1 + (2 * SR - 512) // 256, 80)
    np.testing.assert_allclose(st["train/run/a"].astype(np.float32), want, rtol=2e-3, atol=4e-3)
    with pytest.raises(FrontendMismatchError, match="recompute"):
        st.check_frontend(FrontendConfig().hash())


def test_unfinished_run_of_another_frontend_is_refused_unless_forced(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import avfuse.features as features

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # stands for a kill after the batches were logged

    with monkeypatch.context() as mp:
        mp.setattr(features, "_commit", killed)
        with pytest.raises(KeyboardInterrupt):
            compute_features(FeaturesConfig(work=work, num_workers=0, progress=False))
    assert not (work / "features" / "store.json").exists()
    assert list((work / "features" / "parts").glob("part-*.parquet"))
    other = FrontendConfig.avslowfast()
    # The logged 64-band records must not be committed under the 80-band front end.
    with pytest.raises(FrontendMismatchError, match="unfinished"):
        compute_features(FeaturesConfig(work=work, num_workers=0, frontend=other, progress=False))
    assert not (work / "features" / "store.json").exists()
    compute_features(
        FeaturesConfig(work=work, num_workers=0, frontend=other, force=True, progress=False)
    )
    st = FeatureStore(work / "features")
    assert st.feature_dim == 80 and all(st[v].shape[1] == 80 for v in st.ids)


def test_missing_extract_table_is_explained(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    (work / "extract.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="from-video"):
        compute_features(FeaturesConfig(work=work, num_workers=0))


def test_unreadable_audio_is_an_error_record(work: Path) -> None:
    (work / "audio" / "val/run/g.flac").write_bytes(b"garbage, not FLAC")
    compute_features(FeaturesConfig(work=work, num_workers=0, progress=False))
    table = read_table(work / "features.parquet").set_index("video_id")
    assert table.loc["val/run/g", "feature_status"] == "error"
    assert table.loc["val/run/g", "feature_reason"]
    assert "val/run/g" not in FeatureStore(work / "features")
    # fixed file -> a rerun retries the error and only it
    write_audio(work / "audio" / "val/run/g.flac", signal(0, 1.5), SR)
    res = compute_features(FeaturesConfig(work=work, num_workers=0, progress=False))
    assert res.computed == 1
    np.testing.assert_allclose(
        FeatureStore(work / "features")["val/run/g"].astype(np.float32),
        expected(work, "val/run/g"),
        rtol=2e-3,
        atol=4e-3,
    )


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import avfuse.features as F
    import avfuse.parallel as P
    # An inline executor counts as 1 worker: map_batches then runs 2 batches ahead of the log,
    # whatever the machine's core count.
    P.executor_width = F.executor_width = lambda ex: 1
    real = F._feature_batch
    calls = []
    def batch(tasks, **kw):
        calls.append(1)
        out = real(tasks, **kw)          # shards of this batch are written ...
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGKILL)   # ... but the process dies before logging
        return out
    F._feature_batch = batch
    F.compute_features(F.FeaturesConfig(work=sys.argv[1], num_workers=0, batch_size=1,
                                        progress=False))
    """
)


def test_resume_after_kill_9(tmp_path: Path) -> None:
    work = make_work(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(work)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    parts = list((work / "features" / "parts").glob("part-*.parquet"))
    logged = pd.concat([read_table(p) for p in parts])
    # Batches 1-4 were logged before the kill; 5 and 6 were computed and their shards written,
    # but never logged: orphans.
    assert len(logged) == 4
    shards = {p.name for p in (work / "features" / "shards").iterdir()}
    assert shards - set(logged["shard"])
    assert not (work / "features" / "index.parquet").exists()

    import avfuse.features as features

    seen: list[str] = []
    real = features._feature_batch

    def counting(tasks, **kw):  # type: ignore[no-untyped-def]
        seen.extend(t["video_id"] for t in tasks)
        return real(tasks, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(features, "_feature_batch", counting)
    try:
        res = compute_features(FeaturesConfig(work=work, num_workers=0, progress=False))
    finally:
        mp.undo()
    logged_ids = set(logged["video_id"])
    assert not logged_ids & set(seen)  # committed batches are not recomputed
    assert len(seen) == 7 - len(logged_ids) and res.skipped == len(logged_ids)
    # the killed batch's orphan shard is gone; every remaining shard is referenced
    index = read_table(work / "features" / "index.parquet")
    assert {p.name for p in (work / "features" / "shards").iterdir()} == set(index["shard"])

    fresh = make_work(tmp_path / "fresh")
    compute_features(FeaturesConfig(work=fresh, num_workers=0, progress=False))
    a, b = store_arrays(work), store_arrays(fresh)
    assert a.keys() == b.keys()
    for v in a:
        np.testing.assert_array_equal(a[v], b[v])
    pd.testing.assert_frame_equal(
        read_table(work / "features.parquet"), read_table(fresh / "features.parquet")
    )
    assert json.loads((work / "features" / "store.json").read_text())["classes"] == [
        "run",
        "swim",
    ]


def test_from_video_in_one_pass(tmp_path: Path) -> None:
    from avfuse.audio import decode_audio
    from tests.media import make_dataset, write_media

    root, work = tmp_path / "data", tmp_path / "work"
    paths = make_dataset(
        root,
        {"train": {"low": ["a.mp4", "b.mkv"], "high": ["c.mp4"]}},
        duration=1.5,
        freq_of={"low": 500.0, "high": 3000.0},
    )
    write_media(root / "train" / "high" / "silent.mp4", [], video=True, duration=1.0)
    make_dataset(root, {"train": {"high": ["short.mp4"]}}, duration=0.5)
    scan(ScanConfig(root=root, work=work))
    res = compute_features(FeaturesConfig(work=work, from_video=True, num_workers=0))
    assert not (work / "audio").exists()  # nothing written in between
    table = read_table(work / "features.parquet").set_index("video_id")
    assert table.loc["train/high/silent", "feature_status"] == "not_extracted"
    assert "no_audio" in table.loc["train/high/silent", "feature_reason"]
    assert table.loc["train/high/short", "feature_status"] == "padded"
    assert res.counts["ok"] == 3
    st = FeatureStore(work / "features")
    lo_mel, hi_mel = 1127 * np.log1p(125 / 700), 1127 * np.log1p(7500 / 700)
    for vid, path in paths.items():
        want = log_mel(decode_audio(path).samples)
        got = st[vid].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=4e-3)
        # content: the loudest band sits at the class's tone
        f = 500.0 if "/low/" in vid else 3000.0
        band = int(np.argmax(got.mean(axis=0)))
        centre_f = 700 * np.expm1((lo_mel + (band + 1) * (hi_mel - lo_mel) / 65) / 1127)
        assert abs(centre_f - f) < 0.1 * f, (vid, centre_f)


# ------------------------------------------------------------------- damaged tables and a full disk


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
    return store_rows(FeatureStore(work / "features")), table[cols].values.tolist()


@pytest.mark.parametrize(
    "damaged",
    ["features/index.parquet", "features/store.json", "features.parquet", "log part"],
)
def test_a_damaged_table_or_log_part_is_rebuilt_by_a_plain_rerun(
    featured: Path, tmp_path: Path, damaged: str, caplog: pytest.LogCaptureFixture
) -> None:
    work = copy_work(featured, tmp_path)
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
    work = copy_work(featured, tmp_path)
    (work / "extract.parquet").write_bytes(b"garbage")
    assert cli.main(["features", str(work), "--num-workers", "0", "--force"]) == 2
    line = error_line(capsys)
    assert f"{work / 'extract.parquet'}: unreadable" in line and "avfuse extract" in line


def test_a_full_disk_while_writing_a_shard_is_one_line_naming_the_folder(
    featured: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = copy_work(featured, tmp_path)

    def short_write(fh: object, arr: np.ndarray, *a: object, **k: object) -> None:
        raise OSError(f"{arr.nbytes} requested and 4096 written")

    monkeypatch.setattr(np, "save", short_write)
    assert cli.main(["features", str(work), "--num-workers", "0", "--force"]) == 2
    line = error_line(capsys)
    assert f"no space left on the device holding {work / 'features' / 'shards'}" in line
    assert "requested and" in line and "Traceback" not in line
    monkeypatch.undo()
    _features(work)  # space freed: a rerun completes with the same features
    assert _state(work)[1] == _state(featured)[1]


# -------------------------------------------------------------------------------- on a Dask cluster


def assert_same_store(a_work: Path, b_work: Path) -> None:
    a, b = store_arrays(a_work), store_arrays(b_work)
    assert a.keys() == b.keys() and len(a) == 7  # 6 ok and 1 padded short clip
    for vid in a:
        np.testing.assert_array_equal(a[vid], b[vid])
    pd.testing.assert_frame_equal(
        read_table(a_work / "features.parquet"), read_table(b_work / "features.parquet")
    )
    assert read_json(a_work / "features/store.json") == read_json(b_work / "features/store.json")
    # every shard file is referenced by the index: no duplicate or half-written output
    index = read_table(b_work / "features/index.parquet")
    shards = {p.name for p in (b_work / "features/shards").iterdir()}
    assert len(shards) > 1 and shards == set(index["shard"])


def test_features_on_local_cluster_match_local_run(tmp_path: Path, client: Any) -> None:
    local = make_work(tmp_path / "local")
    remote = make_work(tmp_path / "cluster")
    # Local reference through the process pool (2 workers), the default executor.
    compute_features(FeaturesConfig(work=local, num_workers=2, batch_size=2, progress=False))
    pids = set(client.run(os.getpid).values())
    res = compute_features(
        FeaturesConfig(work=remote, batch_size=2, progress=False), executor=client.get_executor()
    )
    assert res.computed == 7
    assert os.getpid() not in pids and len(pids) == 2  # the work ran in the worker processes
    assert_same_store(local, remote)


def crash_once(tasks: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """Write this batch's shards, then kill the worker process before it returns (once).

    Runs only in worker processes, where ``features._feature_batch`` is still the real
    function (the test replaces it in the client process only), so a worker the nanny
    restarts finds it too. The marker is created with O_EXCL: when two workers reach this
    point together, exactly one of them dies.
    """
    real = features._feature_batch
    if real is crash_once:
        raise RuntimeError("crash_once must run in a worker process")
    out = real(tasks, **kw)
    marker = Path(kw["store"]).parent / "crashed-once"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return out
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def test_run_survives_a_worker_dying(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = make_work(tmp_path / "local")
    remote = make_work(tmp_path / "cluster")
    compute_features(FeaturesConfig(work=local, num_workers=0, batch_size=2, progress=False))
    monkeypatch.setattr(features, "_feature_batch", crash_once)
    before = set(client.scheduler_info()["workers"])
    res = compute_features(
        FeaturesConfig(work=remote, batch_size=2, progress=False), executor=client.get_executor()
    )
    assert (remote / "crashed-once").exists()  # a worker really died mid-batch
    client.wait_for_workers(2, timeout=60)
    assert set(client.scheduler_info()["workers"]) != before  # and was replaced
    assert res.counts == {"ok": 6, "padded": 1, "not_extracted": 1}
    assert_same_store(local, remote)  # the dead worker's orphan shard was removed


def test_options_reach_the_features_config_from_the_command_line() -> None:
    from avfuse.config import apply_overrides
    from avfuse.features import FeaturesConfig

    base = FeaturesConfig(work=Path("w"))
    cfg = apply_overrides(base, ["frontend.center=true", 'frontend.mel_scale="slaney"'])
    assert cfg.frontend.center and cfg.frontend.mel_scale == "slaney"
    assert cfg.frontend.hash() == FrontendConfig(center=True, mel_scale="slaney").hash()
    with pytest.raises(ValueError, match="mel_norm"):
        apply_overrides(base, ['frontend.mel_norm="area"'])


# ------------------------------------------------- a full disk, damaged shards, non-finite features


def test_full_disk_stops_features_and_the_rerun_ends_as_a_clean_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean, work = scanned_tones(tmp_path, "clean"), scanned_tones(tmp_path, "work")
    for w in (clean, work):
        extract(extract_cfg(w))
    small = {"shard_mb": 0.005, "batch_size": 2}  # a shard per video: several writes
    compute_features(features_cfg(clean, **small))
    real_save = np.save
    calls = {"n": 0}

    def filling_save(fh: Any, arr: Any, *a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:
            fh.write(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(fh, arr, *a, **k)

    monkeypatch.setattr(np, "save", filling_save)
    with pytest.raises(DiskFullError, match="no space left") as info:
        compute_features(features_cfg(work, **small))
    assert str(StoreLayout(work / "features").shards) in str(info.value)
    assert calls["n"] == 3
    assert not (work / "features.parquet").exists()

    monkeypatch.undo()
    compute_features(features_cfg(work, **small))
    a, b = read_table(work / "features.parquet"), read_table(clean / "features.parquet")
    pd.testing.assert_frame_equal(a, b)
    sa, sb = FeatureStore(work / "features"), FeatureStore(clean / "features")
    assert sa.ids == sb.ids and len(sa.ids) == 6
    for v in sa.ids:
        np.testing.assert_array_equal(sa[v], sb[v])


def test_truncated_shard_is_named_and_a_plain_rerun_repairs_it(tmp_path: Path) -> None:
    work = scanned_tones(tmp_path)
    extract(extract_cfg(work))
    cfg = features_cfg(work, shard_mb=0.005, batch_size=2)
    compute_features(cfg)
    store = work / "features"
    before = FeatureStore(store)
    kept = {v: np.array(before[v]) for v in before.ids}
    index = read_table(store / "index.parquet")
    shard = str(index["shard"].iloc[0])
    in_shard = set(index.loc[index["shard"] == shard, "video_id"])
    path = StoreLayout(store).shard(shard)
    os.truncate(path, path.stat().st_size - 100)

    with pytest.raises(CorruptStoreError, match=shard) as info:
        FeatureStore(store)
    assert info.value.shards == [shard]

    res = compute_features(cfg)
    assert res.computed == len(in_shard)
    after = FeatureStore(store)
    assert sorted(after.ids) == sorted(kept)
    for v, x in kept.items():
        np.testing.assert_array_equal(after[v], x)
    assert not path.exists()


def test_nan_or_inf_features_make_the_video_an_error_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = scanned_tones(tmp_path)
    extract(extract_cfg(work))
    real_load, real_mel = features_mod.load_audio, features_mod.log_mel
    last: dict[str, str] = {}

    def load(path: Any, *a: Any, **k: Any) -> np.ndarray:
        last["stem"] = Path(path).stem
        return real_load(path, *a, **k)

    def mel(x: np.ndarray, fe: Any) -> np.ndarray:
        out = real_mel(x, fe)
        if last["stem"] == "x1":
            out[5, 3] = np.nan
        if last["stem"] == "y2":
            out[0, 0] = np.inf
        return out

    monkeypatch.setattr(features_mod, "load_audio", load)
    monkeypatch.setattr(features_mod, "log_mel", mel)
    compute_features(features_cfg(work))
    table = read_table(work / "features.parquet").set_index("video_id")
    assert table.loc["train/a/x1", "feature_status"] == "error"
    assert table.loc["train/b/y2", "feature_status"] == "error"
    assert "NaN or infinite" in table.loc["train/a/x1", "feature_reason"]
    assert (table["feature_status"] == "ok").sum() == 4
    store = FeatureStore(work / "features")
    assert "train/a/x1" not in store and "train/b/y2" not in store
    assert all(np.isfinite(np.asarray(store[v], np.float32)).all() for v in store.ids)

    monkeypatch.undo()
    res = compute_features(features_cfg(work))
    assert res.computed == 2 and res.counts == {"ok": 6}
