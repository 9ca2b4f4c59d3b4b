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

The numerics are in :mod:`avfuse.fusion`; this module joins the inputs, runs them and
writes the outputs.
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

from avfuse.config import Config, finished_run_settings, save_config, to_dict
from avfuse.fusion import (
    LOG_FLOOR,
    METHODS,
    Kind,
    Method,
    Params,
    Views,
    apply_params,
    apply_rows,
    finite_rows,
    fit_params,
    gain_metrics,
    infer_kind,
    log_softmax32,
    masked_true_rank,
    methods_help,
    pick_weight,
    stratified_folds,
    temper,
    to_log_probs,
    video_above_chance,
    weight_curves,
)
from avfuse.io import atomic_dir, check_replaceable, write_json
from avfuse.manifest import load_classes, load_manifest
from avfuse.metrics import ROW_BLOCK, per_class_accuracy
from avfuse.report import describe_choice, write_fusion_report
from avfuse.scores import ScoreFile
from avfuse.video_scores import (
    ClassAlignment,
    Format,
    IdMatch,
    ScoreBounds,
    VideoScoreError,
    VideoScores,
    align_classes,
    check_finite,
    check_labels,
    match_ids,
    normalize_id,
    read_video_scores,
)
from avfuse.workdir import FusionLayout, WorkDir

log = logging.getLogger(__name__)

Selection = Literal["cv", "heldout", "optimistic"]


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
        metadata={"help": methods_help()},
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
    grid: int = field(
        default=21, metadata={"min": 2, "help": "audio weights tried, evenly in [0, 1]"}
    )
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
        default=1.0, metadata={"min": 0, "help": "L2 strength on the stacker's per-class terms"}
    )
    bootstrap: int = field(
        default=2000, metadata={"help": "bootstrap resamples for the CIs", "min": 1}
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "seed for folds and bootstrap"})
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
            "disagree with the manifest",
            "min": 0,
            "max": 1,
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
    audio_links: bool = field(
        default=True,
        metadata={
            "help": "give the report's 'what audio changed' rows a player of a short excerpt "
            "of each sound track (Ogg Opus files in OUTPUT/audio); --no-audio-links for "
            "reports that must not carry audio"
        },
    )
    changed_rows: int = field(
        default=30,
        metadata={
            "help": "videos listed per kind (fixed, broken, changed) in 'what audio changed'",
            "min": 0,
        },
    )
    excerpt_seconds: float = field(
        default=5.0,
        metadata={"help": "length of each audio excerpt in the report", "min": 0.1},
    )
    output: Path | None = field(
        default=None, metadata={"help": "output folder (default WORK/fusion)"}
    )


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
    broken = audio.has_scores & ~finite_rows(pa)
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
    chance = _check_chance(lv, labels, len(classes), video.source, cfg, what)
    hit = rows_a >= 0
    la, has_audio, n_win = _audio_log_probs(audio, pa, rows_a, len(classes))
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


# --------------------------------------------------------------------------- stage


def _output_dir(cfg: FuseConfig) -> Path:
    return Path(cfg.output) if cfg.output else WorkDir(cfg.work).fusion


def outputs(cfg: FuseConfig) -> list[Path]:
    """The files a finished fusion leaves: ``fusion.json`` and the report (written together:
    the folder is replaced as a whole)."""
    files = FusionLayout(_output_dir(cfg))
    return [files.figures, files.report_md]


def is_done(cfg: FuseConfig) -> bool:
    """Whether the outputs are there to be read."""
    return all(p.exists() for p in outputs(cfg))


def finished_settings(cfg: FuseConfig) -> FuseConfig | None:
    """The settings saved with the fusion in place (``None``: none, or unreadable)."""
    path = FusionLayout(_output_dir(cfg)).config
    return finished_run_settings(FuseConfig, path, outputs(cfg))


