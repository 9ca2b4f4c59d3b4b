"""Metrics: AP against brute force, top-k by hand, joins by video_id, coverage, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.metrics import average_precision, metrics
from avfuse.scores import ScoreFile


def brute_force_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    # For each positive: precision among all items scoring at least as high.
    precisions = []
    for i in range(len(scores)):
        if positive[i]:
            above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
            precisions.append(sum(positive[j] for j in above) / len(above))
    return sum(precisions) / len(precisions)


def test_average_precision_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        s = rng.integers(0, 6, n).astype(float)  # many ties
        pos = rng.random(n) < 0.4
        if not pos.any():
            pos[0] = True
        assert average_precision(s, pos) == pytest.approx(brute_force_ap(s, pos))
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == pytest.approx(
        (1 / 1 + 2 / 3) / 2
    )
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def test_metrics_by_hand() -> None:
    scores = np.array(
        [
            [0.7, 0.2, 0.1],  # label 0, correct
            [0.5, 0.4, 0.1],  # label 1, predicted 0
            [0.1, 0.3, 0.6],  # label 2, correct
            [0.2, 0.5, 0.3],  # label 2, predicted 1
        ]
    )
    labels = np.array([0, 1, 2, 2])
    m = metrics(scores, labels, top_confused=5)
    assert m["top1"] == 0.5 and m["top5"] == 1.0 and m["n"] == 4
    assert m["per_class"]["accuracy"] == [1.0, 0.0, 0.5]
    assert m["mean_class_accuracy"] == pytest.approx(0.5)
    # AP: class0 scores [.7,.5,.1,.2] positive row 0 -> 1; class1 [.2,.4,.3,.5] pos row1 (0.4,
    # second highest) -> 1/2; class2 [.1,.1,.6,.3] pos rows 2,3 -> 1, 1
    assert m["per_class"]["ap"] == pytest.approx([1.0, 0.5, 1.0])
    assert m["mAP"] == pytest.approx(2.5 / 3)
    assert sorted(m["confused"]) == [(1, 0, 1), (2, 1, 1)]
    top2 = metrics(scores[:, :2], np.array([0, 1, 1, 0]))
    assert top2["top5"] == 1.0  # k = min(5, C)


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


def test_metrics_and_fusions_block_wise_ranks_agree_on_ties_and_nan_rows() -> None:
    """One top-k rule: ``metrics`` (train, evaluate) and the rank helpers fuse uses."""
    from avfuse.metrics import accuracy, metrics, true_rank

    rng = np.random.default_rng(3)
    # Coarse scores: many exact ties, so the tie rule (lower index first) is exercised.
    s = rng.integers(0, 4, size=(1500, 9)).astype(np.float64)
    s[::97, 2] = np.nan
    y = rng.integers(0, 9, size=1500)
    order = np.argsort(-np.where(np.isnan(s), -np.inf, s), axis=1, kind="stable")
    want = np.argmax(order == y[:, None], axis=1)
    want[np.isnan(s).any(axis=1)] = 9
    np.testing.assert_array_equal(true_rank(s, y), want)
    m, a = metrics(s, y), accuracy(s, y)
    assert m["top1"] == a["top1"] == np.mean(want < 1)
    assert m["top5"] == a["top5"] == np.mean(want < 5)


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
