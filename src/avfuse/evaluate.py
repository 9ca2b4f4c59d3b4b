"""Metrics of a score file against the manifest's labels, joined on ``video_id``.

``avfuse evaluate WORK`` reads ``WORK/scores/audio_val.npz`` (or ``--scores FILE``) and writes
next to it ``audio_val.metrics.json`` and ``audio_val.per_class.csv``.

Two sets of figures, side by side: over the videos that have scores (``top1``, ``top5``, ...)
and over every labelled video of the split, a video without scores counting as a miss
(``top1_all``, ``top5_all``, ``mean_class_accuracy_all``: what an audio-only system achieves on
the whole split). ``mean_class_accuracy`` averages over every class of the split, a class none
of whose videos was scored counting as 0. Coverage says how many videos of the split were
scored, and why the others were not (counts per status).

With the feature store at hand, a baseline (:mod:`avfuse.baseline`: per-band log-mel mean and
std + logistic regression, fitted on ``baseline_train_split``) is evaluated on the same videos
and reported next to the model (``baseline`` in the metrics JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from avfuse.config import Config, finished_run_settings, save_config
from avfuse.io import error_reason, write_csv, write_json
from avfuse.manifest import SCORED_STATUSES, load_classes, load_manifest
from avfuse.metrics import metrics
from avfuse.scores import ScoreFile
from avfuse.workdir import ScoreLayout, WorkDir


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
        default=20, metadata={"min": 0, "help": "how many most-confused class pairs to list"}
    )
    baseline: bool = field(
        default=True,
        metadata={
            "help": "also fit and evaluate the log-mel statistics + logistic regression baseline"
        },
    )
    baseline_train_split: str = field(
        default="train", metadata={"help": "split the baseline is fitted on"}
    )
    baseline_max_train: int = field(
        default=20000,
        metadata={
            "min": 0,
            "help": "fit the baseline on at most this many training videos (seeded); 0 = all",
        },
    )


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
        lines = [
            f"{self.scores_path.name} [{self.split}]: scored {cov['scored']}/{cov['videos']} "
            f"videos ({cov['coverage']:.1%}; {_counts_text(cov['status_counts'])})",
            f"  {'':<22}{'top-1':>8}{'top-5':>8}{'class':>8}",
            f"  {'all videos':<22}{_pc(m['top1_all'])}{_pc(m['top5_all'])}"
            f"{_pc(m['mean_class_accuracy_all'])}   (unscored = miss)",
            f"  {'scored videos':<22}{_pc(m['top1'])}{_pc(m['top5'])}"
            f"{_pc(m['mean_class_accuracy'])}   mAP {m['mAP']:.3f}",
        ]
        mc = m.get("model_choice") or {}
        for name, c in (mc.get("candidates") or {}).items():
            sel = c.get("selection_top1")
            on_sel = (
                f"{mc.get('selection_split')} top-1 {100 * sel:.1f}%"
                if sel is not None
                else "no selection figure"
            )
            lines.append(
                f"  {name + (' (chosen)' if c['chosen'] else ''):<22}{_pc(c['top1_all'])}"
                f"{_pc(c['top5_all'])}{_pc(c['mean_class_accuracy_all'])}   all videos; "
                f"{on_sel}"
            )
        # With a model choice the baseline is one of the candidates listed above.
        b = {} if mc else m.get("baseline") or {}
        if b.get("top1_all") is not None:
            lines.append(
                f"  {'baseline, all videos':<22}{_pc(b['top1_all'])}{_pc(b['top5_all'])}"
                f"{_pc(b['mean_class_accuracy_all'])}   ({b['name']}, fitted on "
                f"{b['train_videos']} {b['train_split']} videos)"
            )
        elif b.get("skipped"):
            lines.append(f"  baseline: not run ({b['skipped']})")
        lines.append(f"  -> {self.metrics_path}")
        return "\n".join(lines)


def _pc(v: float | None) -> str:
    return f"{'n/a':>8}" if v is None or not np.isfinite(v) else f"{100 * v:>7.1f}%"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: (-x[1], x[0])))


def over_all_videos(
    scores: np.ndarray, labels: np.ndarray, scored: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """Accuracy over every video, an unscored one counting as a miss.

    ``scores`` (N, C) (rows where ``scored`` is False are ignored and may be NaN), ``labels``
    (N,), ``scored`` (N,) bool. Returns ``top1_all``, ``top5_all``, ``mean_class_accuracy_all``
    (over classes with a video), ``mean_class_accuracy`` over the same classes from the scored
    videos only (a class without a scored video counts as 0), and per class ``n_all``,
    ``correct_all``, ``accuracy_all``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    scored = np.asarray(scored, dtype=bool)
    n = len(labels)
    hit1 = np.zeros(n, dtype=bool)
    hit5 = np.zeros(n, dtype=bool)
    if scored.any():
        s = np.asarray(scores, dtype=np.float64)[scored]
        order = np.argsort(-s, axis=1, kind="stable")
        k = min(5, n_classes)
        hit1[scored] = order[:, 0] == labels[scored]
        hit5[scored] = (order[:, :k] == labels[scored][:, None]).any(axis=1)
    n_all = np.bincount(labels, minlength=n_classes)
    correct_all = np.bincount(labels[hit1], minlength=n_classes)
    n_scored = np.bincount(labels[scored], minlength=n_classes)
    present = n_all > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_all = np.where(present, correct_all / np.maximum(n_all, 1), np.nan)
        acc_scored = np.where(n_scored > 0, correct_all / np.maximum(n_scored, 1), 0.0)
    nan = float("nan")
    return {
        "top1_all": float(hit1.mean()) if n else nan,
        "top5_all": float(hit5.mean()) if n else nan,
        "mean_class_accuracy_all": float(acc_all[present].mean()) if present.any() else nan,
        "mean_class_accuracy": float(acc_scored[present].mean()) if present.any() else nan,
        "per_class": {
            "n_all": n_all.tolist(),
            "correct_all": correct_all.tolist(),
            "accuracy_all": acc_all.tolist(),
        },
    }


