"""Classification metrics over score matrices: one implementation for train, evaluate and fuse.

``train`` validates and ``evaluate`` reports with :func:`metrics`; ``avfuse.fusion`` scores its
weight grids with :func:`true_rank` and :func:`rank_metrics`, on which :func:`metrics` builds
too. One tie and NaN rule everywhere: ties go to the lower class index, a NaN row is a miss at
every k. The passes go in blocks of ``ROW_BLOCK`` rows, so Kinetics-size matrices need no
full-size temporaries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Rows per block in passes over (N, C) matrices: bounded temporaries at any N.
ROW_BLOCK = 512


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


def true_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rank of the true class in a stable descending sort of each row, ``(N, C) -> (N,)``.

    Equal to the position of ``labels[i]`` in ``np.argsort(-scores[i], kind="stable")``:
    ties go to the lower class index, like ``argmax``. A row with a NaN gets rank ``C``
    (never correct).
    """
    s = np.asarray(scores)
    labels = np.asarray(labels, dtype=np.int64)
    rank = np.empty(len(labels), dtype=np.int64)
    for lo in range(0, len(labels), ROW_BLOCK):
        rank[lo : lo + ROW_BLOCK] = _true_rank_block(
            s[lo : lo + ROW_BLOCK], labels[lo : lo + ROW_BLOCK]
        )
    return rank


def _true_rank_block(s: np.ndarray, labels: np.ndarray) -> np.ndarray:
    t = s[np.arange(len(labels)), labels][:, None]
    rank = (s > t).sum(axis=1)
    # Exact ties are rare with real scores: resolve them only on the rows that have one.
    tied = np.flatnonzero((s == t).sum(axis=1) > 1)
    if len(tied):
        cols = np.arange(s.shape[1])[None, :]
        rank[tied] += ((s[tied] == t[tied]) & (cols < labels[tied, None])).sum(axis=1)
    # NaN compares false with everything, so a NaN row would rank its true class first:
    # it is a miss at every k instead.
    rank[np.isnan(s).any(axis=1)] = s.shape[1]
    return rank


def accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-5 and mean class accuracy (fractions) of ``(N, C)`` scores; NaN when N = 0."""
    labels = np.asarray(labels, dtype=np.int64)
    ranks = true_rank(scores, labels) if len(labels) else np.zeros(0, dtype=np.int64)
    return rank_metrics(ranks, labels)


def rank_metrics(ranks: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """:func:`accuracy` from the true-class ranks ``(N,)``."""
    if len(labels) == 0:
        return {"top1": math.nan, "top5": math.nan, "mean_class": math.nan, "n": 0}
    return {
        "top1": float(np.mean(ranks < 1)),
        "top5": float(np.mean(ranks < 5)),
        "mean_class": mean_class_accuracy(ranks < 1, labels),
        "n": len(labels),
    }


def mean_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of their top-1 accuracy."""
    cls, inv = np.unique(labels, return_inverse=True)
    per = np.bincount(inv, weights=correct.astype(np.float64)) / np.bincount(inv)
    return float(per.mean()) if len(cls) else math.nan


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``(C,)`` top-1 accuracy per class (NaN for classes without videos)."""
    n = np.bincount(labels, minlength=n_classes).astype(np.float64)
    k = np.bincount(labels, weights=correct.astype(np.float64), minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, k / np.maximum(n, 1), np.nan)


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
    # A NaN row is a miss at every k (true_rank ranks it C; pred = -1 matches no label), and
    # for AP its scores rank below every other.
    ranks = true_rank(scores, labels)
    nan_rows = np.isnan(scores).any(axis=1)
    if nan_rows.any():
        scores = np.where(nan_rows[:, None], -np.inf, scores)
    # argmax takes the first maximum: the lower index wins a tie, as in true_rank.
    pred = np.where(nan_rows, -1, scores.argmax(axis=1))
    top1 = float(np.mean(ranks < 1))
    top5 = float(np.mean(ranks < min(5, c)))
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
