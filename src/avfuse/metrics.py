"""Classification metrics over score matrices: one implementation for train, evaluate and fuse.

``train`` validates and ``evaluate`` reports with :func:`metrics`; ``avfuse.fusion`` keeps
block-wise versions of top-k accuracy for Kinetics-size matrices, with the same tie and NaN
rules (ties to the lower index, a NaN row a miss at every k).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class: mean over positives of precision at that positive's score.

    Tied scores are one threshold (precision counts every item scoring >= the positive's
    score), so the value does not depend on row order. NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    all_sorted = np.sort(scores)
    pos_sorted = np.sort(scores[positive])
    s = scores[positive]
    n_ge_all = len(scores) - np.searchsorted(all_sorted, s, side="left")
    n_ge_pos = n_pos - np.searchsorted(pos_sorted, s, side="left")
    return float(np.mean(n_ge_pos / n_ge_all))


def metrics(scores: np.ndarray, labels: np.ndarray, top_confused: int = 0) -> dict[str, Any]:
    """Classification metrics of ``scores`` (N, C) for integer ``labels`` (N,).

    Returns ``n``, ``top1``, ``top5`` (top-k with k = min(5, C)), ``mean_class_accuracy``
    (over classes present in ``labels``), ``mAP`` (macro over classes with a positive),
    ``per_class`` (lists ``n``, ``correct``, ``accuracy``, ``ap`` of length C) and
    ``confused`` (the ``top_confused`` largest off-diagonal confusion counts as
    ``(true, predicted, count)``). Ties in top-k go to the lower index; a row with a NaN is a
    miss at every k.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = scores.shape
    if labels.shape != (n,):
        raise ValueError(f"labels shape {labels.shape} != ({n},)")
    if n == 0:
        return {
            "n": 0,
            "top1": float("nan"),
            "top5": float("nan"),
            "mean_class_accuracy": float("nan"),
            "mAP": float("nan"),
            "per_class": {
                "n": [0] * c,
                "correct": [0] * c,
                "accuracy": [float("nan")] * c,
                "ap": [float("nan")] * c,
            },
            "confused": [],
        }
    # A NaN row would sort its first column first and could count as correct: it is a miss
    # at every k instead (pred = -1 matches no label; its scores rank below every other).
    nan_rows = np.isnan(scores).any(axis=1)
    if nan_rows.any():
        scores = np.where(nan_rows[:, None], -np.inf, scores)
    # Stable sort of the negated scores: equal scores keep column order (lower index first).
    order = np.argsort(-scores, axis=1, kind="stable")
    order[nan_rows] = -1
    pred = order[:, 0]
    k = min(5, c)
    top1 = float(np.mean(pred == labels))
    top5 = float(np.mean((order[:, :k] == labels[:, None]).any(axis=1)))
    counts = np.bincount(labels, minlength=c)
    correct = np.bincount(labels[pred == labels], minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    ap = np.array([average_precision(scores[:, j], labels == j) for j in range(c)])
    conf = np.zeros((c, c), np.int64)
    np.add.at(conf, (labels[~nan_rows], pred[~nan_rows]), 1)
    off = conf.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top_confused]
    confused = [(int(i // c), int(i % c), int(off.flat[i])) for i in flat if off.flat[i] > 0]
    return {
        "n": int(n),
        "top1": top1,
        "top5": top5,
        "mean_class_accuracy": float(np.nanmean(acc)) if (counts > 0).any() else float("nan"),
        "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "per_class": {
            "n": counts.tolist(),
            "correct": correct.tolist(),
            "accuracy": acc.tolist(),
            "ap": ap.tolist(),
        },
        "confused": confused,
    }