def _baseline_metrics(
    cfg: EvaluateConfig,
    work: Path,
    man: pd.DataFrame,
    classes: list[str],
    joined: pd.DataFrame,
    ok: np.ndarray,
) -> dict[str, Any]:
    """The baseline fitted on ``cfg.baseline_train_split``, on the videos the model scored."""
    from avfuse import baseline as bl
    from avfuse.store import FeatureStore

    out: dict[str, Any] = {"name": bl.NAME, "train_split": cfg.baseline_train_split}
    try:
        store = FeatureStore(WorkDir(work).store)
    except FileNotFoundError as exc:
        return {**out, "skipped": error_reason(exc)}
    tr = man[(man["split"] == cfg.baseline_train_split) & (man["label_index"] >= 0)]
    tr = tr[tr["video_id"].astype(str).isin(set(store.ids))].sort_values("video_id")
    if 0 < cfg.baseline_max_train < len(tr):
        # A few thousand videos pin 2 x n_mels statistics down; reading all of Kinetics would not.
        tr = tr.sample(n=cfg.baseline_max_train, random_state=0).sort_values("video_id")
    try:
        fitted = bl.fit_baseline(
            store, tr["video_id"].astype(str).tolist(), tr["label_index"].to_numpy(), len(classes)
        )
    except ValueError as exc:
        return {**out, "skipped": error_reason(exc)}
    # The very videos the model scored: the two columns compare like with like.
    usable = ok & joined["video_id"].astype(str).isin(set(store.ids)).to_numpy()
    ids = joined.loc[usable, "video_id"].astype(str).tolist()
    labels = joined["label_index"].to_numpy(np.int64)
    full = np.full((len(joined), len(classes)), np.nan)
    full[usable] = fitted.predict_proba(store, ids)
    sub = metrics(full[usable], labels[usable])
    allv = over_all_videos(full, labels, usable, len(classes))
    return {
        **out,
        "train_videos": fitted.train_videos,
        **_figures(int(usable.sum()), sub, allv),
    }


def _figures(n: int, sub: dict[str, Any], allv: dict[str, Any]) -> dict[str, Any]:
    """The figures every audio model gets: over its ``n`` scored videos and over all of them."""
    keys_all = ("top1_all", "top5_all", "mean_class_accuracy_all", "mean_class_accuracy")
    return {
        "n": n,
        **{k: sub[k] for k in ("top1", "top5", "mAP")},
        **{k: allv[k] for k in keys_all},
    }


def _candidate_metrics(
    path: Path, choice: dict[str, Any], classes: list[str], joined: pd.DataFrame
) -> dict[str, Any]:
    """Every candidate audio model written beside ``path`` (network, baseline, ensemble),
    evaluated on the split's videos and marked chosen or not, with its selection figures."""
    from avfuse.choice import CANDIDATES, candidate_path

    labels = joined["label_index"].to_numpy(np.int64)
    out: dict[str, Any] = {}
    sel_figs = choice.get("figures") or {}
    for name in CANDIDATES:
        cp = candidate_path(path, name)
        if not cp.exists():
            continue
        sf = ScoreFile.load(cp)
        col = {c: i for i, c in enumerate(sf.classes)}
        if any(c not in col for c in classes):
            raise ValueError(f"{cp}: score file lacks classes of the class list")
        pos = sf.index()
        rows = joined["video_id"].map(pos)
        full = np.full((len(joined), len(classes)), np.nan)
        have = np.array(rows.notna(), dtype=bool)
        idx = rows[have].to_numpy(np.int64)
        full[have] = sf.scores[idx][:, [col[c] for c in classes]]
        have[have] = np.isin(sf.status[idx], SCORED_STATUSES)
        have &= np.isfinite(full).all(axis=1)
        sub = metrics(full[have], labels[have])
        allv = over_all_videos(full, labels, have, len(classes))
        out[name] = {
            "chosen": name == choice.get("chosen"),
            **_figures(int(have.sum()), sub, allv),
            "selection_top1": (sel_figs.get(name) or {}).get("top1"),
            "selection_mean_log_likelihood": (sel_figs.get(name) or {}).get("mean_log_likelihood"),
        }
    keep = ("chosen", "mode", "reason", "rule", "selection_split", "selection_videos", "ensemble")
    return {**{k: choice.get(k) for k in keep}, "candidates": out}


