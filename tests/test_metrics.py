"""Top-k, mean class accuracy and mAP against brute force; NaN rows are never correct."""

from __future__ import annotations

import numpy as np
import pytest

from avfuse.metrics import accuracy, average_precision, metrics, true_rank


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


def test_true_rank_matches_stable_argsort() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties on purpose
    y = rng.integers(0, 7, 200)
    want = [int(np.flatnonzero(np.argsort(-s[i], kind="stable") == y[i])[0]) for i in range(200)]
    assert true_rank(s, y).tolist() == want


def test_accuracy_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(300, 12))
    y = rng.integers(0, 12, 300)
    top = np.argsort(-s, axis=1)
    top1 = np.mean([top[i, 0] == y[i] for i in range(300)])
    top5 = np.mean([y[i] in top[i, :5] for i in range(300)])
    per = [np.mean([top[i, 0] == k for i in range(300) if y[i] == k]) for k in np.unique(y)]
    got = accuracy(s, y)
    assert got["top1"] == pytest.approx(top1)
    assert got["top5"] == pytest.approx(top5)
    assert got["mean_class"] == pytest.approx(np.mean(per))
    assert got["n"] == 300


def test_nan_rows_are_never_correct() -> None:
    s = np.array([[np.nan, np.nan, np.nan], [0.1, np.nan, 0.0], [0.2, 0.5, 0.3]])
    y = np.array([0, 0, 1])
    assert true_rank(s, y).tolist() == [3, 3, 0]
    assert accuracy(s, y)["top1"] == pytest.approx(1 / 3)
    m = metrics(s, y)
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(1 / 3)
    assert m["per_class"]["correct"] == [0, 1, 0]