def fuse(cfg: FuseConfig, executor: Executor | None = None) -> FuseResult:
    """Fuse audio and video scores of one split; write scores, figures and a report.

    ``executor`` is accepted for the common stage signature; fusion is vectorised numpy and
    runs in this process.
    """
    del executor
    work = Path(cfg.work)
    out = _output_dir(cfg)
    check_replaceable(out, FusionLayout.MARKER)  # before any work: a clear refusal, nothing lost
    classes = load_classes(work)
    manifest = load_manifest(work, stages=False)
    _refuse_bad_inputs(cfg)
    audio_path = Path(cfg.audio_scores or WorkDir(work).scores("val"))
    audio = _load_audio(audio_path)
    split = cfg.split or _infer_split(audio.ids)
    video = read_video_scores(
        cfg.video_scores,
        cfg.video_format,
        cfg.video_ids or cfg.annotations,
        cfg.video_label_map,
        ScoreBounds.for_dataset(len(manifest), len(classes)),
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
    rank_v = masked_true_rank(v.lv, lab, y, np.exp)
    # Audio-only on all videos: a video without audio cannot be recognised from its sound,
    # so it counts as a miss at every k.
    rank_a = np.full(len(y), len(classes), dtype=np.int64)
    rank_a[wa] = masked_true_rank(v.la, both, y[wa], np.exp)  # v.la[both] is v.la[lab][wa]
    # Each model's top classes, before the fusion below may overwrite v.lv in place.
    top_v = top_classes(v.lv, np.ones(len(v.ids), bool), exp=True)
    top_a = top_classes(v.la, v.has_audio, exp=True)
    chosen: dict[str, Any] = {}
    heldout_curve = None
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
        fused, chosen, heldout_curve = _fuse_heldout(cfg, manifest, classes, v, weights)
    else:
        fused, chosen = _fuse_cv(cfg, v, weights, (curve_c, curve_nll), lab, both)
    optimistic = cfg.weight_selection == "optimistic"
    rank_f = masked_true_rank(fused, lab, y)
    top_f = top_classes(fused, np.ones(len(v.ids), bool))
    metrics = _scope_metrics({"video": rank_v, "audio": rank_a, "fused": rank_f}, y, wa, cfg)
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
            "method": METHODS.entry(cfg.method).curves,
        },
        "per_class": {
            "classes": classes,
            "n": n_per.tolist(),
            "video_top1": [None if math.isnan(x) else float(x) for x in per_v],
            "fused_top1": [None if math.isnan(x) else float(x) for x in per_f],
        },
    }
    figures["changed"] = changed_videos(
        v.ids, v.labels, classes, top_v, top_a, top_f, v.has_audio, cfg.changed_rows
    )
    figures["audio_errors"] = audio_error_matrix(v.labels, top_a[0][:, 0], v.has_audio, classes)

    return _write_outputs(cfg, out, split, classes, v, fused, chosen, figures, audio_path)