def _default_scores(work: Path, split: str | None) -> Path:
    return WorkDir(work).scores(split or "val")


def _scores_path(cfg: EvaluateConfig) -> Path:
    return Path(cfg.scores) if cfg.scores else _default_scores(Path(cfg.work), cfg.split)


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score file + manifest labels -> metrics JSON, per-class CSV and confused pairs."""
    work = Path(cfg.work)
    path = _scores_path(cfg)
    sf = ScoreFile.load(path)
    classes = load_classes(work)
    missing = [c for c in classes if c not in sf.classes]
    if missing:
        raise ValueError(
            f"{path}: score file lacks classes of {WorkDir(work).classes}: {missing[:5]}"
        )
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
    have = sorted(set(man["split"].astype(str)))
    if split not in have:
        raise ValueError(f"no split {split!r} in the manifest; its splits: {', '.join(have)}")
    universe = man[(man["split"] == split) & (man["label_index"] >= 0)][["video_id", "label_index"]]
    table = pd.DataFrame({"video_id": sf.ids, "status": sf.status, "row": np.arange(len(sf.ids))})
    joined = universe.merge(table, on="video_id", how="left")
    joined["status"] = joined["status"].fillna("absent")
    ok = joined["status"].isin(SCORED_STATUSES).to_numpy()
    ok_scores = scores[joined.loc[ok, "row"].to_numpy(np.int64)]
    finite = np.isfinite(ok_scores).all(axis=1)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} rows with status ok have NaN scores")
    labels = joined.loc[ok, "label_index"].to_numpy(np.int64)
    m = metrics(ok_scores, labels, top_confused=cfg.top_confused)
    n_split = len(joined)
    m["top1_over_split"] = float(m["top1"] * m["n"] / n_split) if n_split else float("nan")
    all_labels = joined["label_index"].to_numpy(np.int64)
    full = np.full((n_split, len(classes)), np.nan)
    full[ok] = ok_scores
    allv = over_all_videos(full, all_labels, ok, len(classes))
    m["mean_class_accuracy_scored_classes"] = m["mean_class_accuracy"]
    m["mean_class_accuracy"] = allv["mean_class_accuracy"]
    m.update({k: v for k, v in allv.items() if k not in ("per_class", "mean_class_accuracy")})
    choice = sf.meta.get("model_choice")
    if isinstance(choice, dict):
        m["model_choice"] = _candidate_metrics(path, choice, classes, joined)
        if "baseline" in m["model_choice"]["candidates"]:
            # The choice's baseline (fitted on the videos the network trained on), not a refit.
            m["baseline"] = {
                **(choice.get("baseline") or {}),
                **m["model_choice"]["candidates"]["baseline"],
            }
    if cfg.baseline and "baseline" not in m:
        m["baseline"] = _baseline_metrics(cfg, work, man, classes, joined, ok)
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
    beside = ScoreLayout(path)
    metrics_path, per_class_path = beside.metrics, beside.per_class
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
            "n_all": allv["per_class"]["n_all"],
            "accuracy_all": allv["per_class"]["accuracy_all"],
        }
    )
    write_csv(per_class, per_class_path, float_format="%.6g")
    save_config(cfg, beside.evaluate_config)
    m["per_class"] = pc
    return EvaluateResult(path, split, m, coverage, metrics_path, per_class_path)


# ---------------------------------------------------------------------------------------------
# What the orchestrator asks of this stage: its outputs and whether they are done.


def outputs(cfg: EvaluateConfig) -> list[Path]:
    """The file a finished evaluation leaves: the metrics beside the score file."""
    return [ScoreLayout(_scores_path(cfg)).metrics]


def is_done(cfg: EvaluateConfig) -> bool:
    """Whether the metrics are there to be read."""
    return all(p.exists() for p in outputs(cfg))


def finished_settings(cfg: EvaluateConfig) -> EvaluateConfig | None:
    """The settings that wrote the metrics in place (``None``: none, or unreadable)."""
    path = ScoreLayout(_scores_path(cfg)).evaluate_config
    return finished_run_settings(EvaluateConfig, path, outputs(cfg))
