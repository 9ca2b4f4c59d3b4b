"""Which audio model a run keeps: the network, the baseline or their calibrated ensemble.

The choice is made on the selection split only, the videos that chose ``best.pt`` (the
checkpoint records them: the ``heldout`` split, or the carve-out of train), never on the split
that is evaluated afterwards. Three candidates are scored there:

* ``network``: the trained checkpoint's probabilities;
* ``baseline``: :mod:`avfuse.baseline`, fitted on the training videos the network trained on
  (train without the carve-out), so that neither candidate has seen the selection videos;
* ``ensemble``: ``softmax(w * log_softmax(log p_net / T_net) + (1 - w) * log_softmax(log
  p_base / T_base))``, the temperatures and the weight fitted on the selection split by mean
  negative log-likelihood. Its selection figure is cross-validated (fitted on the other folds
  of the selection split, scored on each fold), so its three fitted numbers give it no edge
  over the two candidates that fit nothing there; the parameters kept are fitted on all of it.

Rule (:data:`RULE`): the highest top-1 on the selection split; ties go to the higher mean
log-likelihood of the true class, then to the simpler candidate (network, baseline, ensemble).
Everything is deterministic, so the same run keeps the same candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from avfuse.fusion import fit_temperature, stratified_folds, temper, to_log_probs
from avfuse.metrics import true_rank
from avfuse.workdir import ScoreLayout

CANDIDATES = ("network", "baseline", "ensemble")
Candidate = Literal["network", "baseline", "ensemble"]
ModelChoice = Literal["best", "network", "baseline", "ensemble"]
RULE = (
    "highest top-1 on the selection split; ties: higher mean log-likelihood of the true class, "
    "then the simpler model (network, baseline, ensemble)"
)
WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)  # the network's share in the ensemble
FOLDS = 5


def candidate_path(scores_path: str | Path, name: str) -> Path:
    """Where a candidate's scores sit beside the chosen ones: ``audio_val.npz`` ->
    ``audio_val.baseline.npz``."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown audio model candidate {name!r}")
    return ScoreLayout(scores_path).candidate(name)


@dataclass(frozen=True)
class Ensemble:
    """Fitted ensemble parameters: ``weight`` is the network's share of the log-probabilities."""

    weight: float = 0.5
    t_network: float = 1.0
    t_baseline: float = 1.0

    def apply(self, p_network: np.ndarray, p_baseline: np.ndarray) -> np.ndarray:
        """``(N, C)`` probabilities from the two models' ``(N, C)`` probabilities."""
        ln = temper(_log_probs(p_network), self.t_network)
        lb = temper(_log_probs(p_baseline), self.t_baseline)
        return _softmax(np.float32(self.weight) * ln + np.float32(1.0 - self.weight) * lb)

    def describe(self) -> dict[str, float]:
        return {
            "weight_network": self.weight,
            "temperature_network": self.t_network,
            "temperature_baseline": self.t_baseline,
        }


