"""``avfuse run``: every stage, from one config, redoing only what a change requires.

The config (:class:`avfuse.runconfig.RunConfig`) and how it resolves into each stage's config
live in :mod:`avfuse.runconfig`; this module decides which stages run, in which order, and
which outputs are stale.

Skipping. After each stage, ``WORK/pipeline.json`` records a key: the hash of the stage's
config (without fields that do not change results: ``progress``, worker counts, schedulers)
chained with the keys of the stages before it, plus, for fusion, the size and time of the
video score files. A stage is skipped when its recorded key equals the current one and its
outputs exist. So a rerun after a crash resumes where it stopped (extract and features are
themselves resumable, training continues from ``last.pt``), and a changed key redoes that stage
and every later one, never the earlier ones. A stage whose own or upstream config changed is
run with ``force`` (extract, features) or from scratch (train). ``force = ["train"]`` (or
``["all"]``) redoes stages regardless. A changed dataset (:mod:`avfuse.fingerprint`) rescans,
and the videos whose files were replaced are redone.

The run ends with ``WORK/report.md`` / ``report.html`` (:mod:`avfuse.run_report`: stage
outcomes, training curves, audio-only metrics and the fusion figures; ``WORK/fusion/report.md``
has the fusion details). :func:`run` returns a :class:`avfuse.run_report.RunResult`; the stages'
summaries and the run's table are its ``summary()``, which the command line prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import avfuse.evaluate
import avfuse.extract
import avfuse.features
import avfuse.fuse
import avfuse.manifest
import avfuse.model_config
import avfuse.run_report
from avfuse.config import to_dict
from avfuse.fingerprint import (
    changed_paths,
    dataset_listing,
    digest,
    file_stamp,
    input_stamp,
    listing_hash,
)
from avfuse.io import error_reason, read_json, read_table, table_metadata, write_json, write_table
from avfuse.lock import work_lock
from avfuse.run_report import RunResult, StageOutcome, by_count, run_result, write_run_report
from avfuse.runconfig import (
    STAGES,
    RunConfig,
    StageConfigs,
    save_run_config,
    stage_configs,
)
from avfuse.store import store_stamp
from avfuse.workdir import WorkDir

log = logging.getLogger(__name__)


# Fields that change how a stage runs, not what it produces: changing them redoes nothing.
_NON_SEMANTIC = {
    "work",
    "progress",
    "num_workers",
    "scheduler",
    "force",
    "resume",
    "checkpoint_every",
}
_NON_SEMANTIC_BY_STAGE = {"extract": {"batch_size"}, "features": {"batch_size"}}

# ---------------------------------------------------------------------------------------------
# Keys: what a stage's output depends on


def _semantic(stage: str, cfg: Any) -> Any:
    drop = _NON_SEMANTIC | _NON_SEMANTIC_BY_STAGE.get(stage, set())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: v for k, v in to_dict(cfg).items() if k not in drop}
    if isinstance(cfg, dict):
        return {k: _semantic(stage, v) for k, v in sorted(cfg.items())}
    return cfg


def stage_keys(sc: StageConfigs) -> dict[str, dict[str, str]]:
    """Per stage: ``key`` (skip when unchanged) and ``config`` (force when it changed).

    ``config`` chains the configs of the stage and the stages before it except scan: a
    rescan with new videos lets extract and features add them incrementally instead of
    recomputing everything.
    """
    train: Any = _semantic("train", sc.train)
    if sc.train.from_embeddings:
        # Embeddings rebuilt with other weights (or resumed, or repaired) are other inputs.
        train = {
            "config": train,
            "embeddings": store_stamp(WorkDir(sc.scan.work).embeddings(sc.train.from_embeddings)),
        }
    if sc.train.init is not None:
        # New weights saved over the same --init path train another model.
        train = {"config": train, "init": input_stamp(sc.train.init)}
    predict: Any = _semantic("predict", sc.predict)
    named = {s: p.checkpoint for s, p in sorted(sc.predict.items())}
    if any(c not in ("best", "last") for c in named.values()):
        # A checkpoint named by path is an input the run does not make: its file is keyed.
        stamps = {s: input_stamp(c) for s, c in named.items() if c not in ("best", "last")}
        predict = {"config": predict, "checkpoints": stamps}
    own: dict[str, Any] = {
        "scan": _semantic("scan", sc.scan),
        "extract": _semantic("extract", sc.extract),
        "features": _semantic("features", sc.features),
        "train": train,
        "predict": predict,
        "evaluate": _semantic("evaluate", sc.evaluate),
        "fuse": None
        if sc.fuse is None
        else {
            "config": _semantic("fuse", sc.fuse),
            # The user's video scores are inputs too: a new file must redo the fusion.
            "files": file_stamp(
                [
                    *sc.fuse.video_scores,
                    *sc.fuse.heldout_video,
                    sc.fuse.video_ids,
                    sc.fuse.annotations,
                    sc.fuse.heldout_video_ids,
                    sc.fuse.video_label_map,
                ]
            ),
        },
        "report": {"version": 1},
    }
    keys: dict[str, dict[str, str]] = {}
    chain_key = ""
    chain_cfg = ""
    for name in STAGES:
        h = digest(own[name])
        chain_key = digest([chain_key, name, h])
        chain_cfg = digest([chain_cfg, name, h]) if name != "scan" else ""
        keys[name] = {"key": chain_key, "config": chain_cfg}
    return keys


@dataclass(frozen=True)
class _StageFiles:
    """What a stage says about its own files; the rules stay in the stage's module."""

    outputs: Callable[[Any], list[Path]]  # the files a finished run leaves
    is_done: Callable[[Any], bool]  # they exist and can be read as they stand
    finished_settings: Callable[[Any], Any]  # settings of the finished run that made them


