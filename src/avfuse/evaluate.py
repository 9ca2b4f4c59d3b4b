"""Metrics of a score file against the manifest's labels, joined on ``video_id``.

``avfuse evaluate WORK`` reads ``WORK/scores/audio_val.npz`` (or ``--scores FILE``) and writes
next to it ``audio_val.metrics.json`` and ``audio_val.per_class.csv``.

Accuracy figures are over the videos that have scores; ``top1_over_split`` also counts every
video of the split without scores as a miss (what an audio-only system would achieve on the
whole split). Coverage says how many videos of the split were scored, and why the others were
not (counts per status).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from avfuse.config import Config, save_config
from avfuse.io import atomic_write, write_json
from avfuse.manifest import load_classes, load_manifest
from avfuse.scores import ScoreFile


@dataclass(frozen=True)
class EvaluateConfig(Config):
    """Which score file to evaluate against which split."""

    work: Path = field(metadata={"help": "work folder", "positional": True})
    scores: Path | None = field(
        default=None,
        metadata={"help": "score file (default: WORK/scores/audio_SPLIT.npz)"},
    )
    split: str | None = field(
        default=None,
        metadata={"help": "split to evaluate (default: the split of the scored videos; val)"},
    )
    top_confused: int = field(
        default=20, metadata={"help": "how many most-confused class pairs to list"}
    )


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
    ``(true, predicted, count)``). Rows must be finite; ties in top-k go to the lower index.
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
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN/inf rows; select the scored videos first")
    # Stable sort of the negated scores: equal scores keep column order (lower index first).
    order = np.argsort(-scores, axis=1, kind="stable")
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
    np.add.at(conf, (labels, pred), 1)
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


@dataclass
class EvaluateResult:
    scores_path: Path
    split: str
    metrics: dict[str, Any]
    coverage: dict[str, Any]
    metrics_path: Path
    per_class_path: Path

    def summary(self) -> str:
        m, cov = self.metrics, self.coverage
        return (
            f"{self.scores_path.name} [{self.split}]: top-1 {m['top1']:.2%}, top-5 {m['top5']:.2%}, "
            f"mean class acc {m['mean_class_accuracy']:.2%}, mAP {m['mAP']:.3f} on "
            f"{cov['scored']}/{cov['videos']} videos (coverage {cov['coverage']:.1%}; "
            f"top-1 over the split {m['top1_over_split']:.2%}) -> {self.metrics_path}"
        )


def _default_scores(work: Path, split: str | None) -> Path:
    return work / "scores" / f"audio_{split or 'val'}.npz"


def _sidecar(scores_path: Path, suffix: str) -> Path:
    return scores_path.with_name(scores_path.name.removesuffix(".npz") + suffix)


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score file + manifest labels -> metrics JSON, per-class CSV and confused pairs."""
    work = Path(cfg.work)
    path = Path(cfg.scores) if cfg.scores else _default_scores(work, cfg.split)
    sf = ScoreFile.load(path)
    classes = load_classes(work)
    missing = [c for c in classes if c not in sf.classes]
    if missing:
        raise ValueError(f"{path}: score file lacks classes of {work}/classes.txt: {missing[:5]}")
    # Columns by name: a score file may order (or extend) classes differently.
    col = {c: i for i, c in enumerate(sf.classes)}
    scores = sf.scores[:, [col[c] for c in classes]]

    man = load_manifest(work, stages=False)
    scored_ids = set(sf.ids.tolist())
    split = cfg.split
    if split is None:
        splits = man.loc[man["video_id"].isin(scored_ids), "split"].unique().tolist()
        if len(splits) != 1:
            raise ValueError(f"{path}: scored videos span splits {splits}; pass --split")
        split = str(splits[0])
    universe = man[(man["split"] == split) & (man["label_index"] >= 0)][["video_id", "label_index"]]
    table = pd.DataFrame({"video_id": sf.ids, "status": sf.status, "row": np.arange(len(sf.ids))})
    joined = universe.merge(table, on="video_id", how="left")
    joined["status"] = joined["status"].fillna("absent")
    ok = (joined["status"] == "ok").to_numpy()
    ok_scores = scores[joined.loc[ok, "row"].to_numpy(np.int64)]
    finite = np.isfinite(ok_scores).all(axis=1)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} rows with status ok have NaN scores")
    labels = joined.loc[ok, "label_index"].to_numpy(np.int64)
    m = metrics(ok_scores, labels, top_confused=cfg.top_confused)
    n_split = len(joined)
    m["top1_over_split"] = float(m["top1"] * m["n"] / n_split) if n_split else float("nan")
    m["confused"] = [
        {
            "true": classes[t],
            "predicted": classes[p],
            "count": k,
            "fraction_of_true": k / max(m["per_class"]["n"][t], 1),
        }
        for t, p, k in m["confused"]
    ]
    coverage = {
        "videos": int(n_split),
        "scored": int(ok.sum()),
        "coverage": float(ok.sum() / n_split) if n_split else float("nan"),
        "status_counts": {str(k): int(v) for k, v in joined["status"].value_counts().items()},
    }
    extra = scored_ids - set(universe["video_id"])
    metrics_path = _sidecar(path, ".metrics.json")
    per_class_path = _sidecar(path, ".per_class.csv")
    pc = m.pop("per_class")
    write_json(
        metrics_path,
        {
            "scores": str(path),
            "split": split,
            **m,
            "coverage": coverage,
            "ignored_ids_not_in_split": len(extra),
            "score_meta": sf.meta,
        },
    )
    per_class = pd.DataFrame(
        {
            "class": classes,
            "n": pc["n"],
            "correct": pc["correct"],
            "accuracy": pc["accuracy"],
            "ap": pc["ap"],
        }
    )
    with atomic_write(per_class_path) as tmp:
        per_class.to_csv(tmp, index=False, float_format="%.6g")
    save_config(cfg, _sidecar(path, ".evaluate.toml"))
    m["per_class"] = pc
    return EvaluateResult(path, split, m, coverage, metrics_path, per_class_path)