def _log_probs(p: np.ndarray) -> np.ndarray:
    return to_log_probs(np.asarray(p, dtype=np.float32), "probs")[0]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def mean_log_likelihood(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``log p[true class]`` (floored at 1e-12) of ``(N, C)`` probabilities."""
    if not len(labels):
        return float("nan")
    picked = np.asarray(p, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(np.mean(np.log(np.maximum(picked, 1e-12))))


def top1(p: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (ties to the lower class index, as everywhere in avfuse)."""
    if not len(labels):
        return float("nan")
    return float(np.mean(true_rank(np.asarray(p), np.asarray(labels, dtype=np.int64)) == 0))


def fit_ensemble(p_network: np.ndarray, p_baseline: np.ndarray, labels: np.ndarray) -> Ensemble:
    """Temperatures per model, then the weight on :data:`WEIGHTS`, all by mean NLL."""
    y = np.asarray(labels, dtype=np.int64)
    ln, lb = _log_probs(p_network), _log_probs(p_baseline)
    tn, tb = fit_temperature(ln, y), fit_temperature(lb, y)
    ln, lb = temper(ln, tn), temper(lb, tb)
    best, best_nll = 0.5, np.inf
    for w in WEIGHTS:
        p = _softmax(np.float32(w) * ln + np.float32(1.0 - w) * lb)
        nll = -mean_log_likelihood(p, y)
        if nll < best_nll - 1e-12:  # strict: the first of equal weights, deterministically
            best, best_nll = float(w), nll
    return Ensemble(best, tn, tb)


def cross_validated_ensemble(
    p_network: np.ndarray, p_baseline: np.ndarray, labels: np.ndarray, k: int = FOLDS
) -> np.ndarray:
    """Out-of-fold ensemble probabilities ``(N, C)``: each fold scored by parameters fitted on
    the others (class-stratified folds, seed 0)."""
    y = np.asarray(labels, dtype=np.int64)
    k = max(2, min(k, len(y)))
    folds = stratified_folds(y, k, seed=0)
    out = np.empty(np.shape(p_network), dtype=np.float32)
    for f in range(k):
        test = folds == f
        if not test.any():
            continue
        train = ~test
        ens = fit_ensemble(p_network[train], p_baseline[train], y[train]) if train.any() else None
        out[test] = (ens or Ensemble()).apply(p_network[test], p_baseline[test])
    return out


@dataclass
class Choice:
    """The outcome: the kept candidate, every candidate's selection figures, the parameters."""

    mode: str
    chosen: Candidate
    reason: str
    selection_split: str
    selection_videos: int
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    ensemble: Ensemble | None = None
    baseline: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        """JSON-ready record for the score file's ``meta["model_choice"]``."""
        return {
            "mode": self.mode,
            "chosen": self.chosen,
            "reason": self.reason,
            "rule": RULE,
            "selection_split": self.selection_split,
            "selection_videos": self.selection_videos,
            "figures": self.figures,
            "ensemble": self.ensemble.describe() if self.ensemble else None,
            "ensemble_figure": f"{FOLDS}-fold cross-validated on the selection split",
            "baseline": self.baseline,
        }

    def summary(self) -> str:
        figs = ", ".join(
            f"{name} {100 * f['top1']:.1f}%" for name, f in self.figures.items() if "top1" in f
        )
        where = f" on {self.selection_split} (n={self.selection_videos}: {figs})" if figs else ""
        return f"audio model: {self.chosen}{where}; {self.reason}"


def pick(figures: dict[str, dict[str, float]]) -> Candidate:
    """The candidate :data:`RULE` keeps among those with figures."""
    ranked = sorted(
        (name for name in CANDIDATES if name in figures),
        key=lambda n: (
            -_finite(figures[n]["top1"]),
            -_finite(figures[n]["mean_log_likelihood"]),
            CANDIDATES.index(n),
        ),
    )
    return ranked[0]  # type: ignore[return-value]


def _finite(v: float) -> float:
    return float(v) if np.isfinite(v) else -np.inf


def choose(
    mode: ModelChoice,
    selection_split: str,
    labels: np.ndarray,
    p_network: np.ndarray,
    p_baseline: np.ndarray | None,
    baseline_info: dict[str, Any] | None = None,
) -> Choice:
    """Choose per ``mode`` from the two models' ``(N, C)`` probabilities on the selection
    videos (``labels`` (N,)). ``p_baseline`` is ``None`` when the baseline could not be fitted
    (``baseline_info["skipped"]`` says why): the network is kept."""
    y = np.asarray(labels, dtype=np.int64)
    info = dict(baseline_info or {})
    n = len(y)
    figures: dict[str, dict[str, float]] = {}
    ensemble: Ensemble | None = None
    if n:
        figures["network"] = _figures(p_network, y)
    if p_baseline is not None and n:
        figures["baseline"] = _figures(p_baseline, y)
        if n >= 2:
            figures["ensemble"] = _figures(cross_validated_ensemble(p_network, p_baseline, y), y)
            ensemble = fit_ensemble(p_network, p_baseline, y)
    if mode != "best":
        if mode == "network" or mode in figures or (mode == "baseline" and p_baseline is not None):
            return Choice(
                mode, mode, "set by model_choice", selection_split, n, figures, ensemble, info
            )
        raise ValueError(
            f"model_choice = {mode!r} needs the baseline and a selection split: "
            + (info.get("skipped") or "the checkpoint records no selection videos")
        )
    if not n:
        why = "no selection split (the checkpoint records no selection videos): network kept"
        return Choice(mode, "network", why, selection_split, 0, figures, None, info)
    if p_baseline is None:
        why = f"baseline not available ({info.get('skipped', 'not fitted')}): network kept"
        return Choice(mode, "network", why, selection_split, n, figures, None, info)
    chosen = pick(figures)
    return Choice(mode, chosen, RULE, selection_split, n, figures, ensemble, info)


def fit_baseline_for_choice(
    store: Any,
    manifest: Any,
    train_split: str,
    exclude: Sequence[str],
    n_classes: int,
    max_train: int = 20000,
) -> tuple[Any, dict[str, Any]]:
    """The baseline on the labelled ``train_split`` videos of the store, without ``exclude``
    (the selection videos: a carve-out is part of train). Returns ``(fitted or None, info)``.
    """
    from avfuse import baseline as bl

    info: dict[str, Any] = {"name": bl.NAME, "train_split": train_split}
    skip = set(exclude)
    man = manifest
    tr = man[(man["split"] == train_split) & (man["label_index"] >= 0)]
    ids = tr["video_id"].astype(str)
    keep = ids.isin(set(store.ids)).to_numpy() & ~ids.isin(skip).to_numpy()
    tr = tr[keep].sort_values("video_id")
    if 0 < max_train < len(tr):
        # A few thousand videos pin the statistics down; reading all of Kinetics would not.
        tr = tr.sample(n=max_train, random_state=0).sort_values("video_id")
    try:
        fitted = bl.fit_baseline(
            store, tr["video_id"].astype(str).tolist(), tr["label_index"].to_numpy(), n_classes
        )
    except ValueError as exc:
        return None, {**info, "skipped": str(exc)}
    return fitted, {**info, "train_videos": fitted.train_videos}


def _figures(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"top1": top1(p, y), "mean_log_likelihood": mean_log_likelihood(p, y)}


def candidate_scores(
    choice: Choice, p_network: np.ndarray, p_baseline: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Every available candidate's ``(N, C)`` scores on the evaluated videos."""
    out = {"network": np.asarray(p_network, dtype=np.float32)}
    if p_baseline is not None:
        out["baseline"] = np.asarray(p_baseline, dtype=np.float32)
        if choice.ensemble is not None:
            out["ensemble"] = choice.ensemble.apply(p_network, p_baseline)
    return out


__all__ = [
    "CANDIDATES",
    "RULE",
    "Choice",
    "Ensemble",
    "candidate_path",
    "candidate_scores",
    "choose",
    "cross_validated_ensemble",
    "fit_ensemble",
    "mean_log_likelihood",
    "pick",
    "top1",
]