_FILES: dict[str, _StageFiles] = {
    "scan": _StageFiles(
        avfuse.manifest.outputs, avfuse.manifest.is_done, avfuse.manifest.finished_settings
    ),
    "extract": _StageFiles(
        avfuse.extract.outputs, avfuse.extract.is_done, avfuse.extract.finished_settings
    ),
    "features": _StageFiles(
        avfuse.features.outputs, avfuse.features.is_done, avfuse.features.finished_settings
    ),
    "train": _StageFiles(
        avfuse.model_config.train_outputs,
        avfuse.model_config.train_is_done,
        avfuse.model_config.train_finished_settings,
    ),
    "predict": _StageFiles(
        avfuse.model_config.predict_outputs,
        avfuse.model_config.predict_is_done,
        avfuse.model_config.predict_finished_settings,
    ),
    "evaluate": _StageFiles(
        avfuse.evaluate.outputs, avfuse.evaluate.is_done, avfuse.evaluate.finished_settings
    ),
    "fuse": _StageFiles(avfuse.fuse.outputs, avfuse.fuse.is_done, avfuse.fuse.finished_settings),
    # The run report is rewritten by every run that reaches it: no settings to recognise.
    "report": _StageFiles(
        avfuse.run_report.outputs,
        lambda work: all(p.exists() for p in avfuse.run_report.outputs(work)),
        lambda _: None,
    ),
}


def _configs(name: str, sc: StageConfigs) -> list[Any]:
    """The configs the stage runs with (predict and evaluate: one per split; none for an
    unconfigured fusion; the work folder for the run report)."""
    if name in ("predict", "evaluate"):
        return list(getattr(sc, name).values())
    if name == "fuse":
        return [] if sc.fuse is None else [sc.fuse]
    if name == "report":
        return [Path(sc.scan.work)]
    return [getattr(sc, name)]


def _outputs(name: str, sc: StageConfigs) -> list[Path]:
    return [p for cfg in _configs(name, sc) for p in _FILES[name].outputs(cfg)]


def _outputs_stamp(name: str, sc: StageConfigs) -> str:
    """Sizes and modification times of a stage's outputs, as one digest."""
    return digest(file_stamp(_outputs(name, sc)))


def _is_done(name: str, sc: StageConfigs) -> bool:
    """Whether every output of the stage exists and can be read as it stands (the stage's rule)."""
    return all(_FILES[name].is_done(cfg) for cfg in _configs(name, sc))


# ---------------------------------------------------------------------------------------------
# Running


