"""Stage 4: late fusion of the audio classifier's scores with a video model's scores.

The figures this stage reports are meant to be believed:

* rows are joined by ``video_id`` (:mod:`avfuse.video_scores` normalises the spellings of
  other tools), class columns by class name; mismatches beyond a tolerance are errors;
* videos without audio keep their video-only scores and stay in every metric, so the fused
  accuracy is comparable with the video-only accuracy on the whole split;
* both score sets are put on one scale (log-probabilities; logits go through a softmax,
  optionally temperature-calibrated) before fusing;
* the fusion weight is chosen on data it is not evaluated on: a held-out split, or k-fold
  cross-validation on the evaluated split (each fold fused with a weight chosen on the other
  folds). Tuning on the evaluated videos is possible only with ``weight_selection=optimistic``,
  and the result is then labelled optimistic everywhere;
* gains come with a paired bootstrap 95% confidence interval.

Methods, with audio weight ``w`` and per-video log-probabilities ``lv`` (video), ``la`` (audio):

``mean``     ``p = (1 - w) exp(lv) + w exp(la)``
``logprob``  ``p = softmax((1 - w) lv + w la)`` (a weighted product of experts)
``stack``    multinomial logistic regression with logits
             ``z_c = (α + a_c) lv_c + (β + b_c) la_c + d_c``, L2 on the per-class terms.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import optimize
from scipy.special import bdtrc, log_softmax, logsumexp

from avfuse.config import Config, save_config, to_dict
from avfuse.io import atomic_dir, write_json
from avfuse.manifest import load_classes, load_manifest
from avfuse.scores import ScoreFile
from avfuse.video_scores import (
    ClassAlignment,
    Format,
    IdMatch,
    VideoScoreError,
    VideoScores,
    align_classes,
    check_finite,
    check_labels,
    match_ids,
    normalize_id,
    read_video_scores,
)

log = logging.getLogger(__name__)

Method = Literal["mean", "logprob", "stack"]
Selection = Literal["cv", "heldout", "optimistic"]
Kind = Literal["auto", "logits", "probs"]

# Probabilities are floored here before taking logs: a model that gives a class exactly 0
# must not veto it forever in the product of experts.
LOG_FLOOR = math.log(1e-8)
# Rows per block in passes over (N, C) matrices: bounded temporaries at any N.
_CHUNK = 512


@dataclass(frozen=True)
class FuseConfig(Config):
    """How to fuse audio scores with a video model's scores and report the result."""

    work: Path = field(metadata={"help": "work folder (manifest, classes.txt)", "positional": True})
    audio_scores: Path | None = field(
        default=None,
        metadata={"help": "audio score file (default WORK/scores/audio_val.npz)"},
    )
    video_scores: tuple[Path, ...] = field(
        default=(),
        metadata={"help": "video score file(s): .npz/.npy/.csv/.pkl; several = parts of one"},
    )
    video_ids: Path | None = field(
        default=None,
        metadata={"help": "ids of the rows of an unnamed score array, one a line"},
    )
    annotations: Path | None = field(
        default=None,
        metadata={
            "help": "annotation list giving the row order of an unnamed score array "
            "(mmaction2 'path label' list or Kinetics CSV)"
        },
    )
    video_label_map: Path | None = field(
        default=None,
        metadata={"help": "class names of the video model's columns, one a line"},
    )
    video_format: Format = field(
        default="auto", metadata={"help": "video score file format (auto: by extension)"}
    )
    video_kind: Kind = field(
        default="auto",
        metadata={
            "help": "video scores are logits or probs (auto: probs if rows are non-negative "
            "and sum to 1 within their rounding; ambiguous files are refused)"
        },
    )
    method: Method = field(
        default="mean",
        metadata={"help": "mean of probs, logprob (product of experts) or stack (learned)"},
    )
    weight_selection: Selection = field(
        default="cv",
        metadata={
            "help": "cv: k-fold on the evaluated split (reported figure cross-validated); "
            "heldout: fit on --heldout-audio/--heldout-video; optimistic: tune on the "
            "evaluated videos (result labelled optimistic)"
        },
    )
    folds: int = field(default=5, metadata={"help": "folds for weight_selection=cv", "min": 2})
    grid: int = field(default=21, metadata={"help": "audio weights tried, evenly in [0, 1]"})
    heldout_audio: Path | None = field(
        default=None, metadata={"help": "audio score file of held-out videos"}
    )
    heldout_video: tuple[Path, ...] = field(
        default=(), metadata={"help": "video score file(s) of the same held-out videos"}
    )
    heldout_video_ids: Path | None = field(
        default=None,
        metadata={"help": "ids / annotations giving the row order of unnamed held-out scores"},
    )
    calibrate: bool = field(
        default=False,
        metadata={"help": "fit a softmax temperature per model on the fitting data"},
    )
    stack_l2: float = field(
        default=1.0, metadata={"help": "L2 strength on the stacker's per-class terms"}
    )
    bootstrap: int = field(
        default=2000, metadata={"help": "bootstrap resamples for the CIs", "min": 0}
    )
    seed: int = field(default=0, metadata={"help": "seed for folds and bootstrap"})
    tolerance: float = field(
        default=0.005,
        metadata={
            "help": "fraction of videos that may be missing/extra/duplicated per side",
            "min": 0,
            "max": 1,
        },
    )
    class_tolerance: int = field(
        default=0,
        metadata={"help": "class names that may be missing/unknown on the video side", "min": 0},
    )
    label_tolerance: float = field(
        default=0.005,
        metadata={
            "help": "fraction of videos whose label in the video scores' list / dump may "
            "disagree with the manifest"
        },
    )
    allow_low_video_accuracy: bool = field(
        default=False,
        metadata={
            "help": "fuse even when the video scores are no better than chance on the "
            "evaluated videos (by default a sign of rows or columns that do not line up)"
        },
    )
    split: str | None = field(
        default=None, metadata={"help": "split to evaluate (default: the audio file's)"}
    )
    output: Path | None = field(
        default=None, metadata={"help": "output folder (default WORK/fusion)"}
    )


# --------------------------------------------------------------------------- numerics


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(log_softmax(z, axis=axis))