def _fuse_cv(
    cfg: FuseConfig,
    v: Views,
    weights: np.ndarray,
    curves: tuple[np.ndarray, np.ndarray],
    lab: np.ndarray,
    both: np.ndarray,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fused ``(N, C)`` probabilities by k-fold CV, and the chosen parameters per fold.

    ``curves``: :func:`weight_curves` of the rows ``both`` (labelled, with audio); ``lab``
    and ``both`` are ``(N,)`` masks. May overwrite ``v.lv`` with the fused scores.
    """
    curve_c, curve_nll = curves
    weighted = METHODS.entry(cfg.method).weighted
    # Uncalibrated, a weighted method's weight comes from the precomputed curves.
    from_curves = weighted and not cfg.calibrate
    fold_of = np.full(len(v.ids), -1, dtype=np.int64)
    if from_curves and lab.all():
        # Weights come from the precomputed curves and every video is in one test fold:
        # a fold's video log-probabilities are read once, by its own fusion, so its fused
        # scores can take their place (one (N, C) array less at Kinetics scale).
        fused = v.lv
    else:
        fused = np.empty_like(v.lv)
        for lo in range(0, len(fused), ROW_BLOCK):
            np.exp(v.lv[lo : lo + ROW_BLOCK], out=fused[lo : lo + ROW_BLOCK])
    k = max(2, int(cfg.folds))
    fold_of[lab] = stratified_folds(v.labels[lab], k, cfg.seed)
    fold_params = []
    for f in range(k):
        train = lab & (fold_of != f)
        test = fold_of == f
        if from_curves:
            # The precomputed curves restricted to the training folds: same choice as a
            # refit, without recomputing the fused scores.
            g = pick_weight(curve_c, curve_nll, fold_of[both] != f)
            p = Params(cfg.method, weight=float(weights[g]))
        else:
            p = fit_params(v.subset(train), cfg.method, weights, cfg.calibrate, cfg.stack_l2)
        apply_rows(p, v, np.flatnonzero(test), fused)
        fold_params.append(p.describe())
    if (~lab).any():  # unlabelled videos: fit on every labelled video (not evaluated)
        p = fit_params(v.subset(lab), cfg.method, weights, cfg.calibrate, cfg.stack_l2)
        fused[~lab] = apply_params(p, v.subset(~lab))
    chosen: dict[str, Any] = {"folds": fold_params}
    if weighted:
        ws = [fp["weight"] for fp in fold_params]
        chosen["weight_median"] = float(np.median(ws))

    return fused, chosen


def _fuse_heldout(
    cfg: FuseConfig, manifest: pd.DataFrame, classes: list[str], v: Views, weights: np.ndarray
) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Fused ``(N, C)`` probabilities with parameters fitted on the held-out videos, the
    chosen parameters, and the held-out top-1 curve ``(G,)`` in percent."""
    assert cfg.heldout_audio is not None
    h_audio = _load_audio(Path(cfg.heldout_audio))
    h_video = read_video_scores(
        cfg.heldout_video,
        cfg.video_format,
        cfg.heldout_video_ids,
        cfg.video_label_map,
        ScoreBounds.for_dataset(len(manifest), len(classes)),
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
    return fused, chosen, 100 * ho_curves[0].mean(axis=1)


def _check_chance(
    lv: np.ndarray, labels: np.ndarray, n_classes: int, source: str, cfg: FuseConfig, what: str
) -> dict[str, Any]:
    """:func:`video_above_chance` of ``lv`` (N, C); refuses chance-level video scores."""
    chance = video_above_chance(lv, labels, n_classes)
    if chance["testable"] and not chance["above_chance"] and not cfg.allow_low_video_accuracy:
        raise VideoScoreError(
            f"{source}: video top-1 on the {what} videos is {chance['top1']:.1%} "
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
            source,
            chance["n"],
        )
    return chance


def _audio_log_probs(
    audio: ScoreFile, pa: np.ndarray, rows_a: np.ndarray, c: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Audio log-probabilities ``(N, C)`` float32 (NaN rows without audio), ``has_audio``
    ``(N,)`` and ``n_windows`` ``(N,)`` for the N fused videos; ``rows_a`` (N,) are their
    rows in ``audio`` (-1 = none), ``pa`` its scores in class-list order."""
    n = len(rows_a)
    hit = rows_a >= 0
    has_audio = np.zeros(n, dtype=bool)
    has_audio[hit] = audio.has_scores[rows_a[hit]]
    if pa is audio.scores and np.array_equal(rows_a, np.arange(len(audio.ids))):
        # Our own audio file, rows already in manifest order: converted in place (the
        # ScoreFile is consumed), saving a full-size array at Kinetics scale.
        la = pa
        la[~has_audio] = np.nan
    else:
        la = np.full((n, c), np.nan, dtype=np.float32)
    n_win = np.zeros(n, dtype=np.int32)
    if has_audio.any():
        dest = np.flatnonzero(has_audio)
        for lo in range(0, len(dest), ROW_BLOCK):
            d = dest[lo : lo + ROW_BLOCK]
            la[d], _ = to_log_probs(pa[rows_a[d]], "probs")
        n_win[has_audio] = audio.n_windows[rows_a[has_audio]]
    return la, has_audio, n_win


def _write_outputs(
    cfg: FuseConfig,
    out: Path,
    split: str,
    classes: list[str],
    v: Views,
    fused: np.ndarray,
    chosen: dict[str, Any],
    figures: dict[str, Any],
    audio_path: Path,
) -> FuseResult:
    """Write the fused ``(N, C)`` scores, ``fusion.json``, the config and the report."""
    optimistic = cfg.weight_selection == "optimistic"
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
    with atomic_dir(out, FusionLayout.MARKER) as tmp:
        files = FusionLayout(tmp)
        fused_name = sf.save(files.scores(split)).name
        if cfg.audio_links:  # first: fusion.json records each excerpt's file
            _write_excerpts(cfg, tmp, figures["changed"]["rows"])
        write_json(files.figures, {"config": to_dict(cfg), **figures})
        save_config(cfg, files.config)
        md, page = write_fusion_report(tmp, figures)
    return FuseResult(out, out / fused_name, out / md.name, out / page.name, figures, optimistic)


def _refuse_bad_inputs(cfg: FuseConfig) -> None:
    """Refuse option combinations that cannot be fused, before reading anything."""
    if not cfg.video_scores:
        raise VideoScoreError("no video score file given (--video-scores)")
    if cfg.video_ids and cfg.annotations:
        raise VideoScoreError("give --video-ids or --annotations, not both")
    if cfg.weight_selection == "heldout" and not (cfg.heldout_audio and cfg.heldout_video):
        raise VideoScoreError("weight_selection=heldout needs --heldout-audio and --heldout-video")


def _scope_metrics(
    ranks: dict[str, np.ndarray], y: np.ndarray, wa: np.ndarray, cfg: FuseConfig
) -> dict[str, Any]:
    """:func:`gain_metrics` on all labelled videos and on those with audio (``wa``, (N,))."""
    return {
        "all": gain_metrics(ranks, y, cfg.bootstrap, cfg.seed),
        "with_audio": gain_metrics(
            {k: r[wa] for k, r in ranks.items()}, y[wa], cfg.bootstrap, cfg.seed
        ),
    }


# --------------------------------------------------------------------------- what audio changed


def top_classes(
    scores: np.ndarray, rows: np.ndarray, k: int = 3, exp: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, k)`` best class indices (ties to the lower index) and their probabilities of the
    ``(N, C)`` ``scores`` (log-probabilities with ``exp``); rows outside ``rows`` get -1, NaN."""
    n, c = len(scores), scores.shape[1]
    k = min(k, c)
    idx = np.full((n, k), -1, dtype=np.int64)
    val = np.full((n, k), np.nan, dtype=np.float32)
    where = np.flatnonzero(rows)
    for lo in range(0, len(where), ROW_BLOCK):
        r = where[lo : lo + ROW_BLOCK]
        b = np.asarray(scores[r], dtype=np.float32)
        if exp:
            b = np.exp(b)
        order = np.argsort(-b, axis=1, kind="stable")[:, :k]
        idx[r] = order
        val[r] = np.take_along_axis(b, order, axis=1)
    return idx, val


def changed_videos(
    ids: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    top_v: tuple[np.ndarray, np.ndarray],
    top_a: tuple[np.ndarray, np.ndarray],
    top_f: tuple[np.ndarray, np.ndarray],
    has_audio: np.ndarray,
    limit: int,
) -> dict[str, Any]:
    """Labelled videos whose fused top-1 differs from the video model's: counts per kind
    (``fixed``: fused right, video wrong; ``broken``: the reverse; ``changed``: both wrong)
    and up to ``limit`` rows of each, the most confident fused decisions first."""

    def top(t: tuple[np.ndarray, np.ndarray], i: int) -> list[list[Any]] | None:
        if t[0][i, 0] < 0:
            return None
        return [[classes[c], float(p)] for c, p in zip(t[0][i], t[1][i], strict=True)]

    lab = labels >= 0
    pv, pf = top_v[0][:, 0], top_f[0][:, 0]
    diff = lab & (pv != pf)
    kinds = {
        "fixed": diff & (pf == labels),
        "broken": diff & (pv == labels),
        "changed": diff & (pf != labels) & (pv != labels),
    }
    rows = []
    for kind, mask in kinds.items():
        sel = np.flatnonzero(mask)
        # Most confident fused decisions first, then by id: a stable, reproducible order.
        sel = sel[np.lexsort((ids[sel], -top_f[1][sel, 0]))][:limit]
        for i in (int(j) for j in sel):
            rows.append(
                {
                    "video_id": str(ids[i]),
                    "true": classes[int(labels[i])],
                    "kind": kind,
                    "has_audio": bool(has_audio[i]),
                    "video": top(top_v, i),
                    "audio": top(top_a, i),
                    "fused": top(top_f, i),
                }
            )
    return {"counts": {k: int(m.sum()) for k, m in kinds.items()}, "limit": limit, "rows": rows}


def audio_error_matrix(
    labels: np.ndarray,
    audio_pred: np.ndarray,
    has_audio: np.ndarray,
    classes: list[str],
    k: int = 10,
) -> dict[str, Any]:
    """Audio-only errors of the ``k`` true classes with most of them: ``matrix[i][j]`` counts
    videos of ``classes[i]`` the audio model put in ``columns[j]`` (the last column, ``other``,
    collects predictions outside the ``k``)."""
    ok = (labels >= 0) & has_audio
    wrong = ok & (audio_pred != labels)
    errors = np.bincount(labels[wrong], minlength=len(classes))
    top = [int(c) for c in np.argsort(-errors, kind="stable")[:k] if errors[c] > 0]
    pos = {c: j for j, c in enumerate(top)}
    matrix = np.zeros((len(top), len(top) + 1), dtype=np.int64)
    for t, p in zip(labels[wrong], audio_pred[wrong], strict=True):
        if int(t) in pos:
            matrix[pos[int(t)], pos.get(int(p), len(top))] += 1
    return {
        "classes": [classes[c] for c in top],
        "errors": [int(errors[c]) for c in top],
        "videos": [int(((labels == c) & ok).sum()) for c in top],
        "matrix": matrix.tolist(),
    }


def _sound_sources(work: Path, ids: list[str]) -> dict[str, Path]:
    """Where each video's sound can be read: its extracted track inside ``WORK/audio`` if
    there is one, else the video file the manifest names."""
    from avfuse.io import read_table

    wd = WorkDir(work)
    out: dict[str, Path] = {}
    want = set(ids)
    audio_root = wd.audio_dir.resolve()
    if wd.extract_table.exists():
        ext = read_table(wd.extract_table, ["video_id", "audio_path"])
        for vid, rel in zip(ext["video_id"], ext["audio_path"], strict=True):
            if vid in want and isinstance(rel, str) and rel:
                p = (work / rel).resolve()
                # A recorded path is data: it is read only where extraction writes.
                if p.is_relative_to(audio_root) and p.is_file():
                    out[str(vid)] = p
    man = load_manifest(work, stages=False, columns=["video_id", "path"])
    for vid, path in zip(man["video_id"], man["path"], strict=True):
        if vid in want and vid not in out and isinstance(path, str) and path:
            out[str(vid)] = Path(path)
    return out


def _write_excerpts(cfg: FuseConfig, folder: Path, rows: list[dict[str, Any]]) -> None:
    """An Ogg Opus excerpt per listed video with audio, ``folder/audio/changed_NNN.ogg``
    (numbered: names never come from the data); ``row["audio_file"]`` is its relative path."""
    from avfuse.audio import decode_audio
    from avfuse.excerpt import write_excerpt

    sources = _sound_sources(Path(cfg.work), [r["video_id"] for r in rows if r["has_audio"]])
    for i, row in enumerate(rows):
        src = sources.get(row["video_id"]) if row["has_audio"] else None
        if src is None:
            continue
        dec = decode_audio(src, 16000)
        if not len(dec.samples):
            log.warning("%s: no sound to excerpt (%s)", src, dec.reason or dec.status)
            continue
        rel = FusionLayout.excerpt(i)
        write_excerpt(dec.samples, dec.sample_rate, folder / rel, cfg.excerpt_seconds)
        row["audio_file"] = rel