def _read_state(work: Path) -> tuple[dict[str, Any], str]:
    """(``pipeline.json``'s content, why it was unusable: "" when fine or absent)."""
    path = WorkDir(work).pipeline_state
    if not path.exists():
        return {}, ""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        return {}, error_reason(exc)
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        return {}, "not a JSON object with a 'stages' table"
    return data, ""


def _save_state(work: Path, stages: dict[str, Any], dataset: str | None) -> None:
    """Write ``pipeline.json``: the stage records and the dataset fingerprint (``None``: none)."""
    doc: dict[str, Any] = {"stages": stages}
    if dataset is not None:
        doc["dataset"] = dataset
    write_json(WorkDir(work).pipeline_state, doc)


def _invalidate_replaced(sc: StageConfigs, old: pd.DataFrame, new: pd.DataFrame) -> int:
    """Have extract and features redo the videos whose file was replaced (each stage logs them
    as failed, and retries failed records), so a plain rerun redoes exactly these videos;
    added videos are new to the stages and deleted ones leave the manifest. Returns how many."""
    changed = changed_paths(old, new)
    if not changed:
        return 0
    work = Path(sc.scan.work)
    ids = avfuse.manifest.videos_of_files(work, Path(sc.scan.root), changed)
    if not ids:
        return 0
    why = "the video file changed since it was processed"
    avfuse.extract.invalidate(work, ids, why)
    avfuse.features.invalidate(work, ids, why)
    log.info("%d video file(s) changed since the last run: they are redone", len(ids))
    return len(ids)


# ---------------------------------------------------------------------------------------------
# Recognising finished stages when pipeline.json is lost


def recognise_stage(name: str, sc: StageConfigs) -> bool:
    """Whether ``name``'s outputs are a finished run's, whose saved settings are the ones this
    run would use (what ``pipeline.json`` would have said)."""
    configs = _configs(name, sc)
    if not configs:
        return False
    for want in configs:
        have = _FILES[name].finished_settings(want)
        if have is None:
            return False
        have_s, want_s = _semantic(name, have), _semantic(name, want)
        if isinstance(have_s, dict) and isinstance(want_s, dict):
            # A stage saves what "auto" resolved to (device, amp): "auto" accepts it.
            have_s.update({k: v for k, v in want_s.items() if v == "auto" and k in have_s})
        if digest(have_s) != digest(want_s):
            return False
    return True


