"""Every video with sound gets a score; silence is not sound; figures over all videos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.baseline import fit_baseline
from avfuse.checkpoint import load_checkpoint
from avfuse.data import WindowDataset, pad_window
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.extract import ExtractConfig, extract
from avfuse.features import FeaturesConfig, compute_features
from avfuse.io import read_table
from avfuse.manifest import ScanConfig, load_manifest, scan
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import video_status
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, carve_selection, fit_schedule, train
from tests.media import tone, write_level_video
from tests.synthetic import make_synthetic_work
from tests.test_train import TINY as TRAIN_TINY

SR = 16000
FREQ = {"low": 500.0, "high": 3000.0}
TRAIN_S = (0.2, 0.5, 0.8, 1.5, 3.0)
VAL_S = (0.3, 0.9, 2.0)
HISS = 10 ** (-90 / 20)  # RMS of the -90 dBFS hiss
QUIET = 10 ** (-45 / 20)  # peak of a quiet but real recording
# The shared tiny settings (tests.test_train), at the default windows per video.
TINY = {
    k: v for k, v in TRAIN_TINY.items() if k not in ("deterministic", "windows_per_video")
} | dict(epochs=2)


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


def test_pad_window_policies() -> None:
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    rep = pad_window(x, 8, "repeat", -4.6)
    np.testing.assert_array_equal(rep, np.concatenate([x, x, x[:2]]))
    zer = pad_window(x, 8, "zeros", -4.6)
    np.testing.assert_array_equal(zer[:3], x)
    assert (zer[3:] == np.float32(-4.6)).all()
    with pytest.raises(ValueError, match="drop"):
        pad_window(x, 8, "drop", 0.0)


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
    res = train(TrainConfig(work, name="cov", val_split="carve", **TINY))  # type: ignore[arg-type]
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


def test_carve_out_is_stratified_seeded_and_never_overlaps_val(tmp_path: Path) -> None:
    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=3, videos_per_class=10, frames_range=(100, 150))
    res = train(TrainConfig(work, name="c", **TINY))  # type: ignore[arg-type]
    assert res is not None and res.selection_split == "train carve-out"
    ck = load_checkpoint(work / "runs" / "c" / "best.pt")
    carved = set(ck.selection_videos)
    train_ids = set(man.loc[man["split"] == "train", "video_id"])
    val_ids = set(man.loc[man["split"] == "val", "video_id"])
    assert carved <= train_ids and not carved & val_ids
    per_class = pd.Series([v.split("/")[1] for v in carved]).value_counts()
    assert per_class.to_dict() == {"class_00": 1, "class_01": 1, "class_02": 1}
    assert ck.config["val_split"] == "carve"
    ids = sorted(train_ids)
    labels = np.array([int(v.split("/")[1][-2:]) for v in ids])
    again, _ = carve_selection(ids, labels, 0.1, 0)
    assert {v for v, h in zip(ids, again) if h} == carved
    lines = [
        json.loads(x) for x in (work / "runs" / "c" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {m["selection_split"] for m in lines} == {"train carve-out"}
    assert 'val_split = "carve"' in (work / "runs" / "c" / "config.toml").read_text()
    # The carved videos were not trained on: the band statistics exclude them.
    store = FeatureStore(work / "features")
    kept = [v for v in ids if v not in carved]
    frames = np.concatenate([np.asarray(store[v], np.float64) for v in kept])
    np.testing.assert_allclose(ck.norm.mean, frames.mean(0), rtol=1e-4, atol=1e-4)


def test_small_dataset_trains_with_a_clamped_batch(tmp_path: Path) -> None:
    # 2 classes x 3 videos, 1 window each: 6 windows per epoch, a batch of 64 must still train.
    work = tmp_path / "w"
    make_synthetic_work(work, n_classes=2, videos_per_class=3, frames_range=(100, 120))
    cfg = {**TINY, "batch_size": 64, "windows_per_video": 1}
    res = train(TrainConfig(work, name="s", val_split="", **cfg))  # type: ignore[arg-type]
    assert res is not None
    ck = load_checkpoint(work / "runs" / "s" / "last.pt")
    assert ck.batch_size_used == 6 and ck.global_step == 2  # one step per epoch
    assert fit_schedule(1, 6, 64, 2, 0, 1) == (1, 6)
    # min_steps: more windows per video, the batch kept, at least min_steps steps.
    wpv, batch = fit_schedule(4, 28, 64, 30, 300, 1)
    assert batch == 64 and 30 * (28 * wpv // 64) >= 300


def test_mean_class_accuracy_counts_classes_without_a_scored_video(tmp_path: Path) -> None:
    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=3, videos_per_class=2, splits=("val",))
    classes = ["class_00", "class_01", "class_02"]
    rows = {}
    for r in man.itertuples(index=False):
        k = int(r.label_index)
        if k == 2:
            rows[r.video_id] = (None, 0, "silent")  # no scored video of class_02
        else:
            s = np.full(3, 0.1, np.float32)
            s[k] = 0.8
            rows[r.video_id] = (s, 1, "ok")
    sf = ScoreFile.from_rows(classes, rows)
    sf.save(work / "scores" / "audio_val.npz")
    ev = evaluate(EvaluateConfig(work, baseline=False))
    assert ev.metrics["top1"] == 1.0 and ev.metrics["top1_all"] == pytest.approx(4 / 6)
    assert ev.metrics["mean_class_accuracy"] == pytest.approx(2 / 3)
    pc = pd.read_csv(ev.per_class_path).set_index("class")
    assert pc.loc["class_02", "n"] == 0 and pc.loc["class_02", "n_all"] == 2
    assert pc.loc["class_02", "accuracy_all"] == 0


def test_baseline_matches_an_independent_fit(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=3, videos_per_class=6, structured=False)
    store = FeatureStore(work / "features")
    tr = man[man["split"] == "train"]
    ids = tr["video_id"].tolist()
    fitted = fit_baseline(store, ids, tr["label_index"].to_numpy(), 3, stats="meanstd")
    stats = np.stack(
        [
            np.concatenate(
                [np.asarray(store[v], np.float64).mean(0), np.asarray(store[v], np.float64).std(0)]
            )
            for v in ids
        ]
    )
    sc = StandardScaler().fit(stats)
    ref = LogisticRegression(max_iter=2000).fit(sc.transform(stats), tr["label_index"])
    va = man[man["split"] == "val"]["video_id"].tolist()
    vstats = np.stack(
        [
            np.concatenate(
                [np.asarray(store[v], np.float64).mean(0), np.asarray(store[v], np.float64).std(0)]
            )
            for v in va
        ]
    )
    np.testing.assert_allclose(
        fitted.predict_proba(store, va), ref.predict_proba(sc.transform(vstats)), atol=1e-6
    )


def test_console_line_and_run_report_show_coverage_and_the_baseline(tmp_path: Path) -> None:
    from avfuse.pipeline import _run_evaluate
    from avfuse.run_report import write_run_report
    from avfuse.runconfig import RunConfig, stage_configs

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=2, videos_per_class=4, structured=False)
    rows = {}
    for r in man[man["split"] == "val"].itertuples(index=False):
        k = int(r.label_index)
        if r.video_id.endswith("v000"):
            rows[r.video_id] = (None, 0, "silent")
        else:
            s = np.full(2, 0.2, np.float32)
            s[k] = 0.8
            rows[r.video_id] = (s, 1, "ok")
    ScoreFile.from_rows(["class_00", "class_01"], rows).save(work / "scores" / "audio_val.npz")
    cfg = RunConfig(root=tmp_path, work=work)
    sc = stage_configs(cfg)
    detail, said = _run_evaluate(sc, False, False, None, cfg)
    assert "scored 6/8 videos" in said  # the stage's own summary, for the CLI to print
    assert detail.startswith("val scored 6/8: audio top-1 75.0% over all (100.0% over scored)")
    assert ", baseline " in detail
    md, _ = write_run_report(sc)
    text = md.read_text()
    assert "| val | audio model | 6 / 8 | 75.00 |" in text
    assert "| val | baseline (" in text


def test_training_curves_are_named_after_the_selection_split() -> None:
    from avfuse.report import audio_results_table, curve_labels

    df = pd.DataFrame({"epoch": [1], "val_top1": [0.5], "selection_split": ["heldout"]})
    assert curve_labels(df) == {"val_top1": "heldout_top1"}
    carved = pd.DataFrame({"val_top1": [0.5], "selection_split": ["train carve-out"]})
    assert curve_labels(carved) == {"val_top1": "train_carve-out_top1"}
    assert curve_labels(pd.DataFrame({"val_top1": [0.5]})) == {}
    m = {
        "top1": 0.9,
        "top5": 1.0,
        "mAP": 0.8,
        "top1_all": 0.45,
        "top5_all": 0.5,
        "mean_class_accuracy_all": 0.4,
        "coverage": {"scored": 5, "videos": 10},
    }
    table = audio_results_table({"val": m})
    row = table.iloc[0]
    assert row["scored / videos"] == "5 / 10"
    assert row["top-1 % (all)"] == pytest.approx(45) and row["top-1 % (scored)"] == pytest.approx(
        90
    )


def test_fusion_keeps_the_video_score_of_silent_videos_like_no_audio(tmp_path: Path) -> None:
    from avfuse.fuse import FuseConfig, fuse

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=2, videos_per_class=6, splits=("val",))
    rng = np.random.default_rng(0)
    ids = man["video_id"].tolist()
    labels = man["label_index"].to_numpy()
    video = rng.dirichlet([1.0, 1.0], len(ids)).astype(np.float32)
    np.savez(
        tmp_path / "video.npz", scores=video, ids=np.asarray(ids), classes=["class_00", "class_01"]
    )
    rows = {}
    for i, vid in enumerate(ids):
        if i in (0, 6):
            rows[vid] = (None, 0, "silent")
        elif i in (1, 7):
            rows[vid] = (None, 0, "no_audio")
        else:
            s = np.full(2, 0.3, np.float32)
            s[labels[i]] = 0.7
            rows[vid] = (s, 1, "ok")
    ScoreFile.from_rows(["class_00", "class_01"], rows).save(work / "scores" / "audio_val.npz")
    res = fuse(
        FuseConfig(
            work,
            video_scores=(tmp_path / "video.npz",),
            weight_selection="optimistic",
            bootstrap=20,
            folds=2,
        )
    )
    fused = ScoreFile.load(res.fused_path)
    got = dict(zip(fused.ids.tolist(), fused.scores))
    for i in (0, 6, 1, 7):  # silent and no_audio alike: the video model's scores, unchanged
        np.testing.assert_allclose(got[ids[i]], video[i], atol=1e-6)
    assert not np.allclose(got[ids[2]], video[2], atol=1e-3)


def test_one_video_per_class_trains(tmp_path: Path) -> None:
    work = tmp_path / "w"
    make_synthetic_work(work, n_classes=2, videos_per_class=1, splits=("train",))
    cfg = {**TINY, "batch_size": 64, "windows_per_video": 1, "epochs": 1}
    res = train(TrainConfig(work, name="one", **cfg))  # type: ignore[arg-type]
    assert res is not None and res.selection_split == ""  # nothing to carve from
    ck = load_checkpoint(work / "runs" / "one" / "last.pt")
    assert ck.batch_size_used == 2 and ck.global_step == 1
