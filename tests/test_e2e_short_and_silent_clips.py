"""End to end on clips of 0.2-3 s and muted tracks: every video with sound gets a score;
silence is not sound; figures over all videos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from avfuse.data import WindowDataset
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.extract import ExtractConfig, extract
from avfuse.features import FeaturesConfig, compute_features
from avfuse.io import read_table
from avfuse.manifest import ScanConfig, load_manifest, scan
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import video_status
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, train
from tests.media import tone, write_level_video
from tests.test_train import TWO_EPOCHS

SR = 16000
FREQ = {"low": 500.0, "high": 3000.0}
TRAIN_S = (0.2, 0.5, 0.8, 1.5, 3.0)
VAL_S = (0.3, 0.9, 2.0)
HISS = 10 ** (-90 / 20)  # RMS of the -90 dBFS hiss
QUIET = 10 ** (-45 / 20)  # peak of a quiet but real recording


def _frames(seconds: float) -> int:
    n = round(seconds * SR)
    return 0 if n < 400 else 1 + (n - 400) // 160


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tone classes, clips of 0.2-3 s, plus a muted, a -90 dBFS and a quiet val video."""
    tmp = tmp_path_factory.mktemp("coverage")
    root, work = tmp / "data", tmp / "work"
    for split, lengths in (("train", TRAIN_S), ("val", VAL_S)):
        for cls, f in FREQ.items():
            for d in lengths:
                write_level_video(root / split / cls / f"t{int(d * 1000):04d}.mkv", tone(f, d, SR))
    rng = np.random.default_rng(0)
    write_level_video(root / "val" / "low" / "muted.mkv", np.zeros(2 * SR))
    write_level_video(root / "val" / "high" / "hiss.mkv", HISS * rng.standard_normal(2 * SR))
    write_level_video(root / "val" / "high" / "quiet.mkv", tone(3000.0, 2.0, SR, QUIET))
    scan(ScanConfig(root=root, work=work))
    extract(ExtractConfig(work, num_workers=0, progress=False))
    compute_features(FeaturesConfig(work, num_workers=0, progress=False))
    return work


def test_silent_tracks_are_recorded_with_their_level(work: Path) -> None:
    man = load_manifest(work).set_index("video_id")
    muted, hiss, quiet = (man.loc[f"val/{v}"] for v in ("low/muted", "high/hiss", "high/quiet"))
    assert muted["status"] == "silent" and muted["peak_dbfs"] == -math.inf
    assert "digital silence" in muted["reason"]
    assert hiss["status"] == "silent"
    assert hiss["rms_dbfs"] == pytest.approx(-90, abs=2.5)  # 16-bit quantisation of the hiss
    assert f"{hiss['rms_dbfs']:.1f} dBFS" in hiss["reason"]
    # A quiet real recording is sound: a -45 dBFS peak sine has an RMS 3 dB lower.
    assert quiet["status"] == "ok"
    assert quiet["peak_dbfs"] == pytest.approx(-45, abs=0.3)
    assert quiet["rms_dbfs"] == pytest.approx(-45 - 10 * math.log10(2), abs=0.3)
    assert man.loc["val/low/t2000", "rms_dbfs"] == pytest.approx(
        20 * math.log10(0.5 / 2**0.5), abs=0.1
    )
    for vid in ("val/low/muted", "val/high/hiss"):
        assert man.loc[vid, "feature_status"] == "silent"
        assert not (work / "audio" / f"{vid}.flac").exists()


def test_short_clips_are_stored_unpadded_with_their_duration(work: Path) -> None:
    table = read_table(work / "features.parquet").set_index("video_id")
    store = FeatureStore(work / "features")
    for split, lengths in (("train", TRAIN_S), ("val", VAL_S)):
        for cls in FREQ:
            for d in lengths:
                vid = f"{split}/{cls}/t{int(d * 1000):04d}"
                rec = table.loc[vid]
                assert rec["num_frames"] == _frames(d) == store.frames(vid)
                if d < 0.975:
                    assert rec["feature_status"] == "padded"
                    assert rec["feature_reason"].startswith(f"{d:.2f} s < 0.975 s")
                else:
                    assert rec["feature_status"] == "ok"


def test_drop_policy_leaves_short_clips_unscored(work: Path) -> None:
    store = FeatureStore(work / "features")
    rows = load_manifest(work)
    rows = rows[rows["split"] == "train"]
    kept = video_status(rows, store, 96)
    dropped = video_status(rows, store, 96, short_clips="drop")
    short = {v for v in rows["video_id"] if store.frames(v) < 96}
    assert len(short) == 6
    assert {kept[v] for v in short} == {"padded"} and {dropped[v] for v in short} == {"too_short"}
    ds = WindowDataset(store, sorted(short), np.zeros(len(short)), _identity_norm(store), 96)
    x, _, _ = ds[(0, 0)]
    assert x.shape == (96, 64)


def _identity_norm(store: FeatureStore):  # type: ignore[no-untyped-def]
    from avfuse.data import NormStats

    return NormStats(
        np.zeros(store.feature_dim, np.float32), np.ones(store.feature_dim, np.float32)
    )


def test_every_video_with_sound_is_scored_and_figures_cover_the_split(work: Path) -> None:
    res = train(TrainConfig(work, name="cov", val_split="carve", **TWO_EPOCHS))  # type: ignore[arg-type]
    assert res is not None
    out = predict(PredictConfig(work, run="cov", amp="off", device="cpu"))
    assert out is not None
    sf = ScoreFile.load(out.path)
    st = dict(zip(sf.ids.tolist(), sf.status.tolist()))
    rows = dict(zip(sf.ids.tolist(), sf.scores))
    assert len(st) == 2 * len(VAL_S) + 3
    assert st["val/low/muted"] == st["val/high/hiss"] == "silent"
    assert np.isnan(rows["val/low/muted"]).all() and np.isnan(rows["val/high/hiss"]).all()
    for cls in FREQ:
        for d in VAL_S:
            vid = f"val/{cls}/t{int(d * 1000):04d}"
            assert st[vid] == ("padded" if d < 0.975 else "ok")
            assert np.isfinite(rows[vid]).all() and rows[vid].sum() == pytest.approx(1, abs=1e-5)
    assert "scored 7/9 videos of the split" in out.summary()

    ev = evaluate(EvaluateConfig(work))
    cov = ev.coverage
    assert (cov["videos"], cov["scored"]) == (9, 7)
    assert cov["status_counts"]["silent"] == 2 and cov["status_counts"]["padded"] == 4
    # Over all videos, independently: argmax of each scored row against the manifest label.
    man = load_manifest(work, stages=False).set_index("video_id")
    classes = sf.classes
    hits = [
        classes[int(np.argmax(rows[v]))] == man.loc[v, "label"]
        for v in st
        if st[v] in ("ok", "padded")
    ]
    assert ev.metrics["top1"] == pytest.approx(np.mean(hits))
    assert ev.metrics["top1_all"] == pytest.approx(sum(hits) / 9)
    assert ev.metrics["top5_all"] == pytest.approx(7 / 9)  # two classes: top-5 = scored
    saved = json.loads(ev.metrics_path.read_text())
    assert saved["top1_all"] == pytest.approx(sum(hits) / 9)
    b = saved["baseline"]
    assert b["n"] == 7 and b["train_videos"] == 10
    assert b["top1_all"] == pytest.approx(b["top1"] * 7 / 9)
    text = ev.summary()
    assert "scored 7/9 videos" in text and "all videos" in text and "baseline" in text