def run(cfg: RunConfig, executor: Executor | None = None) -> RunResult:
    """Run scan, extract, features, train, predict, evaluate, fuse and the report.

    Stages whose outputs are complete for the current config are skipped (see the module
    docstring). ``executor`` is handed to the parallel stages (extract, features); when
    ``None`` each builds its own from its ``num_workers`` / ``scheduler``.
    """
    if cfg.stop_after not in STAGES:
        raise ValueError(f"stop_after={cfg.stop_after!r} is not one of {STAGES}")
    unknown = sorted(set(cfg.force) - {*STAGES, "all"})
    if unknown:
        raise ValueError(f"force: unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    sc = stage_configs(cfg)
    work = Path(cfg.work)
    with work_lock(work, create=True):
        return _run_locked(cfg, sc, work, executor)


def _run_locked(
    cfg: RunConfig, sc: StageConfigs, work: Path, executor: Executor | None
) -> RunResult:
    save_run_config(cfg, WorkDir(work).run_settings)
    doc, problem = _read_state(work)
    state: dict[str, Any] = dict(doc.get("stages", {}))
    saved = doc.get("dataset")  # the fingerprint pipeline.json holds, kept by every save
    keys = stage_keys(sc)
    if problem:
        log.warning(
            "%s is unreadable (%s): ignoring it; stages whose outputs match this run's settings "
            "are reused",
            WorkDir(work).pipeline_state,
            problem,
        )
    # Stages without a record (pipeline.json lost or corrupt): outputs that match the settings
    # are as good as recorded, so nothing is retrained for a lost bookkeeping file.
    recognised = False
    for name in STAGES:
        if name in state or not recognise_stage(name, sc):
            break
        state[name] = {**keys[name], "state": "done", "recognised": True}
        recognised = True
    if problem or recognised:
        _save_state(work, state, saved)  # a readable record again, even if every stage is skipped
    listing = dataset_listing(sc.scan.root, (*(sc.scan.annotations or ()), sc.scan.classes))
    fingerprint = listing_hash(listing)
    files = WorkDir(work).dataset_files
    recorded = doc.get("dataset")
    if recorded is None and files.exists():  # pipeline.json lost: the listing remembers
        with contextlib.suppress(Exception):
            recorded = table_metadata(files).get("fingerprint")
    dataset_changed = recorded is not None and recorded != fingerprint
    if dataset_changed:
        log.info("the dataset under %s changed since the last run: rescanning", sc.scan.root)
    outcomes: list[StageOutcome] = []
    last = STAGES.index(cfg.stop_after)
    changed_outside = False

    for i, name in enumerate(STAGES):
        if i > last:
            outcomes.append(StageOutcome(name, "not run", detail=f"stop_after={cfg.stop_after}"))
            continue
        if name == "fuse" and sc.fuse is None:
            outcomes.append(StageOutcome(name, "not configured", detail="no fuse.video_scores"))
            continue
        rec = state.get(name) or {}
        forced = name in cfg.force or "all" in cfg.force or (name == "scan" and dataset_changed)
        same_key = rec.get("key") == keys[name]["key"]
        # The outputs are checked last: features reads its store's index and shard headers,
        # needless for a stage that runs anyway.
        if (
            rec.get("state") == "done"
            and same_key
            and not forced
            and not changed_outside
            and _is_done(name, sc)
        ):
            outcomes.append(StageOutcome(name, "skipped", detail="up to date"))
            if rec.get("outputs") not in (None, _outputs_stamp(name, sc)):
                # Rerun by hand (`avfuse features --force`, a new best.pt): what was made
                # from the old outputs is out of date, though no setting changed.
                log.info("%s's outputs changed since the last run: the stages after it run", name)
                changed_outside = True
            if name == "scan" and recorded != fingerprint:  # first run that fingerprints
                write_table(listing, files, {"fingerprint": fingerprint})
                _save_state(work, state, fingerprint)
                saved = fingerprint
            continue
        # A config change (this stage's or an earlier one's, scan aside) invalidates the
        # old outputs: redo with force. Same config, unfinished: resume where it stopped.
        redo = forced or (bool(rec) and rec.get("config") != keys[name]["config"])
        resume = not redo and rec.get("state") == "running" and same_key
        # Later stages' outputs now depend on outputs about to change.
        for later in STAGES[i + 1 :]:
            if later in state:
                state[later]["state"] = "stale"
        state[name] = {**keys[name], "state": "running"}
        _save_state(work, state, saved)
        t0 = time.perf_counter()
        log.info("stage %s (%s)", name, "redo" if redo else "resume" if resume else "run")
        detail, said = _RUNNERS[name](sc, redo, resume, executor, cfg)
        outcomes.append(
            StageOutcome(
                name, "resumed" if resume else "ran", time.perf_counter() - t0, detail, said
            )
        )
        state[name] = {
            **keys[name],
            "state": "done",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if name == "scan":
            if dataset_changed and files.exists():
                _invalidate_replaced(sc, read_table(files), listing.to_pandas())
            write_table(listing, files, {"fingerprint": fingerprint})
            _save_state(work, state, fingerprint)
            saved = fingerprint
            continue
        _save_state(work, state, saved)

    # What every finished stage's outputs are now, so the next run notices a stage rerun by hand.
    stamped = False
    for name in STAGES:
        rec = state.get(name) or {}
        if rec.get("state") == "done" and rec.get("outputs") != (now := _outputs_stamp(name, sc)):
            rec["outputs"] = now
            stamped = True
    if stamped:  # a run that changed nothing leaves pipeline.json as it was
        _save_state(work, state, saved)
    del listing  # ~70 MB at 420k files: not held while the summary reads the stage tables
    return run_result(work, sc, outcomes)


# Stage runners: (stage configs, redo, resume, executor, run config) -> (one-line detail for the
# run's table, the stage's own summary: what its command would print).
Ran = tuple[str, str]


def _run_scan(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.manifest import scan

    df = scan(sc.scan)
    counts = df["split"].value_counts().sort_index()
    n_warn = len(df.attrs.get("scan_warnings", ()))
    warned = f", {n_warn} warnings in {WorkDir(sc.scan.work).scan_warnings.name}" if n_warn else ""
    return f"{len(df)} videos ({', '.join(f'{k} {v}' for k, v in counts.items())}){warned}", ""


def _run_extract(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.extract import extract

    res = extract(dataclasses.replace(sc.extract, force=sc.extract.force or redo), ex)
    return by_count(res.counts), res.summary()


def _run_features(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.features import compute_features

    res = compute_features(dataclasses.replace(sc.features, force=sc.features.force or redo), ex)
    return by_count(res.counts), res.summary()


def _run_train(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.train import train

    # Resume only an interrupted run of this very config; anything else trains afresh.
    can = resume and avfuse.model_config.train_resumable(sc.train)
    res = train(dataclasses.replace(sc.train, resume=can))
    if res is None:
        return "(not rank 0)", ""
    return f"{res.epochs} epochs; {res.selection_summary()}", res.summary()


def _run_predict(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.manifest import load_manifest
    from avfuse.predict import predict

    have = set(load_manifest(sc.scan.work, stages=False)["split"].astype(str))
    if cfg.heldout_split in sc.predict and cfg.heldout_split not in have:
        raise ValueError(
            f"fuse.weight_selection = 'heldout' needs a split named {cfg.heldout_split!r} "
            f"(set heldout_split), but the dataset has {sorted(have)}; or use "
            "weight_selection = 'cv' (cross-validation on the evaluated split)"
        )
    parts = []
    said = []
    chosen = ""
    for split, predict_cfg in sc.predict.items():
        res = predict(predict_cfg)
        if res is not None:
            said.append(res.summary())
            parts.append(f"{split} {int(res.scores.has_scores.sum())}/{len(res.scores.ids)}")
            chosen = chosen or _choice_text(res.scores.meta.get("model_choice"))
    detail = "scored " + ", ".join(parts) + (f"; {chosen}" if chosen else "")
    return detail, "\n".join(said)


def _choice_text(choice: Any) -> str:
    """``"audio model baseline (heldout top-1: network 71.4%, baseline 72.3%, ...)"``."""
    if not isinstance(choice, dict):
        return ""
    figs = ", ".join(
        f"{name} {100 * f['top1']:.1f}%" for name, f in (choice.get("figures") or {}).items()
    )
    where = f" ({choice.get('selection_split')} top-1: {figs})" if figs else ""
    return f"audio model {choice.get('chosen')}{where}"


def _run_evaluate(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.evaluate import evaluate

    parts = []
    said = []
    for split, ec in sc.evaluate.items():
        res = evaluate(ec)
        said.append(res.summary())
        m, cov = res.metrics, res.coverage
        text = (
            f"{split} scored {cov['scored']}/{cov['videos']}: audio top-1 {m['top1_all']:.1%} "
            f"over all ({m['top1']:.1%} over scored)"
        )
        cands = (m.get("model_choice") or {}).get("candidates") or {}
        if cands:
            text += " by " + next((k for k, c in cands.items() if c["chosen"]), "?") + "; "
            text += ", ".join(f"{k} {c['top1_all']:.1%}" for k, c in cands.items())
        elif (m.get("baseline") or {}).get("top1_all") is not None:
            text += f", baseline {m['baseline']['top1_all']:.1%}"
        parts.append(text)
    return "; ".join(parts), "\n".join(said)


def _run_fuse(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    from avfuse.fuse import fuse

    assert sc.fuse is not None
    res = fuse(sc.fuse, ex)
    m = res.figures["metrics"]["all"]
    return f"fused top-1 {m['fused']['top1']:.1%} (video {m['video']['top1']:.1%})", res.summary()


def _run_report(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> Ran:
    md, _ = write_run_report(sc)
    return str(md), ""


_RUNNERS: dict[str, Callable[[StageConfigs, bool, bool, Executor | None, RunConfig], Ran]] = {
    "scan": _run_scan,
    "extract": _run_extract,
    "features": _run_features,
    "train": _run_train,
    "predict": _run_predict,
    "evaluate": _run_evaluate,
    "fuse": _run_fuse,
    "report": _run_report,
}
