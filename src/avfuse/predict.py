"""Per-video audio scores from a trained checkpoint.

``avfuse predict WORK --split val`` writes ``WORK/scores/audio_val.npz`` (a
:class:`avfuse.scores.ScoreFile`, one row per video of the split in the manifest) and the same
table as ``audio_val.csv``. A video is scored from every 96-frame window (hop ``--hop``):

* ``mean_softmax`` (default): mean over windows of the class probabilities;
* ``mean_logits``: softmax of the mean logits;
* ``max``: per class, the largest window probability (rows do not sum to one).

Videos without usable audio keep a row with NaN scores, ``n_windows`` 0 and their status
(``no_audio``, ``silent``, ``too_short``, ``not_in_store`` ...). A video whose scores come out
NaN or infinite (NaN in its features or embeddings) is never ``ok``: its row gets status
``non_finite`` and NaN scores, and a warning names it. A clip shorter than one window
is scored from one window padded per ``short_clips`` (default: the policy the checkpoint was
trained with) and its row has status ``padded``; with ``drop`` it stays unscored (``too_short``). Under ``torchrun`` the videos are split
between ranks (each video exactly once) and rank 0 writes the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avfuse import choice as ch
from avfuse import distributed as D
from avfuse.checkpoint import Checkpoint, load_checkpoint
from avfuse.config import save_config
from avfuse.manifest import SCORED_STATUSES, load_classes, load_manifest
from avfuse.model_config import PredictConfig, predict_scores
from avfuse.models import VGGish
from avfuse.scores import ScoreFile
from avfuse.scoring import (
    input_store,
    model_from_checkpoint,
    resolve_checkpoint,
    score_videos_distributed,
    video_status,
)
from avfuse.workdir import ScoreLayout

log = D.get_logger(__name__)

# Status of a row whose scores came out NaN or infinite (never ``ok``: fusion would spread them).
NON_FINITE = "non_finite"


@dataclass
class PredictResult:
    path: Path
    csv_path: Path
    scores: ScoreFile

    def summary(self) -> str:
        st = self.scores.status
        vals, counts = np.unique(st, return_counts=True)
        by = ", ".join(f"{v} {c}" for v, c in zip(vals, counts))
        n_scored = int(self.scores.has_scores.sum())
        share = n_scored / len(st) if len(st) else float("nan")
        return (
            f"scored {n_scored}/{len(st)} videos of the split ({share:.1%}; "
            f"{int(self.scores.n_windows.sum())} windows; {by}) -> {self.path}"
        )


# --------------------------------------------------------------------------- checkpoints


def predict(cfg: PredictConfig) -> PredictResult | None:
    """Score every video of ``cfg.split``; rank 0 writes the score file and its CSV export.

    Raises :class:`avfuse.store.FrontendMismatchError` if the store's front end differs from
    the checkpoint's. Returns ``None`` on ranks other than 0.
    """
    with D.process_group(D.resolve_device(cfg.device)):
        return _predict(cfg)


def _predict(cfg: PredictConfig) -> PredictResult | None:
    work = Path(cfg.work)
    device = D.resolve_device(cfg.device)
    e = D.init(device)
    ckpt_path = resolve_checkpoint(work, cfg.run, cfg.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    store = input_store(work, ckpt.embeddings)
    window = cfg.window or ckpt.window
    hop = cfg.hop or max(window, 1)
    store.check_frontend(ckpt.frontend_hash, what=f"checkpoint {ckpt_path}")
    try:
        model, norm, classes = model_from_checkpoint(ckpt)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # load_state_dict: Runtime
        raise ValueError(f"{ckpt_path}: {' '.join(str(exc).split())[:300]}") from None
    if isinstance(model, VGGish) and window != ckpt.window:
        raise ValueError(f"VGGish was trained on {ckpt.window}-frame windows and takes only those")
    if classes != load_classes(work):
        raise ValueError(f"{ckpt_path} was trained on a different class list than {work}")
    model.to(device)
    amp_dtype = D.resolve_amp(cfg.amp, device)

    man = load_manifest(work)
    rows = man[man["split"] == cfg.split]
    if rows.empty:
        raise ValueError(f"no videos of split {cfg.split!r} in the manifest")
    short_clips = ckpt.short_clips if cfg.short_clips == "auto" else cfg.short_clips
    # A whole clip must still be as long as the windows the model was trained on (or padded).
    status = video_status(
        rows, store, window if window > 0 else ckpt.window, short_clips=short_clips
    )
    ok_ids = sorted(v for v, s in status.items() if s in SCORED_STATUSES)
    kw = {
        "hop": hop,
        "window": window,
        "batch_size": cfg.batch_size,
        "device": device,
        "amp_dtype": amp_dtype,
        "aggregation": cfg.aggregation,
        "num_workers": cfg.num_workers,
        "short_clips": short_clips,
        "min_frames": ckpt.window,
        "progress": cfg.progress,
    }
    scored = score_videos_distributed(model, store, ok_ids, norm, **kw)
    selection: tuple[list[str], np.ndarray, dict[str, tuple[np.ndarray, int]]] | None = None
    if cfg.model_choice != "network":
        sel = man[man["video_id"].astype(str).isin(set(ckpt.selection_videos))]
        sel_status = video_status(sel, store, max(window, 1), short_clips=short_clips)
        # A boolean array, not a list: an empty list would select columns instead of rows.
        sel = sel[
            np.array([sel_status[str(v)] in SCORED_STATUSES for v in sel["video_id"]], dtype=bool)
        ]
        sel = sel[sel["label_index"] >= 0].sort_values("video_id")
        sel_ids = sel["video_id"].astype(str).tolist()
        todo = [v for v in sel_ids if v not in scored]
        sel_scored = {**score_videos_distributed(model, store, todo, norm, **kw), **scored}
        selection = (sel_ids, sel["label_index"].to_numpy(np.int64), sel_scored)
    if not e.is_main:
        D.barrier()
        return None
    table: dict[str, tuple[np.ndarray | None, int, str]] = {}
    non_finite: list[str] = []
    for vid, st in status.items():
        if st in SCORED_STATUSES:
            s, n = scored[vid]
            if not np.isfinite(s).all():
                non_finite.append(vid)
                table[vid] = (None, n, NON_FINITE)
            else:
                table[vid] = (s, n, st)
        else:
            table[vid] = (None, 0, st)
    if non_finite:
        log.warning(
            "%d video(s) scored NaN or infinite, status %s (e.g. %s): their features or "
            "embeddings in %s hold non-finite values; recompute them with --force",
            len(non_finite),
            NON_FINITE,
            ", ".join(sorted(non_finite)[:5]),
            store.root,
        )
    meta = {
        "producer": "avfuse.predict",
        "checkpoint": str(ckpt_path),
        "run": cfg.run,
        "model": ckpt.model_spec.name,
        "epoch": ckpt.epoch,
        "aggregation": cfg.aggregation,
        "hop": hop,
        "window": window,
        "short_clips": short_clips,
        "split": cfg.split,
        "frontend_hash": ckpt.frontend_hash,
        "amp": D.amp_name(amp_dtype),
    }
    out = predict_scores(cfg)
    if selection is not None:
        table = _choose(cfg, ckpt, man, store, classes, table, selection, meta, out)
    else:  # candidates of an earlier choice would contradict this file
        for name in ch.CANDIDATES:
            ch.candidate_path(out, name).unlink(missing_ok=True)
    sf = ScoreFile.from_rows(classes, table, meta)
    sf.save(out)
    csv_path = sf.to_csv(ScoreLayout(out).csv)
    save_config(cfg, ScoreLayout(out).predict_config)
    D.barrier()
    log.info("wrote %s", out)
    return PredictResult(out, csv_path, sf)


def _choose(
    cfg: PredictConfig,
    ckpt: Checkpoint,
    man: Any,
    store: Any,
    classes: list[str],
    table: dict[str, tuple[np.ndarray | None, int, str]],
    selection: tuple[list[str], np.ndarray, dict[str, tuple[np.ndarray, int]]],
    meta: dict[str, Any],
    out: Path,
) -> dict[str, tuple[np.ndarray | None, int, str]]:
    """Network, baseline and ensemble on the selection videos; the kept candidate's rows
    (``meta["model_choice"]`` records the choice) and every candidate's file beside ``out``."""
    sel_ids, sel_labels, sel_scored = selection
    fitted, info = ch.fit_baseline_for_choice(
        store,
        man,
        ckpt.train_split,
        sel_ids,
        len(classes),
        cfg.baseline_max_train,
    )
    p_net_sel = np.stack([sel_scored[v][0] for v in sel_ids]) if sel_ids else np.zeros((0, 0))
    p_base_sel = fitted.predict_proba(store, sel_ids) if fitted is not None else None
    choice = ch.choose(
        cfg.model_choice,
        ckpt.selection_split,
        sel_labels,
        p_net_sel,
        p_base_sel,
        info,
    )
    log.info("%s", choice.summary())
    meta["model_choice"] = choice.to_meta()
    ids = sorted(v for v, row in table.items() if row[0] is not None)
    p_net = np.zeros((len(ids), len(classes)), dtype=np.float32)
    for i, v in enumerate(ids):
        p_net[i] = table[v][0]
    p_base = fitted.predict_proba(store, ids) if fitted is not None else None
    cands = {
        name: {**table, **{v: (scores[i], table[v][1], table[v][2]) for i, v in enumerate(ids)}}
        for name, scores in ch.candidate_scores(choice, p_net, p_base).items()
    }
    for name, rows in cands.items():
        cand_meta = {**meta, "candidate": name}
        ScoreFile.from_rows(classes, rows, cand_meta).save(ch.candidate_path(out, name))
    meta["audio_model"] = choice.chosen
    return cands[choice.chosen]