def log_softmax32(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax of ``(N, C)`` in float32 (scipy's works in float64, 3x slower).

    Computed in blocks of rows, so the only full-size array is ``out`` (which may be ``z``
    itself when that is float32: the result then overwrites it).
    """
    z = np.asarray(z)
    if out is None:
        out = np.empty(z.shape, dtype=np.float32)
    for lo in range(0, z.shape[0], _CHUNK):
        blk = out[lo : lo + _CHUNK]
        blk[...] = z[lo : lo + _CHUNK]
        blk -= blk.max(axis=1, keepdims=True)
        blk -= np.log(np.exp(blk).sum(axis=1, keepdims=True))
    return out


def detect_kind(scores: np.ndarray, atol: float = 1e-3) -> Literal["logits", "probs"]:
    """``probs`` when :func:`infer_kind` says so, else ``logits`` (ambiguous files included)."""
    return "probs" if infer_kind(scores).kind == "probs" else "logits"


@dataclass(frozen=True)
class KindGuess:
    """What :func:`infer_kind` concluded: ``kind`` (``None`` = ambiguous) and why."""

    kind: Literal["logits", "probs"] | None
    reason: str
    resolution: str
    tolerance: float


def score_resolution(scores: np.ndarray) -> tuple[str, float]:
    """How finely the values are written, and half its unit (the rounding error of a value).

    Decimal rounding (``0.12``, ``0.125``) is found as the fewest decimals, up to 6, of which
    every value is a multiple; otherwise the narrowest float type holding every value exactly.
    """
    s = scores
    for d in range(1, 7):
        scale = 10.0**d
        ok = True
        for lo in range(0, s.shape[0], _CHUNK):
            blk = np.asarray(s[lo : lo + _CHUNK], dtype=np.float64) * scale
            # A hundredth of the last digit: float32 storage of decimals stays within it.
            if not (np.abs(blk - np.rint(blk)) <= 1e-2).all():
                ok = False
                break
        if ok:
            return f"{d} decimals", 0.5 / scale
    for name, dt in (("float16", np.float16), ("float32", np.float32)):
        if s.dtype == dt or all(
            np.array_equal(s[lo : lo + _CHUNK], s[lo : lo + _CHUNK].astype(dt))
            for lo in range(0, s.shape[0], _CHUNK)
        ):
            return name, float(np.finfo(dt).eps)
    return "float64", float(np.finfo(np.float64).eps)


def infer_kind(scores: np.ndarray) -> KindGuess:
    """Probabilities or logits, from the values of ``(N, C)`` scores.

    Rows that are non-negative and sum to 1 within their rounding are probabilities: values
    written with ``d`` decimals may each be off by half a unit of the last digit, so a row of
    C of them sums to 1 within ``C * 0.5 * 10**-d`` (at least 1e-4 for unrounded floats).
    Scores with negative values and rows far from summing to 1 are logits. Anything else is
    ambiguous (``kind=None``): non-negative rows far from sum 1 (sigmoid outputs,
    probabilities over another class set), or probability-like rows with negative values.
    """
    n, c = scores.shape
    resolution, half = score_resolution(scores)
    tol = max(c * half, 1e-4)
    neg = np.zeros(n, dtype=bool)
    sum1 = np.zeros(n, dtype=bool)
    over1 = np.zeros(n, dtype=bool)
    for lo in range(0, n, _CHUNK):
        blk = np.asarray(scores[lo : lo + _CHUNK], dtype=np.float64)
        neg[lo : lo + _CHUNK] = (blk < 0).any(axis=1)
        over1[lo : lo + _CHUNK] = (blk > 1 + half).any(axis=1)
        sum1[lo : lo + _CHUNK] = np.abs(blk.sum(axis=1) - 1.0) <= tol
    where = f"rows sum to 1 within {tol:.2g} ({c} classes, {resolution})"
    if not neg.any() and not over1.any() and sum1.all():
        return KindGuess("probs", f"non-negative and {where}", resolution, tol)
    frac = float(sum1.mean())
    if not neg.any():
        what = "values in [0, 1]" if not over1.any() else "non-negative values"
        return KindGuess(
            None,
            f"{what}, but {1 - frac:.1%} of the rows do not sum to 1 (within {tol:.2g}): "
            "sigmoid outputs, probabilities over another class set, or logits that happen to "
            "be non-negative",
            resolution,
            tol,
        )
    if frac >= 0.5:
        return KindGuess(
            None,
            f"{frac:.1%} of the rows sum to 1 like probabilities, but {int(neg.sum())} rows have "
            "negative values",
            resolution,
            tol,
        )
    return KindGuess("logits", "negative values and rows that do not sum to 1", resolution, tol)


def to_log_probs(scores: np.ndarray, kind: Kind = "auto") -> tuple[np.ndarray, str]:
    """``(N, C)`` scores -> ``(N, C)`` float32 log-probabilities and the kind used.

    ``kind="auto"`` uses :func:`infer_kind` and raises ``ValueError`` on an ambiguous file.
    """
    if kind == "auto":
        guess = infer_kind(scores)
        if guess.kind is None:
            raise ValueError(f"cannot tell logits from probabilities: {guess.reason}")
        k = guess.kind
    else:
        k = kind
    s = np.asarray(scores)
    if k == "logits":
        return log_softmax32(s), k
    if s.size and s.min() < 0:
        raise ValueError("scores declared as probabilities contain negative values")
    out = np.empty(s.shape, dtype=np.float32)
    for lo in range(0, s.shape[0], _CHUNK):
        with np.errstate(divide="ignore"):
            lp = np.maximum(np.log(np.asarray(s[lo : lo + _CHUNK], dtype=np.float64)), LOG_FLOOR)
        # Renormalise: a model's probabilities over our class subset need not sum to 1.
        log_softmax32(lp, out[lo : lo + _CHUNK])
    return out, k


def temper(logp: np.ndarray, t: float) -> np.ndarray:
    """Log-probabilities at temperature ``t``: ``log_softmax(logp / t)``."""
    if t == 1.0:
        return logp
    return log_softmax32(logp / np.float32(t))


def fit_temperature(logp: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the mean NLL of ``softmax(logp / T)`` (1-D bounded search)."""
    if len(labels) == 0:
        return 1.0
    lp = np.asarray(logp, dtype=np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = lp / math.exp(log_t)
        return float(np.mean(logsumexp(z, axis=1) - z[rows, labels]))

    res = optimize.minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded")
    return float(math.exp(res.x))


def true_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rank of the true class in a stable descending sort of each row, ``(N, C) -> (N,)``.

    Equal to the position of ``labels[i]`` in ``np.argsort(-scores[i], kind="stable")``:
    ties go to the lower class index, like ``argmax``. A row with a NaN gets rank ``C``
    (never correct).
    """
    s = np.asarray(scores)
    labels = np.asarray(labels, dtype=np.int64)
    rank = np.empty(len(labels), dtype=np.int64)
    for lo in range(0, len(labels), _CHUNK):
        rank[lo : lo + _CHUNK] = _true_rank_block(s[lo : lo + _CHUNK], labels[lo : lo + _CHUNK])
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


def paired_bootstrap_ci(
    new_correct: np.ndarray,
    base_correct: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Gain in accuracy (fraction) of ``new`` over ``base`` on the same videos, with its CI.

    Resampling videos with replacement and recounting is the same as drawing, for the three
    kinds of video (new right only, base right only, both or neither), multinomial counts with
    their observed frequencies; that is exact and costs O(n_boot) instead of O(n_boot * N).
    Returns ``(gain, low, high)``.
    """
    a = np.asarray(new_correct, dtype=bool)
    b = np.asarray(base_correct, dtype=bool)
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    up = int(np.sum(a & ~b))
    down = int(np.sum(~a & b))
    gain = (up - down) / n
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [up / n, down / n, 1 - (up + down) / n], size=n_boot)
    boot = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(gain), float(lo), float(hi)


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``(N,)`` fold number per video, each class spread evenly over the ``k`` folds."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    order = rng.permutation(len(labels))
    # Sorting a random permutation by label keeps the within-class order random.
    order = order[np.argsort(labels[order], kind="stable")]
    _, start = np.unique(labels[order], return_index=True)
    offsets = rng.integers(0, k, size=len(start))
    pos_in_class = np.arange(len(order)) - np.repeat(start, np.diff(np.append(start, len(order))))
    cls_offset = np.repeat(offsets, np.diff(np.append(start, len(order))))
    folds[order] = (pos_in_class + cls_offset) % k
    return folds


# --------------------------------------------------------------------------- fusion rules


def fuse_log_probs(lv: np.ndarray, la: np.ndarray, w: float, method: Method) -> np.ndarray:
    """Fused probabilities ``(N, C)`` of rows that have both views, for audio weight ``w``.

    ``w = 0`` returns exactly the video probabilities and ``w = 1`` exactly the audio ones.
    """
    if w == 0.0:
        return np.exp(lv)
    if w == 1.0:
        return np.exp(la)
    wv, wa = np.float32(1.0 - w), np.float32(w)
    if method == "mean":
        return wv * np.exp(lv) + wa * np.exp(la)
    if method == "logprob":
        return np.exp(log_softmax32(wv * lv + wa * la))
    raise ValueError(f"fuse_log_probs: no weight for method {method!r}")


def weight_curves(
    lv: np.ndarray,
    la: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    method: Method,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-video outcome at every weight: ``correct (G, N)`` bool, ``nll (G, N)`` float32.

    Computed once, so choosing a weight on any subset of videos (a fold's complement, say)
    is a masked mean, not a new pass over the scores. Rows are processed in blocks, every
    weight on one block before the next: the temporaries stay a few MB at any N, and each
    row's figures are those of a full-size computation. ``rows`` (a boolean mask) restricts
    the curves to those rows (N = its count) without a full-size copy of ``lv`` and ``la``.
    """
    m = "logprob" if method == "stack" else method
    idx = np.arange(len(labels)) if rows is None else np.flatnonzero(rows)
    correct = np.zeros((len(weights), len(idx)), dtype=bool)
    nll = np.zeros((len(weights), len(idx)), dtype=np.float32)
    for lo in range(0, len(idx), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        r = idx[sl] if rows is not None else sl
        _weight_curves_block(lv[r], la[r], labels[r], weights, m, correct[:, sl], nll[:, sl])
    return correct, nll


def _weight_curves_block(
    lv: np.ndarray,
    la: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    m: Method,
    correct: np.ndarray,
    nll: np.ndarray,
) -> None:
    rows = np.arange(len(labels))
    pv, pa = (np.exp(lv), np.exp(la)) if m == "mean" else (None, None)
    for g, w in enumerate(weights):
        if m == "logprob" and 0.0 < w < 1.0:
            s = np.float32(1 - w) * lv + np.float32(w) * la
            correct[g] = true_rank(s, labels) == 0
            nll[g] = logsumexp(s, axis=1) - s[rows, labels]
        else:
            if pv is not None and pa is not None:
                p = np.float32(1 - w) * pv + np.float32(w) * pa
            else:
                p = fuse_log_probs(lv, la, float(w), m)
            correct[g] = true_rank(p, labels) == 0
            nll[g] = -np.log(np.maximum(p[rows, labels], 1e-30))


def pick_weight(correct: np.ndarray, nll: np.ndarray, mask: np.ndarray | None = None) -> int:
    """Grid index with the best top-1 accuracy on ``mask``ed videos (ties: lower mean NLL)."""
    c = correct if mask is None else correct[:, mask]
    e = nll if mask is None else nll[:, mask]
    if c.shape[1] == 0:
        return 0
    acc = c.mean(axis=1)
    loss = e.mean(axis=1, dtype=np.float64)
    return int(np.lexsort((loss, -acc))[0])


@dataclass
class Stacker:
    """Multinomial logistic regression on the two log-probability vectors.

    Logits ``z_c = (α + a_c) lv_c + (β + b_c) la_c + d_c``; ``a, b, d`` are L2-regularised
    (``l2 / 2 * mean_c(a_c² + b_c² + d_c²)``) so that with few videos per class it falls back
    to a global weighted product of experts with learned sharpness ``α, β``.
    """

    alpha: float = 1.0
    beta: float = 0.0
    a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    b: np.ndarray = field(default_factory=lambda: np.zeros(0))
    d: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def logits(self, lv: np.ndarray, la: np.ndarray) -> np.ndarray:
        a = np.float32(self.alpha) + self.a.astype(np.float32)
        b = np.float32(self.beta) + self.b.astype(np.float32)
        return lv * a + la * b + self.d.astype(np.float32)

    def predict(self, lv: np.ndarray, la: np.ndarray) -> np.ndarray:
        return softmax(self.logits(lv, la), axis=1)

    @classmethod
    def fit(
        cls, lv: np.ndarray, la: np.ndarray, labels: np.ndarray, l2: float = 1.0, maxiter: int = 200
    ) -> Stacker:
        n, c = lv.shape
        rows = np.arange(n)
        onehot_idx = (rows, labels)

        def unpack(theta: np.ndarray) -> Stacker:
            return cls(
                float(theta[0]),
                float(theta[1]),
                theta[2 : 2 + c],
                theta[2 + c : 2 + 2 * c],
                theta[2 + 2 * c :],
            )

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            st = unpack(theta)
            z = st.logits(lv, la)
            lse = logsumexp(z, axis=1)
            loss = float(np.mean(lse - z[onehot_idx]))
            g = np.exp(z - lse[:, None].astype(np.float32))
            g[onehot_idx] -= 1.0
            g /= n
            gv = (g * lv).sum(axis=0, dtype=np.float64)
            ga = (g * la).sum(axis=0, dtype=np.float64)
            gd = g.sum(axis=0, dtype=np.float64)
            reg = theta[2:]
            loss += 0.5 * l2 * float(reg @ reg) / c
            grad = np.concatenate(
                [[gv.sum(), ga.sum()], gv + l2 * st.a / c, ga + l2 * st.b / c, gd + l2 * st.d / c]
            )
            return loss, grad

        theta0 = np.concatenate([[1.0, 0.0], np.zeros(3 * c)])
        res = optimize.minimize(
            loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": maxiter}
        )
        return unpack(res.x)


# --------------------------------------------------------------------------- fitting


@dataclass
class Views:
    """The evaluated (or fitting) videos: ids (N,), labels (N,) (-1 = none), video and audio
    log-probabilities (N, C) float32 (audio rows NaN where ``has_audio`` is False)."""

    ids: np.ndarray
    labels: np.ndarray
    lv: np.ndarray
    la: np.ndarray
    has_audio: np.ndarray
    n_windows: np.ndarray

    def subset(self, mask: np.ndarray) -> Views:
        return Views(
            self.ids[mask],
            self.labels[mask],
            self.lv[mask],
            self.la[mask],
            self.has_audio[mask],
            self.n_windows[mask],
        )


@dataclass
class Params:
    """What a fit chooses: temperatures, the audio weight (mean / logprob) or a stacker."""

    method: Method
    weight: float = 0.0
    t_video: float = 1.0
    t_audio: float = 1.0
    stacker: Stacker | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t_video": self.t_video, "t_audio": self.t_audio}
        if self.stacker is not None:
            out["alpha"], out["beta"] = self.stacker.alpha, self.stacker.beta
        else:
            out["weight"] = self.weight
        return out


def fit_params(
    v: Views,
    method: Method,
    weights: np.ndarray,
    calibrate: bool,
    l2: float,
    curves: tuple[np.ndarray, np.ndarray] | None = None,
) -> Params:
    """Choose temperatures and the weight (or stacker) on the labelled videos of ``v``.

    ``curves``: precomputed :func:`weight_curves` of ``v``'s labelled videos with audio (only
    valid without calibration, which changes the scores).
    """
    lab = v.labels >= 0
    both = lab & v.has_audio
    tv = fit_temperature(v.lv[lab], v.labels[lab]) if calibrate else 1.0
    ta = fit_temperature(v.la[both], v.labels[both]) if calibrate else 1.0
    if method == "stack":
        st = Stacker.fit(temper(v.lv[both], tv), temper(v.la[both], ta), v.labels[both], l2)
        return Params(method, t_video=tv, t_audio=ta, stacker=st)
    if curves is None:
        curves = weight_curves(
            temper(v.lv[both], tv), temper(v.la[both], ta), v.labels[both], weights, method
        )
    g = pick_weight(*curves)
    return Params(method, weight=float(weights[g]), t_video=tv, t_audio=ta)


def apply_params(p: Params, v: Views) -> np.ndarray:
    """Fused probabilities ``(N, C)`` float32; rows without audio get the video's alone.

    Row blocks at a time (every step is row-wise): the only full-size array is the result.
    """
    out = np.empty(v.lv.shape, dtype=np.float32)
    for lo in range(0, v.lv.shape[0], _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        out[sl] = _apply_block(p, v.lv[sl], v.la[sl], v.has_audio[sl])
    return out


def _apply_rows(p: Params, v: Views, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[rows] = apply_params(p, v.subset(rows))`` without full-size copies."""
    for lo in range(0, len(rows), _CHUNK):
        r = rows[lo : lo + _CHUNK]
        out[r] = _apply_block(p, v.lv[r], v.la[r], v.has_audio[r])


def _apply_block(p: Params, lv: np.ndarray, la_all: np.ndarray, m: np.ndarray) -> np.ndarray:
    lv = temper(lv, p.t_video)
    out = np.exp(lv)
    if m.any():
        la = temper(la_all[m], p.t_audio)
        if p.stacker is not None:
            out[m] = p.stacker.predict(lv[m], la)
        else:
            out[m] = fuse_log_probs(lv[m], la, p.weight, p.method)
    return out


# --------------------------------------------------------------------------- inputs


def _infer_split(ids: np.ndarray) -> str:
    heads = pd.Series([str(i).split("/", 1)[0] for i in ids])
    return str(heads.mode().iloc[0]) if len(heads) else ""


def _aligned_audio(sf: ScoreFile, classes: list[str], path: Path, tol: int) -> np.ndarray:
    al = align_classes(
        sf.classes, classes, n_columns=len(sf.classes), source=str(path), tolerance=tol
    )
    if al.missing:
        raise VideoScoreError(
            f"{path}: the audio model lacks classes {al.missing[:5]}; it was trained on "
            "another class list"
        )
    if len(sf.classes) == len(classes) and np.array_equal(al.columns, np.arange(len(classes))):
        return sf.scores  # already in class-list order: no full-size copy
    return sf.scores[:, al.columns]


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """``(N,)`` True where every value of the row of ``(N, C)`` ``a`` is finite."""
    out = np.empty(a.shape[0], dtype=bool)
    for lo in range(0, a.shape[0], _CHUNK):
        out[lo : lo + _CHUNK] = np.isfinite(a[lo : lo + _CHUNK]).all(axis=1)
    return out


def _video_log_probs(
    vs: VideoScores, classes: list[str], kind: Kind, class_tol: int
) -> tuple[np.ndarray, dict[str, Any], ClassAlignment]:
    """Video scores aligned to ``classes`` as log-probabilities ``(M, C)`` + a report.

    Float32 scores whose columns are already in class-list order are converted in place
    (``vs.scores`` then holds the log-probabilities): at Kinetics scale that saves a
    full-size copy.
    """
    check_finite(vs.scores, vs.ids, vs.source)
    al = align_classes(
        vs.classes, classes, n_columns=vs.scores.shape[1], source=vs.source, tolerance=class_tol
    )
    if kind != "auto":
        kind_used, how = kind, "given (--video-kind)"
    elif vs.kind:
        kind_used, how = vs.kind, "from the file format"
    else:
        guess = infer_kind(vs.scores)
        if guess.kind is None:
            raise VideoScoreError(
                f"{vs.source}: cannot tell whether the video scores are logits or "
                f"probabilities: {guess.reason}. Give --video-kind logits or --video-kind probs"
            )
        kind_used, how = guess.kind, f"detected: {guess.reason}"
    identity = len(classes) == vs.scores.shape[1] and np.array_equal(
        al.columns, np.arange(len(classes))
    )
    try:
        if (
            identity
            and kind_used == "logits"
            and vs.scores.dtype == np.float32
            and vs.scores.flags.writeable
        ):
            # The two passes of the general path below (same numbers), in place.
            lp = log_softmax32(log_softmax32(vs.scores, out=vs.scores), out=vs.scores)
        else:
            full, _ = to_log_probs(vs.scores, kind_used)
            if identity:
                lp = log_softmax32(full, out=full)
            else:
                lp = np.full((vs.scores.shape[0], len(classes)), LOG_FLOOR, dtype=np.float32)
                have = al.columns >= 0
                # Softmax over the video model's own classes, then restricted to ours and
                # renormalised: a class the video model does not know gets the floor
                # probability, not a zero column.
                lp[:, have] = full[:, al.columns[have]]
                del full
                lp = log_softmax32(lp, out=lp)
    except ValueError as exc:
        raise VideoScoreError(f"{vs.source}: {exc}") from exc
    rep = {
        "source": vs.source,
        "kind": kind_used,
        "kind_how": how,
        "classes": al.report(),
        "notes": vs.notes,
    }
    return lp, rep, al


_MIN_TESTED = 50


def video_above_chance(
    lv: np.ndarray, labels: np.ndarray, n_classes: int, alpha: float = 1e-3
) -> dict[str, Any]:
    """Is the video model's top-1 clearly above what unrelated scores would reach?

    ``lv`` (N, C) video scores, ``labels`` (N,) manifest labels (``-1`` = unlabelled,
    ignored). Scores that belong to other videos (a list in another order than the dump) or
    columns in another class order predict independently of the true class; their expected
    top-1 is then ``p0 = sum_c q_c * pi_c``, with ``q`` the predicted and ``pi`` the true
    class frequencies (the chance agreement of Cohen's kappa; at most the majority-class
    rate, ``1/C`` for balanced classes). A one-sided binomial test of the observed hits
    against ``p0`` at level ``alpha``; ``testable`` is False when even a perfect top-1 on so
    few videos would not pass it.
    """
    lab = labels >= 0
    y = labels[lab]
    n = len(y)
    if n == 0:
        return {
            "n": 0,
            "top1": math.nan,
            "chance": math.nan,
            "p_value": math.nan,
            "testable": False,
            "above_chance": False,
        }
    pred = np.empty(n, dtype=np.int64)
    rows = np.flatnonzero(lab)
    for lo in range(0, n, _CHUNK):
        pred[lo : lo + _CHUNK] = np.argmax(lv[rows[lo : lo + _CHUNK]], axis=1)
    k = int((pred == y).sum())
    q = np.bincount(pred, minlength=n_classes) / n
    pi = np.bincount(y, minlength=n_classes) / n
    p0 = min(max(float(q @ pi), 1e-12), 1.0)
    # P(X >= k) for X ~ Binomial(n, p0); bdtrc(j, n, p) is P(X > j) (scipy.special, which
    # is loaded anyway, where scipy.stats would cost 20 MB of imports).
    pval = float(bdtrc(k - 1, n, p0)) if (p0 < 1 and k > 0) else 1.0
    # Too few videos to tell a weak model from a misaligned file: only refuse from _MIN_TESTED
    # labelled videos on (below that a warning is logged), where chance-level hits are rare.
    testable = n >= _MIN_TESTED and p0 < 1 and float(bdtrc(n - 1, n, p0)) < alpha
    return {
        "n": n,
        "top1": k / n,
        "chance": p0,
        "p_value": pval,
        "alpha": alpha,
        "testable": bool(testable),
        "above_chance": bool(pval < alpha),
    }


@dataclass
class _Side:
    views: Views
    report: dict[str, Any]


def _build_views(
    manifest: pd.DataFrame,
    split: str | None,
    classes: list[str],
    audio: ScoreFile,
    audio_path: Path,
    video: VideoScores,
    cfg: FuseConfig,
    what: str,
) -> _Side:
    """Join audio and video rows to the manifest videos of ``split`` (or of the audio file).

    ``audio`` and ``video`` are consumed: their score matrices may be overwritten with the
    log-probabilities, to keep the peak memory near three ``(N, C)`` float32 arrays.
    """
    if split is not None:
        uni = manifest[manifest["split"].astype(str) == split]
    else:
        uni = manifest[manifest["video_id"].isin(set(audio.ids.tolist()))]
    if uni.empty:
        raise VideoScoreError(f"{audio_path}: no manifest video of split {split!r} ({what})")
    target = uni["video_id"].astype(str).tolist()
    on_disk = (
        (uni["scan_status"] != "missing").to_numpy()
        if "scan_status" in uni
        else np.ones(len(uni), bool)
    )

    pa = _aligned_audio(audio, classes, audio_path, cfg.class_tolerance)
    # After this check a row with status ok has finite scores: status alone says "has audio".
    broken = audio.has_scores & ~_finite_rows(pa)
    if broken.any():
        raise VideoScoreError(
            f"{audio_path}: {int(broken.sum())} row(s) with status ok but NaN or infinite "
            f"scores (e.g. {audio.ids[broken][0]!r})"
        )
    am = match_ids(target, audio.ids.tolist())
    am.check(cfg.tolerance, "the audio scores", str(audio_path))

    lv_all, vrep, v_al = _video_log_probs(video, classes, cfg.video_kind, cfg.class_tolerance)
    vm = match_ids(target, video.ids)
    vm = _classify_extra(vm, manifest, split)
    # A video the dataset download lacks was never scored by anyone: not a mismatch.
    not_on_disk = [t for t, r, d in zip(target, vm.rows, on_disk, strict=True) if r < 0 and not d]
    skip = set(not_on_disk)
    vm.missing = [m for m in vm.missing if m not in skip]
    vm.check(cfg.tolerance, "the video scores", video.source)

    keep = vm.rows >= 0
    rows_v = vm.rows[keep]
    rows_a = am.rows[keep]
    ids = np.asarray(target, dtype=str)[keep]
    labels = uni["label_index"].to_numpy(np.int64)[keep]
    lv = lv_all if np.array_equal(rows_v, np.arange(len(lv_all))) else lv_all[rows_v]
    del lv_all
    label_check = None
    if video.labels is not None:
        label_check = check_labels(
            video.labels,
            rows_v,
            labels,
            ids.tolist(),
            classes,
            v_al.columns,
            cfg.label_tolerance,
        ).report()
    chance = video_above_chance(lv, labels, len(classes))
    if chance["testable"] and not chance["above_chance"] and not cfg.allow_low_video_accuracy:
        raise VideoScoreError(
            f"{video.source}: video top-1 on the {what} videos is {chance['top1']:.1%} "
            f"({chance['n']} videos), no better than chance ({chance['chance']:.1%}, "
            f"one-sided binomial p = {chance['p_value']:.2g}): the score rows or columns do not "
            "line up with the videos. Check that the annotation list (--annotations / "
            "--video-ids) is in the order the scores were written (an mmaction2 dump follows "
            "its test list line by line) and that --video-label-map gives the model's class "
            "order; pass --allow-low-video-accuracy to fuse anyway"
        )
    if not chance["testable"]:
        log.warning(
            "%s: too few labelled videos (%d) to tell the video scores from chance",
            video.source,
            chance["n"],
        )
    c = len(classes)
    hit = rows_a >= 0
    has_audio = np.zeros(len(ids), dtype=bool)
    has_audio[hit] = audio.has_scores[rows_a[hit]]
    if pa is audio.scores and np.array_equal(rows_a, np.arange(len(audio.ids))):
        # Our own audio file, rows already in manifest order: converted in place (the
        # ScoreFile is consumed), saving a full-size array at Kinetics scale.
        la = pa
        la[~has_audio] = np.nan
    else:
        la = np.full((len(ids), c), np.nan, dtype=np.float32)
    n_win = np.zeros(len(ids), dtype=np.int32)
    if has_audio.any():
        dest = np.flatnonzero(has_audio)
        for lo in range(0, len(dest), _CHUNK):
            d = dest[lo : lo + _CHUNK]
            la[d], _ = to_log_probs(pa[rows_a[d]], "probs")
        n_win[has_audio] = audio.n_windows[rows_a[has_audio]]
    audio_status = pd.Series(
        np.where(hit, audio.status[np.maximum(rows_a, 0)], "no_row"), dtype=str
    ).value_counts()
    report = {
        "videos_in_split": len(target),
        "videos_fused": len(ids),
        "not_on_disk_without_video_scores": len(not_on_disk),
        "video": {
            **vrep,
            "ids": vm.report(),
            "exact_ids": vm.exact,
            "labels": label_check,
            "chance": chance,
        },
        "audio": {"source": str(audio_path), "ids": am.report(), "status": audio_status.to_dict()},
        "with_audio": int(has_audio.sum()),
        "without_audio": int((~has_audio).sum()),
        "unlabelled": int((labels < 0).sum()),
    }
    return _Side(Views(ids, labels, lv, la, has_audio, n_win), report)


def _classify_extra(vm: IdMatch, manifest: pd.DataFrame, split: str | None) -> IdMatch:
    """Source rows of another split's videos are not mismatches, only unknown ids are."""
    if split is None or not vm.extra:
        return vm
    other = manifest[manifest["split"].astype(str) != split]["video_id"].astype(str)
    keys = set(other.tolist()) | {normalize_id(i) for i in other}
    vm.extra = [e for e in vm.extra if e not in keys and normalize_id(e) not in keys]
    return vm


def _load_audio(path: Path) -> ScoreFile:
    if not path.exists():
        raise VideoScoreError(f"{path}: audio score file not found (run `avfuse predict` first)")
    try:
        return ScoreFile.load(path)
    except (ValueError, KeyError, OSError) as exc:
        raise VideoScoreError(f"{path}: not an avfuse score file ({exc})") from exc


# --------------------------------------------------------------------------- result


@dataclass
class FuseResult:
    """Figures (fractions) and the files written."""

    output: Path
    fused_path: Path
    report_md: Path
    report_html: Path
    figures: dict[str, Any]
    optimistic: bool

    def summary(self) -> str:
        f = self.figures
        lines = []
        if self.optimistic:
            lines.append("OPTIMISTIC: weight tuned on the evaluated videos themselves")
        lines.append(
            f"fusion ({f['method']}, weights by {f['weight_selection']}) on "
            f"{f['counts']['videos_fused']} videos ({f['counts']['with_audio']} with audio)"
        )
        vrep = f["counts"]["video"]
        lines.append(f"  video scores read as {vrep['kind']} ({vrep.get('kind_how', '')})")
        for scope in ("all", "with_audio"):
            m = f["metrics"][scope]
            name = "all videos" if scope == "all" else "videos with audio"
            lines.append(f"  {name} (n={m['fused']['n']}):")
            lines.append(f"    {'':<8}{'top-1':>8}{'top-5':>8}{'mean-cls':>9}")
            for model in ("video", "audio", "fused"):
                r = m[model]
                lines.append(
                    f"    {model:<8}{100 * r['top1']:>8.2f}{100 * r['top5']:>8.2f}"
                    f"{100 * r['mean_class']:>9.2f}"
                )
            g = m["gain_top1"]
            lines.append(
                f"    gain top-1 {100 * g[0]:+.2f} points, 95% CI "
                f"[{100 * g[1]:+.2f}, {100 * g[2]:+.2f}]"
            )
        lines.append(f"  chosen: {describe_choice(f['chosen'])}")
        lines.append(f"  report: {self.report_md}")
        return "\n".join(lines)


def describe_choice(chosen: dict[str, Any]) -> str:
    """One line for the chosen weights / temperatures / stacker."""

    def one(p: dict[str, Any]) -> str:
        if "weight" in p:
            txt = f"w={p['weight']:.2f}"
        else:
            txt = f"α={p.get('alpha', math.nan):.2f} β={p.get('beta', math.nan):.2f}"
        if p.get("t_video", 1.0) != 1.0 or p.get("t_audio", 1.0) != 1.0:
            txt += f" (T video {p['t_video']:.2f}, audio {p['t_audio']:.2f})"
        return txt

    if "folds" in chosen:
        return "per fold: " + "; ".join(one(p) for p in chosen["folds"])
    return one(chosen)


def _metrics_block(
    ranks: dict[str, np.ndarray], labels: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    out: dict[str, Any] = {k: rank_metrics(r, labels) for k, r in ranks.items()}
    for k in (1, 5):
        out[f"gain_top{k}"] = paired_bootstrap_ci(
            ranks["fused"] < k, ranks["video"] < k, n_boot, seed
        )
    return out


# --------------------------------------------------------------------------- stage


def fuse(cfg: FuseConfig, executor: Executor | None = None) -> FuseResult:
    """Fuse audio and video scores of one split; write scores, figures and a report.

    ``executor`` is accepted for the common stage signature; fusion is vectorised numpy and
    runs in this process.
    """
    del executor
    work = Path(cfg.work)
    out = Path(cfg.output) if cfg.output else work / "fusion"
    classes = load_classes(work)
    manifest = load_manifest(work, stages=False)
    if not cfg.video_scores:
        raise VideoScoreError("no video score file given (--video-scores)")
    if cfg.video_ids and cfg.annotations:
        raise VideoScoreError("give --video-ids or --annotations, not both")
    if cfg.weight_selection == "heldout" and not (cfg.heldout_audio and cfg.heldout_video):
        raise VideoScoreError("weight_selection=heldout needs --heldout-audio and --heldout-video")
    audio_path = Path(cfg.audio_scores or work / "scores" / "audio_val.npz")
    audio = _load_audio(audio_path)
    split = cfg.split or _infer_split(audio.ids)
    video = read_video_scores(
        cfg.video_scores, cfg.video_format, cfg.video_ids or cfg.annotations, cfg.video_label_map
    )
    ev = _build_views(manifest, split, classes, audio, audio_path, video, cfg, "evaluated")
    del audio, video  # the views hold what is needed; at Kinetics scale these are ~150 MB
    v = ev.views
    weights = np.linspace(0.0, 1.0, max(int(cfg.grid), 2))
    lab = v.labels >= 0
    both = lab & v.has_audio
    if not both.any():
        raise VideoScoreError(f"{audio_path}: no labelled video of split {split!r} has audio")

    # Curves on the evaluated videos: for the plot, and (uncalibrated) for cheap CV selection.
    curve_c, curve_nll = weight_curves(v.lv, v.la, v.labels, weights, cfg.method, rows=both)
    y = v.labels[lab]
    wa = v.has_audio[lab]
    # Single-model ranks first: the default path below overwrites v.lv with fused scores.
    rank_v = _ranks(v.lv, lab, y, np.exp)
    # Audio-only on all videos: a video without audio cannot be recognised from its sound,
    # so it counts as a miss at every k.
    rank_a = np.full(len(y), len(classes), dtype=np.int64)
    rank_a[wa] = _ranks(v.la, both, y[wa], np.exp)  # v.la[both] is v.la[lab][wa]
    chosen: dict[str, Any] = {}
    heldout_curve = None
    fold_of = np.full(len(v.ids), -1, dtype=np.int64)
    if cfg.weight_selection == "optimistic":
        p = fit_params(
            v,
            cfg.method,
            weights,
            cfg.calibrate,
            cfg.stack_l2,
            None if cfg.calibrate else (curve_c, curve_nll),
        )
        fused = apply_params(p, v)
        chosen = p.describe()
    elif cfg.weight_selection == "heldout":
        assert cfg.heldout_audio is not None
        h_audio = _load_audio(Path(cfg.heldout_audio))
        h_video = read_video_scores(
            cfg.heldout_video, cfg.video_format, cfg.heldout_video_ids, cfg.video_label_map
        )
        ho = _build_views(
            manifest, None, classes, h_audio, Path(cfg.heldout_audio), h_video, cfg, "held-out"
        ).views
        overlap = set(ho.ids.tolist()) & set(v.ids.tolist())
        if overlap:
            raise VideoScoreError(
                f"{cfg.heldout_audio}: {len(overlap)} held-out videos are also evaluated "
                f"(e.g. {sorted(overlap)[:3]}); held-out data must be disjoint"
            )
        hb = (ho.labels >= 0) & ho.has_audio
        # Uncalibrated, the curves that choose the weight are the ones plotted: compute them once.
        ho_curves = (
            None
            if cfg.calibrate
            else weight_curves(ho.lv[hb], ho.la[hb], ho.labels[hb], weights, cfg.method)
        )
        p = fit_params(ho, cfg.method, weights, cfg.calibrate, cfg.stack_l2, ho_curves)
        fused = apply_params(p, v)
        chosen = {**p.describe(), "heldout_videos": int(hb.sum())}
        if ho_curves is None:
            ho_curves = weight_curves(
                temper(ho.lv[hb], p.t_video),
                temper(ho.la[hb], p.t_audio),
                ho.labels[hb],
                weights,
                cfg.method,
            )
        heldout_curve = 100 * ho_curves[0].mean(axis=1)
    else:
        if cfg.method != "stack" and not cfg.calibrate and lab.all():
            # Weights come from the precomputed curves and every video is in one test fold:
            # a fold's video log-probabilities are read once, by its own fusion, so its fused
            # scores can take their place (one (N, C) array less at Kinetics scale).
            fused = v.lv
        else:
            fused = np.empty_like(v.lv)
            for lo in range(0, len(fused), _CHUNK):
                np.exp(v.lv[lo : lo + _CHUNK], out=fused[lo : lo + _CHUNK])
        k = max(2, int(cfg.folds))
        fold_of[lab] = stratified_folds(v.labels[lab], k, cfg.seed)
        fold_params = []
        for f in range(k):
            train = lab & (fold_of != f)
            test = fold_of == f
            if cfg.method != "stack" and not cfg.calibrate:
                # The precomputed curves restricted to the training folds: same choice as a
                # refit, without recomputing the fused scores.
                g = pick_weight(curve_c, curve_nll, fold_of[both] != f)
                p = Params(cfg.method, weight=float(weights[g]))
            else:
                p = fit_params(v.subset(train), cfg.method, weights, cfg.calibrate, cfg.stack_l2)
            _apply_rows(p, v, np.flatnonzero(test), fused)
            fold_params.append(p.describe())
        if (~lab).any():  # unlabelled videos: fit on every labelled video (not evaluated)
            p = fit_params(v.subset(lab), cfg.method, weights, cfg.calibrate, cfg.stack_l2)
            fused[~lab] = apply_params(p, v.subset(~lab))
        chosen = {"folds": fold_params}
        if cfg.method != "stack":
            ws = [fp["weight"] for fp in fold_params]
            chosen["weight_median"] = float(np.median(ws))

    optimistic = cfg.weight_selection == "optimistic"
    rank_f = _ranks(fused, lab, y)
    metrics = {
        "all": _metrics_block(
            {"video": rank_v, "audio": rank_a, "fused": rank_f}, y, cfg.bootstrap, cfg.seed
        ),
        "with_audio": _metrics_block(
            {"video": rank_v[wa], "audio": rank_a[wa], "fused": rank_f[wa]},
            y[wa],
            cfg.bootstrap,
            cfg.seed,
        ),
    }
    correct_v = rank_v == 0
    per_v = per_class_accuracy(correct_v, y, len(classes))
    per_f = per_class_accuracy(rank_f == 0, y, len(classes))
    n_per = np.bincount(y, minlength=len(classes))
    curve_all = 100 * (curve_c.sum(axis=1) + correct_v[~wa].sum()) / max(len(y), 1)
    curve_audio = 100 * curve_c.mean(axis=1)
    # Only the fused scores are written from here on: release the (N, C) inputs before the
    # report's figures are drawn (about 150 MB at Kinetics scale).
    v.lv = v.la = np.empty((0, len(classes)), dtype=np.float32)

    figures: dict[str, Any] = {
        "split": split,
        "method": cfg.method,
        "weight_selection": cfg.weight_selection,
        "optimistic": optimistic,
        "calibrate": cfg.calibrate,
        "chosen": chosen,
        "counts": ev.report,
        "metrics": metrics,
        "curve": {
            "weights": weights.tolist(),
            "top1_all": curve_all.tolist(),
            "top1_with_audio": curve_audio.tolist(),
            "heldout_top1": None if heldout_curve is None else heldout_curve.tolist(),
            "method": "logprob" if cfg.method == "stack" else cfg.method,
        },
        "per_class": {
            "classes": classes,
            "n": n_per.tolist(),
            "video_top1": [None if math.isnan(x) else float(x) for x in per_v],
            "fused_top1": [None if math.isnan(x) else float(x) for x in per_f],
        },
    }

    sf = ScoreFile(
        v.ids,
        classes,
        fused,
        v.n_windows,
        np.full(len(v.ids), "ok"),
        {
            "stage": "fuse",
            "method": cfg.method,
            "weight_selection": cfg.weight_selection,
            "optimistic": optimistic,
            "chosen": chosen,
            "audio_scores": str(audio_path),
            "video_scores": [str(p) for p in cfg.video_scores],
            "note": "n_windows = 0 marks videos without audio (their scores are video-only)",
        },
    )
    # All outputs appear together: written into a fresh folder that then replaces ``out``, so
    # a kill never leaves a new fusion.json beside an old report.
    with atomic_dir(out) as tmp:
        fused_name = sf.save(tmp / f"fused_{split}.npz").name
        write_json(tmp / "fusion.json", {"config": to_dict(cfg), **figures})
        save_config(cfg, tmp / "config.toml")
        md, page = write_fusion_report(tmp, figures)
    return FuseResult(out, out / fused_name, out / md.name, out / page.name, figures, optimistic)


_ID_COUNTS = ("matched", "missing", "extra", "duplicates")  # IdMatch.counts() keys


def _ranks(a: np.ndarray, mask: np.ndarray, labels: np.ndarray, fn: Any = None) -> np.ndarray:
    """``true_rank(fn(a[mask]), labels)`` in blocks of rows, without full-size copies."""
    rows = np.flatnonzero(mask)
    out = np.empty(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), _CHUNK):
        r = rows[lo : lo + _CHUNK]
        blk = a[r]
        out[lo : lo + _CHUNK] = true_rank(
            fn(blk) if fn is not None else blk, labels[lo : lo + _CHUNK]
        )
    return out


def write_fusion_report(folder: Path, figures: dict[str, Any]) -> tuple[Path, Path]:
    """Markdown + HTML report with three plots from ``fusion.json``-style ``figures``."""
    from avfuse import report as rp

    folder = Path(folder)
    opt = figures["optimistic"]
    tag = " (OPTIMISTIC)" if opt else ""
    r = rp.Report(f"Audio + video late fusion, split {figures['split']}{tag}")
    if opt:
        r.note(
            "the fusion weight was tuned on the very videos it is evaluated on "
            "(weight_selection=optimistic); these figures overstate what fusion gives on new "
            "videos. Use cross-validation or held-out data for a figure to publish."
        )
    counts = figures["counts"]
    sel = {
        "cv": f"{len(figures['chosen'].get('folds', []))}-fold cross-validation on the evaluated "
        "split: every video is fused with a weight chosen on the other folds",
        "heldout": "held-out videos (disjoint from the evaluated ones)",
        "optimistic": "the evaluated videos themselves (optimistic)",
    }[figures["weight_selection"]]
    r.paragraph(
        f"Method `{figures['method']}`; weights chosen on {sel}. "
        f"{counts['videos_fused']} videos fused, {counts['with_audio']} with audio; the "
        f"{counts['without_audio']} without audio keep their video-only scores and count in "
        "every **all videos** figure."
    )
    r.paragraph(f"Chosen: {describe_choice(figures['chosen'])}.")
    for scope, title in (("all", "All videos"), ("with_audio", "Videos with audio")):
        m = figures["metrics"][scope]
        rows = []
        for model in ("video", "audio", "fused"):
            rows.append(
                {
                    "model": model + (" (optimistic)" if opt and model == "fused" else ""),
                    "top-1 %": 100 * m[model]["top1"],
                    "top-5 %": 100 * m[model]["top5"],
                    "mean class %": 100 * m[model]["mean_class"],
                    "videos": m[model]["n"],
                }
            )
        gains = []
        for k in (1, 5):
            g, lo, hi = m[f"gain_top{k}"]
            gains.append(
                f"top-{k} gain {100 * g:+.2f} points (95% CI {100 * lo:+.2f} to {100 * hi:+.2f})"
            )
        r.heading(title)
        r.table(pd.DataFrame(rows))
        r.paragraph(
            "Fused minus video-only: " + "; ".join(gains) + ". Paired bootstrap over videos."
        )
        if scope == "all" and m["audio"]["n"]:
            r.paragraph("Audio-only on all videos counts a video without audio as a miss.")

    m = figures["metrics"]["all"]
    vals = {
        f"top-{k}": {model: 100 * m[model][f"top{k}"] for model in ("video", "audio", "fused")}
        for k in (1, 5)
    }
    ci = {f"top-{k}": tuple(100 * x for x in m[f"gain_top{k}"]) for k in (1, 5)}
    bars = rp.plot_accuracy_bars(vals, folder / "accuracy.png", ci)  # type: ignore[arg-type]
    r.heading("Accuracy")
    r.image(bars, "video-only, audio-only and fused accuracy, all videos; gain with 95% CI")

    cv = figures["curve"]
    curves = {
        "all videos": np.asarray(cv["top1_all"]),
        "videos with audio": np.asarray(cv["top1_with_audio"]),
    }
    if cv.get("heldout_top1"):
        curves["held-out videos (chose the weight)"] = np.asarray(cv["heldout_top1"])
    ch = figures["chosen"]
    marks = [f["weight"] for f in ch.get("folds", []) if "weight" in f] or (
        [ch["weight"]] if "weight" in ch else []
    )
    png = rp.plot_weight_curve(
        np.asarray(cv["weights"]),
        curves,
        folder / "weight_curve.png",
        marks,
        title=f"top-1 against the audio weight ({cv['method']})",
    )
    r.heading("Accuracy against the audio weight")
    r.paragraph(
        "Curves over the evaluated videos, for diagnosis only: reading the best weight off "
        "them would be tuning on the test videos. Dotted lines: the weight(s) actually used"
        + (" (one per fold)." if ch.get("folds") else ".")
        + (
            " The stacker has no single weight; the curve shows the product of experts."
            if figures["method"] == "stack"
            else ""
        )
    )
    r.image(png, "top-1 accuracy against the audio weight")

    pc = figures["per_class"]
    n = np.asarray(pc["n"])
    present = n > 0
    cls = [c for c, k in zip(pc["classes"], present, strict=True) if k]
    vt = np.asarray([x for x, k in zip(pc["video_top1"], present, strict=True) if k], float)
    ft = np.asarray([x for x, k in zip(pc["fused_top1"], present, strict=True) if k], float)
    gain = 100 * (ft - vt)
    if len(cls):
        png = rp.plot_class_gain(
            cls, gain, folder / "class_gain.png", counts=[int(k) for k in n[present]]
        )
        r.heading("Classes that gain and lose most from audio")
        r.image(png, "per-class top-1 change, fused minus video-only (points)")
        order = np.argsort(-gain, kind="stable")
        pick = list(order[:10]) + [i for i in order[::-1][:10] if i not in order[:10]]
        r.table(
            pd.DataFrame(
                {
                    "class": [cls[i] for i in pick],
                    "videos": [int(n[present][i]) for i in pick],
                    "video top-1 %": [100 * vt[i] for i in pick],
                    "fused top-1 %": [100 * ft[i] for i in pick],
                    "gain": [gain[i] for i in pick],
                }
            )
        )
    r.heading("Alignment")
    r.table(
        pd.DataFrame(
            [
                {"side": side, **{k: counts[side]["ids"][k] for k in _ID_COUNTS}}
                for side in ("video", "audio")
            ]
        )
    )
    v = counts["video"]
    r.paragraph(
        f"Video scores read as `{v['kind']}` from `{v['source']}`; class columns "
        + (
            "matched by name"
            if v["classes"]["by_name"]
            else "**assumed** to be in class-list order (the file does not name them; "
            "give --video-label-map to be sure)"
        )
        + f" ({v['classes']['missing']} missing, {v['classes']['extra']} unknown). "
        f"{counts['not_on_disk_without_video_scores']} videos of the split are not on disk and "
        "have no video scores; they are left out."
    )
    r.paragraph("Full figures: `fusion.json`.")
    return r.write(folder)
