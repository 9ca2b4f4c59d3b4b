"""Fusion numerics: pure functions over NumPy score arrays.

Scores are ``(N, C)`` arrays (N videos, C classes, class-list order); labels are ``(N,)``
int64 class indices (``-1`` = unlabelled where a function says so). Nothing here reads or
writes files: :mod:`avfuse.fuse` joins the inputs and writes the outputs.

Methods (:data:`METHODS`, the one table of them), with audio weight ``w`` and per-video
log-probabilities ``lv`` (video), ``la`` (audio):

``mean``     ``p = (1 - w) exp(lv) + w exp(la)``
``logprob``  ``p = softmax((1 - w) lv + w la)`` (a weighted product of experts)
``stack``    multinomial logistic regression with logits
             ``z_c = (α + a_c) lv_c + (β + b_c) la_c + d_c``, L2 on the per-class terms.

Accuracy comes from :mod:`avfuse.metrics` (:func:`true_rank` and the functions over ranks),
the one implementation train, evaluate and fuse share; every pass here goes in blocks of
``ROW_BLOCK`` rows so that Kinetics-scale matrices need no full-size temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from scipy import optimize
from scipy.special import bdtrc, log_softmax, logsumexp

from avfuse.metrics import (
    ROW_BLOCK,
    rank_metrics,
    true_rank,
)
from avfuse.registry import OneOf, Registry

Kind = Literal["auto", "logits", "probs"]


# Probabilities are floored here before taking logs: a model that gives a class exactly 0
# must not veto it forever in the product of experts.
LOG_FLOOR = math.log(1e-8)


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
    for lo in range(0, z.shape[0], ROW_BLOCK):
        blk = out[lo : lo + ROW_BLOCK]
        blk[...] = z[lo : lo + ROW_BLOCK]
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
        for lo in range(0, s.shape[0], ROW_BLOCK):
            blk = np.asarray(s[lo : lo + ROW_BLOCK], dtype=np.float64) * scale
            # A hundredth of the last digit: float32 storage of decimals stays within it.
            if not (np.abs(blk - np.rint(blk)) <= 1e-2).all():
                ok = False
                break
        if ok:
            return f"{d} decimals", 0.5 / scale
    for name, dt in (("float16", np.float16), ("float32", np.float32)):
        if s.dtype == dt or all(
            np.array_equal(s[lo : lo + ROW_BLOCK], s[lo : lo + ROW_BLOCK].astype(dt))
            for lo in range(0, s.shape[0], ROW_BLOCK)
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
    for lo in range(0, n, ROW_BLOCK):
        blk = np.asarray(scores[lo : lo + ROW_BLOCK], dtype=np.float64)
        neg[lo : lo + ROW_BLOCK] = (blk < 0).any(axis=1)
        over1[lo : lo + ROW_BLOCK] = (blk > 1 + half).any(axis=1)
        sum1[lo : lo + ROW_BLOCK] = np.abs(blk.sum(axis=1) - 1.0) <= tol
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
    for lo in range(0, s.shape[0], ROW_BLOCK):
        with np.errstate(divide="ignore"):
            lp = np.maximum(np.log(np.asarray(s[lo : lo + ROW_BLOCK], dtype=np.float64)), LOG_FLOOR)
        # Renormalise: a model's probabilities over our class subset need not sum to 1.
        log_softmax32(lp, out[lo : lo + ROW_BLOCK])
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


def fuse_log_probs(lv: np.ndarray, la: np.ndarray, w: float, method: str) -> np.ndarray:
    """Fused probabilities ``(N, C)`` of rows that have both views, for audio weight ``w``.

    ``w = 0`` returns exactly the video probabilities and ``w = 1`` exactly the audio ones.
    """
    if w == 0.0:
        return np.exp(lv)
    if w == 1.0:
        return np.exp(la)
    rule = METHODS.entry(method).fuse
    if rule is None:
        raise ValueError(f"fuse_log_probs: no weight for method {method!r}")
    return rule(lv, la, np.float32(1.0 - w), np.float32(w))


def _mean_rule(lv: np.ndarray, la: np.ndarray, wv: np.float32, wa: np.float32) -> np.ndarray:
    return wv * np.exp(lv) + wa * np.exp(la)  # type: ignore[no-any-return]


def _logprob_rule(lv: np.ndarray, la: np.ndarray, wv: np.float32, wa: np.float32) -> np.ndarray:
    return np.exp(log_softmax32(wv * lv + wa * la))


def weight_curves(
    lv: np.ndarray,
    la: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    method: str,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-video outcome at every weight: ``correct (G, N)`` bool, ``nll (G, N)`` float32.

    Computed once, so choosing a weight on any subset of videos (a fold's complement, say)
    is a masked mean, not a new pass over the scores. Rows are processed in blocks, every
    weight on one block before the next: the temporaries stay a few MB at any N, and each
    row's figures are those of a full-size computation. ``rows`` (a boolean mask) restricts
    the curves to those rows (N = its count) without a full-size copy of ``lv`` and ``la``.
    A learned method has no weight: its curves are those of its ``curves`` method.
    """
    outcomes = METHODS.entry(METHODS.entry(method).curves).outcomes
    if outcomes is None:
        raise ValueError(f"fusion method {method!r} draws no weight curves")
    idx = np.arange(len(labels)) if rows is None else np.flatnonzero(rows)
    correct = np.zeros((len(weights), len(idx)), dtype=bool)
    nll = np.zeros((len(weights), len(idx)), dtype=np.float32)
    for lo in range(0, len(idx), ROW_BLOCK):
        sl = slice(lo, lo + ROW_BLOCK)
        r = idx[sl] if rows is not None else sl
        outcomes(lv[r], la[r], labels[r], weights, correct[:, sl], nll[:, sl])
    return correct, nll


