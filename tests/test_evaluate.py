"""The evaluate stage: joins by video_id, videos missing from the score file, other splits,
classes without a scored video."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.scores import ScoreFile
from tests.synthetic import make_synthetic_work


@pytest.fixture
def work(tmp_path: Path) -> Path:
    classes = ["a", "b", "c"]
    write_class_list(tmp_path / "classes.txt", classes)
    rows = []
    for split in ("train", "val"):
        for i in range(12):
            c = classes[i % 3]
            rows.append(
                {
                    "video_id": f"{split}/{c}/v{i:02d}",
                    "split": split,
                    "label": c,
                    "label_index": i % 3,
                }
            )
    write_table(pd.DataFrame(rows), tmp_path / "manifest.parquet")
    return tmp_path


def _scores(work: Path, order: np.ndarray, class_perm: list[int]) -> ScoreFile:
    rng = np.random.default_rng(3)
    ids = [f"val/{'abc'[i % 3]}/v{i:02d}" for i in range(12)]
    s = rng.random((12, 3)).astype(np.float32)
    status = np.array(["ok"] * 10 + ["no_audio", "too_short"])
    s[10:] = np.nan
    nwin = np.array([3] * 10 + [0, 0])
    classes = ["a", "b", "c"]
    return ScoreFile(
        np.asarray(ids)[order],
        [classes[j] for j in class_perm],
        s[order][:, class_perm],
        nwin[order],
        status[order],
        {"src": "test"},
    )


def test_evaluate_joins_by_id_not_position(work: Path) -> None:
    base = _scores(work, np.arange(12), [0, 1, 2])
    p1 = base.save(work / "scores" / "audio_val.npz")
    r1 = evaluate(EvaluateConfig(work))
    shuffled = _scores(work, np.random.default_rng(9).permutation(12), [2, 0, 1])
    p2 = shuffled.save(work / "scores" / "shuffled.npz")
    r2 = evaluate(EvaluateConfig(work, scores=p2))
    assert r1.metrics == r2.metrics
    # independent check on the ok rows in manifest label order
    labels = np.array([i % 3 for i in range(10)])
    expect = np.mean(np.argmax(base.scores[:10], axis=1) == labels)
    assert r1.metrics["top1"] == pytest.approx(expect)
    assert r1.metrics["top1_over_split"] == pytest.approx(expect * 10 / 12)
    assert r1.coverage == {
        "videos": 12,
        "scored": 10,
        "coverage": pytest.approx(10 / 12),
        "status_counts": {"ok": 10, "no_audio": 1, "too_short": 1},
    }
    saved = json.loads((work / "scores" / "audio_val.metrics.json").read_text())
    assert saved["top1"] == pytest.approx(expect) and saved["split"] == "val"
    pc = pd.read_csv(work / "scores" / "audio_val.per_class.csv")
    assert pc["class"].tolist() == ["a", "b", "c"] and pc["n"].sum() == 10
    assert (pc["correct"] / pc["n"]).round(6).tolist() == pc["accuracy"].round(6).tolist()
    assert p1.exists()


def test_evaluate_counts_videos_missing_from_the_file(work: Path) -> None:
    sf = _scores(work, np.arange(12), [0, 1, 2]).select(
        [f"val/{'abc'[i % 3]}/v{i:02d}" for i in range(8)]
    )
    p = sf.save(work / "scores" / "part.npz")
    r = evaluate(EvaluateConfig(work, scores=p, split="val"))
    assert r.coverage["status_counts"] == {"ok": 8, "absent": 4}
    assert r.coverage["scored"] == 8 and r.metrics["n"] == 8


def test_evaluate_ignores_scored_videos_outside_the_split(work: Path) -> None:
    base = _scores(work, np.arange(12), [0, 1, 2])
    ref = evaluate(EvaluateConfig(work, scores=base.save(work / "scores" / "val_only.npz")))
    # Two train videos (one scored, one not) in the same file: counted, never evaluated.
    extra = ScoreFile(
        np.concatenate([base.ids, ["train/a/v00", "train/b/v01"]]),
        base.classes,
        np.concatenate([base.scores, [[1.0, 0.0, 0.0], [np.nan] * 3]]),
        np.concatenate([base.n_windows, [3, 0]]),
        np.concatenate([base.status, ["ok", "no_audio"]]),
    )
    p = extra.save(work / "scores" / "mixed.npz")
    with pytest.raises(ValueError, match="span splits"):
        evaluate(EvaluateConfig(work, scores=p))
    r = evaluate(EvaluateConfig(work, scores=p, split="val"))
    assert r.metrics == ref.metrics and r.coverage == ref.coverage
    saved = json.loads((work / "scores" / "mixed.metrics.json").read_text())
    assert saved["ignored_ids_not_in_split"] == 2


def test_outputs_is_done_and_finished_settings_follow_the_metrics(work: Path) -> None:
    from avfuse import evaluate as stage

    cfg = EvaluateConfig(work)
    scores = work / "scores" / "audio_val.npz"
    assert stage.outputs(cfg) == [work / "scores" / "audio_val.metrics.json"]
    assert not stage.is_done(cfg) and stage.finished_settings(cfg) is None
    _scores(work, np.arange(12), [0, 1, 2]).save(scores)
    evaluate(cfg)
    assert stage.is_done(cfg) and stage.finished_settings(cfg) == cfg
    # Another score file: its own metrics, not yet written.
    other = EvaluateConfig(work, scores=work / "scores" / "other.npz")
    assert stage.outputs(other) == [work / "scores" / "other.metrics.json"]
    assert not stage.is_done(other) and stage.finished_settings(other) is None
    (work / "scores" / "audio_val.metrics.json").unlink()
    assert not stage.is_done(cfg) and stage.finished_settings(cfg) is None


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
