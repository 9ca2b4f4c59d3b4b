"""The demo end to end at a reduced size: every artefact a user relies on is checked."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse import demo
from avfuse.manifest import load_manifest
from avfuse.scores import ScoreFile
from avfuse.store import FeatureStore


def _config(work: Path) -> demo.DemoConfig:
    """The reduced demo every test here checks (the rerun test runs it a second time)."""
    return demo.DemoConfig(
        work=work,
        classes=3,
        train_per_class=4,
        val_per_class=3,
        heldout_per_class=2,
        seconds=2.5,
        epochs=1,
        num_workers=0,
        progress=False,
        overrides=("train.batch_size=16", "train.min_steps=0"),
    )


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoResult:
    return demo.demo(_config(tmp_path_factory.mktemp("e2e") / "demo-work"))


def _vid(spec: demo.VideoSpec) -> str:
    return spec.rel.rsplit(".", 1)[0]


def test_manifest_statuses(result: demo.DemoResult) -> None:
    man = load_manifest(result.run.work).set_index("video_id")
    specs = result.dataset.specs
    assert set(man.index) == {_vid(s) for s in specs}
    expect_extract = {
        "": "ok",
        "short": "ok",
        "no_audio": "no_audio",
        "silent": "silent",
        "hiss": "silent",
    }
    for s in specs:
        row = man.loc[_vid(s)]
        if s.defect in ("garbage", "truncated"):
            assert row["status"] == "unreadable", s.rel
            assert row["feature_status"] == "not_extracted"
        else:
            assert row["status"] == expect_extract[s.defect], s.rel
        if s.defect == "short":
            assert row["feature_status"] == "padded", s.rel
        if s.defect == "":
            assert row["feature_status"] == "ok", s.rel
            assert row["duration_s"] == pytest.approx(s.duration, abs=0.15)
    assert (man["status"] == "no_audio").sum() == result.dataset.count("no_audio") >= 3
    assert (man["status"] == "unreadable").sum() == 2


def test_store_has_every_ok_video(result: demo.DemoResult) -> None:
    work = result.run.work
    man = load_manifest(work)
    ok = man[man["feature_status"].isin(["ok", "padded"])]
    store = FeatureStore(work / "features")
    assert set(store.ids) == set(ok["video_id"])
    for rec in ok.itertuples(index=False):
        feats = store[rec.video_id]
        # 10 ms frames: about 100 per second of audio (reference framing drops ~2.5).
        assert feats.shape == (rec.num_frames, 64)
        assert abs(feats.shape[0] - 100 * rec.duration_s) < 6
        assert np.isfinite(feats).all()


def test_score_files_cover_the_splits(result: demo.DemoResult) -> None:
    work = result.run.work
    man = load_manifest(work)
    for split in ("val", "heldout"):
        sf = ScoreFile.load(work / "scores" / f"audio_{split}.npz")
        rows = man[man["split"] == split].set_index("video_id")
        assert set(sf.ids) == set(rows.index)
        feat = rows["feature_status"].reindex(sf.ids).to_numpy()
        usable = np.isin(feat, ["ok", "padded"])
        np.testing.assert_array_equal(sf.status, np.where(usable, feat, sf.status))
        np.testing.assert_array_equal(sf.has_scores, usable)
        assert np.isnan(sf.scores[~usable]).all()
        np.testing.assert_allclose(sf.scores[usable].sum(axis=1), 1.0, atol=1e-4)
        assert (sf.n_windows[usable] >= 1).all()


def test_fused_file_has_every_video(result: demo.DemoResult) -> None:
    work = result.run.work
    man = load_manifest(work)
    val = man[man["split"] == "val"].set_index("video_id")
    fused = ScoreFile.load(work / "fusion" / "fused_val.npz")
    assert set(fused.ids) == set(val.index)
    assert np.isfinite(fused.scores).all()
    np.testing.assert_allclose(fused.scores.sum(axis=1), 1.0, atol=1e-4)
    # Videos without usable audio keep the video model's own probabilities.
    video = pd.read_csv(result.video.score_files["val"])
    logits = video.set_index("filename")[fused.classes]
    no_audio = [v for v in val.index if val.loc[v, "feature_status"] not in ("ok", "padded")]
    assert no_audio
    for vid in no_audio:
        z = logits.loc[Path(str(val.loc[vid, "path"])).name].to_numpy(float)
        p = np.exp(z - z.max())
        p /= p.sum()
        np.testing.assert_allclose(fused.scores[fused.index()[vid]], p, atol=1e-5)


def test_report_has_the_figures(result: demo.DemoResult) -> None:
    work = result.run.work
    md = (work / "report.md").read_text("utf-8")
    assert (work / "report.html").exists()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {Path(p).name for p in images}
    assert {"status_counts.png", "training_curves.png", "accuracy.png", "class_gain.png"} <= names
    for rel in images:
        assert (work / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    # Status counts (no-audio and unreadable videos included) and accuracies with the CI.
    assert "no_audio" in md and "unreadable" in md and "padded" in md
    assert re.search(r"gain [+-]\d+\.\d points \(95% CI", md)
    summary = result.summary()
    assert str(work / "report.html") in summary
    assert "all videos" in summary


def test_second_demo_redoes_nothing(result: demo.DemoResult) -> None:
    work = result.run.work
    # The lock file records who runs now (and is emptied after): not an output.
    before = {
        p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != ".avfuse.lock"
    }
    again = demo.demo(_config(work))
    assert again.dataset.generated == 0
    assert {s.status for s in again.run.stages} == {"skipped"}
    changed = [p for p, t in before.items() if p.stat().st_mtime_ns != t]
    assert changed == []


def test_the_layout_owner_names_what_a_run_wrote(result: demo.DemoResult) -> None:
    from avfuse.workdir import ScoreLayout, WorkDir

    w = WorkDir(result.run.work)
    on_disk = {p.name for p in w.root.iterdir()}
    # The demo's own inputs (its dataset and stand-in video model) and the work lock aside,
    # every entry is one the layout owner knows, and each one it lists for these stages exists.
    demo_own = {"dataset", "video_model", ".avfuse.lock"}
    assert on_disk - demo_own <= {p.name for p in w.written}
    for p in (w.manifest, w.classes, w.scan_config, w.extract_table, w.extract_config):
        assert p.is_file(), p
    for p in (w.store_meta, w.features_config, w.features_table, w.pipeline_state):
        assert p.is_file(), p
    assert w.scores("val").is_file() and ScoreLayout(w.scores("val")).metrics.is_file()
    assert w.report_md.is_file() and w.run_settings.is_file() and w.dataset_files.is_file()