def _prob_outcomes(p: np.ndarray, labels: np.ndarray, correct: np.ndarray, nll: np.ndarray) -> None:
    """Fill one weight's ``correct`` and ``nll`` (N,) from fused probabilities ``p`` (N, C)."""
    correct[:] = true_rank(p, labels) == 0
    nll[:] = -np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-30))


def _mean_outcomes(
    lv: np.ndarray,
    la: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    correct: np.ndarray,
    nll: np.ndarray,
) -> None:
    # Both views' probabilities once for every weight.
    pv, pa = np.exp(lv), np.exp(la)
    for g, w in enumerate(weights):
        _prob_outcomes(np.float32(1 - w) * pv + np.float32(w) * pa, labels, correct[g], nll[g])


def _logprob_outcomes(
    lv: np.ndarray,
    la: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    correct: np.ndarray,
    nll: np.ndarray,
) -> None:
    rows = np.arange(len(labels))
    for g, w in enumerate(weights):
        if 0.0 < w < 1.0:
            # Ranks and NLL straight from the unnormalised log scores: no softmax pass.
            s = np.float32(1 - w) * lv + np.float32(w) * la
            correct[g] = true_rank(s, labels) == 0
            nll[g] = logsumexp(s, axis=1) - s[rows, labels]
        else:
            _prob_outcomes(fuse_log_probs(lv, la, float(w), "logprob"), labels, correct[g], nll[g])


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

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}

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


# --------------------------------------------------------------------------- the methods


class Learned(Protocol):
    """A fusion model fitted on the selection split (:class:`Stacker`)."""

    def predict(self, lv: np.ndarray, la: np.ndarray) -> np.ndarray:
        """Fused probabilities ``(N, C)`` of log-probabilities ``lv``, ``la`` ``(N, C)``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Its fitted figures for the report (JSON-ready)."""
        ...


# (lv, la, 1 - w, w) -> fused probabilities (N, C)
WeightedRule = Callable[[np.ndarray, np.ndarray, np.float32, np.float32], np.ndarray]
# (lv, la, labels, weights, correct (G, N), nll (G, N)) -> None: fills one block's outcomes
Outcomes = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
# (lv, la, labels, l2) -> fitted model
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray, float], Learned]


@dataclass(frozen=True)
class FusionMethod:
    """One entry of :data:`METHODS`.

    A weighted method has ``fuse`` (the rule for one audio weight) and ``outcomes`` (every
    weight's per-video outcome, for choosing the weight); a learned one has ``fit`` instead,
    run on the selection split. ``curves`` names the weighted method whose accuracy-against-
    weight curves are drawn for it (its own name for a weighted method). ``display`` says
    what it is in help text.
    """

    display: str
    curves: str
    fuse: WeightedRule | None = None
    outcomes: Outcomes | None = None
    fit: Fit | None = None

    @property
    def weighted(self) -> bool:
        """Whether it chooses an audio weight (else it fits a model)."""
        return self.fit is None


# The fusion methods: a new one is one entry; the config field, CLI choices and help read it.
METHODS: Registry[FusionMethod] = Registry(
    "fusion method",
    {
        "mean": FusionMethod(
            "weighted average of probabilities", "mean", _mean_rule, _mean_outcomes
        ),
        "logprob": FusionMethod(
            "weighted product of experts", "logprob", _logprob_rule, _logprob_outcomes
        ),
        "stack": FusionMethod("learned logistic regression", "logprob", fit=Stacker.fit),
    },
)
Method = Annotated[str, OneOf(METHODS)]


def methods_help() -> str:
    """``name (display)`` of every method, for help text."""
    items = [f"{name} ({m.display})" for name, m in METHODS.items()]
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else "".join(items)


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
    """What a fit chooses: temperatures, and the audio weight (a weighted method) or the
    fitted model (a learned one)."""

    method: Method
    weight: float = 0.0
    t_video: float = 1.0
    t_audio: float = 1.0
    learned: Learned | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t_video": self.t_video, "t_audio": self.t_audio}
        if self.learned is not None:
            out.update(self.learned.describe())
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
    """Choose temperatures and the weight (or fit the model) on the labelled videos of ``v``.

    ``curves``: precomputed :func:`weight_curves` of ``v``'s labelled videos with audio (only
    valid without calibration, which changes the scores).
    """
    lab = v.labels >= 0
    both = lab & v.has_audio
    tv = fit_temperature(v.lv[lab], v.labels[lab]) if calibrate else 1.0
    ta = fit_temperature(v.la[both], v.labels[both]) if calibrate else 1.0
    fit = METHODS.entry(method).fit
    if fit is not None:
        model = fit(temper(v.lv[both], tv), temper(v.la[both], ta), v.labels[both], l2)
        return Params(method, t_video=tv, t_audio=ta, learned=model)
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
    for lo in range(0, v.lv.shape[0], ROW_BLOCK):
        sl = slice(lo, lo + ROW_BLOCK)
        out[sl] = _apply_block(p, v.lv[sl], v.la[sl], v.has_audio[sl])
    return out


def apply_rows(p: Params, v: Views, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[rows] = apply_params(p, v.subset(rows))`` without full-size copies."""
    for lo in range(0, len(rows), ROW_BLOCK):
        r = rows[lo : lo + ROW_BLOCK]
        out[r] = _apply_block(p, v.lv[r], v.la[r], v.has_audio[r])


def _apply_block(p: Params, lv: np.ndarray, la_all: np.ndarray, m: np.ndarray) -> np.ndarray:
    lv = temper(lv, p.t_video)
    out = np.exp(lv)
    if m.any():
        la = temper(la_all[m], p.t_audio)
        if p.learned is not None:
            out[m] = p.learned.predict(lv[m], la)
        else:
            out[m] = fuse_log_probs(lv[m], la, p.weight, p.method)
    return out


def finite_rows(a: np.ndarray) -> np.ndarray:
    """``(N,)`` True where every value of the row of ``(N, C)`` ``a`` is finite."""
    out = np.empty(a.shape[0], dtype=bool)
    for lo in range(0, a.shape[0], ROW_BLOCK):
        out[lo : lo + ROW_BLOCK] = np.isfinite(a[lo : lo + ROW_BLOCK]).all(axis=1)
    return out


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
    for lo in range(0, n, ROW_BLOCK):
        pred[lo : lo + ROW_BLOCK] = np.argmax(lv[rows[lo : lo + ROW_BLOCK]], axis=1)
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


def gain_metrics(
    ranks: dict[str, np.ndarray], labels: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """:func:`rank_metrics` of each model's ``(N,)`` true-class ranks (keys ``video`` and
    ``fused`` required), plus ``gain_top1`` / ``gain_top5``: fused over video with a paired
    bootstrap CI, ``(gain, low, high)``."""
    out: dict[str, Any] = {k: rank_metrics(r, labels) for k, r in ranks.items()}
    for k in (1, 5):
        out[f"gain_top{k}"] = paired_bootstrap_ci(
            ranks["fused"] < k, ranks["video"] < k, n_boot, seed
        )
    return out


def masked_true_rank(
    a: np.ndarray, mask: np.ndarray, labels: np.ndarray, fn: Any = None
) -> np.ndarray:
    """``true_rank(fn(a[mask]), labels)`` in blocks of rows, without full-size copies.

    ``a`` (N, C), ``mask`` (N,) bool, ``labels`` (M,) for the M masked rows; returns (M,).
    """
    rows = np.flatnonzero(mask)
    out = np.empty(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), ROW_BLOCK):
        r = rows[lo : lo + ROW_BLOCK]
        blk = a[r]
        out[lo : lo + ROW_BLOCK] = true_rank(
            fn(blk) if fn is not None else blk, labels[lo : lo + ROW_BLOCK]
        )
    return out
