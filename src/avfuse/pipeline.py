"""``avfuse run``: every stage, from one config, redoing only what a change requires.

One :class:`RunConfig` nests the config of every stage (``[scan]``, ``[extract]``,
``[features]``, ``[train]``, ``[predict]``, ``[evaluate]``, ``[fuse]``); ``default_run.toml``
next to this module documents every key. The dataset ``root`` and the work folder ``work`` are
given once, at the top: each stage's own ``work`` (and scan's ``root``) is filled from them, and
setting it inside a section is an error (one run, one work folder).

Splits. ``predict.split`` (default ``val``) is the split the audio model scores and the report
evaluates. With ``fuse.weight_selection = "heldout"`` the fusion weights are chosen on the
``heldout_split`` videos, which the audio model then scores too; with ``"cv"`` (the default)
they come from k-fold cross-validation on the evaluated split. Unset score paths of ``[fuse]``
and ``[evaluate]`` point at the files ``predict`` writes (``WORK/scores/audio_SPLIT.npz``).

Skipping. After each stage, ``WORK/pipeline.json`` records a key: the hash of the stage's
config (without fields that do not change results: ``progress``, worker counts, schedulers)
chained with the keys of the stages before it, plus, for fusion, the size and time of the
video score files. A stage is skipped when its recorded key equals the current one and its
outputs exist. So a rerun after a crash resumes where it stopped (extract and features are
themselves resumable, training continues from ``last.pt``), and a changed key redoes that stage
and every later one, never the earlier ones. A stage whose own or upstream config changed is
run with ``force`` (extract, features) or from scratch (train). ``force = ["train"]`` (or
``["all"]``) redoes stages regardless.

The run ends with ``WORK/report.md`` / ``report.html`` (stage outcomes, training curves,
audio-only metrics and the fusion figures; ``WORK/fusion/report.md`` has the fusion details)
and a console summary table.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import avfuse.evaluate
import avfuse.extract
import avfuse.features
import avfuse.fuse
import avfuse.manifest
import avfuse.model_config
from avfuse.config import Config, allowed_values, dumps, field_types, from_dict, to_dict
from avfuse.evaluate import EvaluateConfig
from avfuse.extract import ExtractConfig
from avfuse.features import FeaturesConfig
from avfuse.fuse import FuseConfig
from avfuse.io import (
    atomic_write,
    error_reason,
    read_json,
    read_table,
    table_metadata,
    terminal_safe,
    write_json,
    write_table,
)
from avfuse.lock import work_lock
from avfuse.manifest import ScanConfig
from avfuse.model_config import PredictConfig, TrainConfig
from avfuse.store import store_stamp
from avfuse.workdir import FusionLayout, ScoreLayout, WorkDir

log = logging.getLogger(__name__)

STAGES = ("scan", "extract", "features", "train", "predict", "evaluate", "fuse", "report")
StageName = Literal["scan", "extract", "features", "train", "predict", "evaluate", "fuse", "report"]
_UNSET = Path(".")
_FILLED_HELP = "filled from the run's top-level value; leave unset"

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


# Sections: the stage configs with ``work`` (and scan's ``root``) optional, filled by the run.
@dataclass(frozen=True)
class ScanSection(ScanConfig):
    root: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})


@dataclass(frozen=True)
class ExtractSection(ExtractConfig):
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})


@dataclass(frozen=True)
class FeaturesSection(FeaturesConfig):
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})


@dataclass(frozen=True)
class TrainSection(TrainConfig):
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})


@dataclass(frozen=True)
class PredictSection(PredictConfig):
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})
    # A run keeps whichever audio model does best where best.pt was chosen: never below the
    # baseline a user could have had for free.
    model_choice: Literal["network", "best", "baseline", "ensemble"] = field(
        default="best",
        metadata={
            "help": next(
                f for f in dataclasses.fields(PredictConfig) if f.name == "model_choice"
            ).metadata["help"]
        },
    )


@dataclass(frozen=True)
class EvaluateSection(EvaluateConfig):
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})


@dataclass(frozen=True)
class FuseSection(FuseConfig):
    work: Path = field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False})


@dataclass(frozen=True)
class RunConfig(Config):
    """Every stage of avfuse from one file: ``avfuse run ROOT -o WORK --config run.toml``."""

    root: Path | None = field(
        default=None,
        metadata={"help": "dataset root holding SPLIT/CLASS/VIDEO files", "positional": True},
    )
    work: Path = field(
        default=Path("work"),
        metadata={"help": "work folder for every output of every stage", "flags": ("-o",)},
    )
    heldout_split: str = field(
        default="heldout",
        metadata={
            "help": "split whose audio and video scores choose the fusion weights when "
            "fuse.weight_selection = 'heldout' (scored by the audio model as well)"
        },
    )
    force: tuple[str, ...] = field(
        default=(),
        metadata={"help": "stages to redo even if complete (e.g. train,fuse; 'all': every one)"},
    )
    stop_after: StageName = field(default="report", metadata={"help": "last stage to run"})
    scheduler: str | None = field(
        default=None,
        metadata={
            "help": "Dask scheduler address (tcp://host:8786) for extract and features, unless "
            "their own section sets one"
        },
    )
    progress: bool = field(
        default=True,
        metadata={"help": "progress bars; false (--no-progress) turns off every stage's"},
    )
    scan: ScanSection = field(default_factory=ScanSection, metadata={"help": "avfuse scan"})
    extract: ExtractSection = field(
        default_factory=ExtractSection, metadata={"help": "avfuse extract"}
    )
    features: FeaturesSection = field(
        default_factory=FeaturesSection, metadata={"help": "avfuse features"}
    )
    train: TrainSection = field(default_factory=TrainSection, metadata={"help": "avfuse train"})
    predict: PredictSection = field(
        default_factory=PredictSection, metadata={"help": "avfuse predict"}
    )
    evaluate: EvaluateSection = field(
        default_factory=EvaluateSection, metadata={"help": "avfuse evaluate"}
    )
    fuse: FuseSection = field(default_factory=FuseSection, metadata={"help": "avfuse fuse"})


# ---------------------------------------------------------------------------------------------
# Stage configs from the run config


def _stage(cls: type[Any], section: Any, name: str, **fill: Any) -> Any:
    """The real stage config: the section's values, with the run-level ones filled in."""
    data = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
    for key, value in fill.items():
        if key in ("work", "root") and data.get(key) not in (None, _UNSET):
            raise ValueError(
                f"[{name}].{key} is set to {data[key]}; set `{key}` once, at the top of the run "
                "config (every stage shares it)"
            )
        data[key] = value
    return cls(**data)


def _audio_scores(work: Path, split: str) -> Path:
    return WorkDir(work).scores(split)


def _metrics_path(ec: EvaluateConfig) -> Path:
    """The metrics file ``evaluate`` writes next to its scores file."""
    return ScoreLayout(ec.scores or "").metrics


def _fusion_dir(fc: FuseConfig) -> FusionLayout:
    return FusionLayout(fc.output or WorkDir(fc.work).fusion)


@dataclass(frozen=True)
class StageConfigs:
    """The resolved per-stage configs of one run (what each stage function receives)."""

    scan: ScanConfig
    extract: ExtractConfig
    features: FeaturesConfig
    train: TrainConfig
    predict: dict[str, PredictConfig]  # split -> config
    evaluate: dict[str, EvaluateConfig]
    fuse: FuseConfig | None  # None: no video scores configured (audio-only run)


def _extract_rate(cfg: RunConfig) -> int:
    """The rate extraction writes: the front end's, so features never resample again."""
    rate = cfg.features.frontend.sample_rate
    default = next(f.default for f in dataclasses.fields(ExtractConfig) if f.name == "sample_rate")
    if cfg.extract.sample_rate not in (default, rate):
        raise ValueError(
            f"[extract].sample_rate = {cfg.extract.sample_rate} but the front end takes {rate} Hz: "
            "set [features.frontend].sample_rate instead (extraction follows it)"
        )
    return rate


def _without_progress(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the progress bars of every section that draws them turned off."""
    off: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "progress"):
            off[f.name] = dataclasses.replace(section, progress=False)  # type: ignore[type-var]
    return dataclasses.replace(cfg, **off)


def stage_configs(cfg: RunConfig) -> StageConfigs:
    """Resolve ``cfg`` into the config each stage function is called with."""
    if not cfg.progress:
        cfg = _without_progress(cfg)
    if cfg.root is None:
        raise ValueError("no dataset root: `avfuse run ROOT -o WORK` (or root = ... in the file)")
    work = Path(cfg.work)
    split = cfg.predict.split
    fz = cfg.fuse
    splits = [split]
    if fz.weight_selection == "heldout":
        splits.append(cfg.heldout_split)
    predict = {}
    evaluate = {}
    for sp in splits:
        out = cfg.predict.output if sp == split and cfg.predict.output else None
        predict[sp] = _stage(
            PredictConfig,
            dataclasses.replace(cfg.predict, split=sp, output=out),
            "predict",
            work=work,
        )
        evaluate[sp] = _stage(
            EvaluateConfig,
            dataclasses.replace(
                cfg.evaluate,
                split=sp,
                scores=Path(predict[sp].output or _audio_scores(work, sp)),
            ),
            "evaluate",
            work=work,
        )
    fuse: FuseConfig | None = None
    if fz.video_scores:
        repl: dict[str, Any] = {
            "audio_scores": fz.audio_scores or predict[split].output or _audio_scores(work, split),
            "split": fz.split or split,
        }
        if fz.weight_selection == "heldout" and fz.heldout_audio is None:
            repl["heldout_audio"] = _audio_scores(work, cfg.heldout_split)
        fuse = _stage(FuseConfig, dataclasses.replace(fz, **repl), "fuse", work=work)
    return StageConfigs(
        # Resolved: the same dataset named from another directory is the same input.
        scan=_stage(ScanConfig, cfg.scan, "scan", root=Path(cfg.root).resolve(), work=work),
        extract=_stage(
            ExtractConfig,
            dataclasses.replace(cfg.extract, scheduler=cfg.extract.scheduler or cfg.scheduler),
            "extract",
            work=work,
            sample_rate=_extract_rate(cfg),
        ),
        features=_stage(
            FeaturesConfig,
            dataclasses.replace(cfg.features, scheduler=cfg.features.scheduler or cfg.scheduler),
            "features",
            work=work,
        ),
        train=_stage(TrainConfig, cfg.train, "train", work=work),
        predict=predict,
        evaluate=evaluate,
        fuse=fuse,
    )


# ---------------------------------------------------------------------------------------------
# Keys: what a stage's output depends on


def _semantic(stage: str, cfg: Any) -> Any:
    drop = _NON_SEMANTIC | _NON_SEMANTIC_BY_STAGE.get(stage, set())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: v for k, v in to_dict(cfg).items() if k not in drop}
    if isinstance(cfg, dict):
        return {k: _semantic(stage, v) for k, v in sorted(cfg.items())}
    return cfg


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _file_stamp(paths: Any) -> list[Any]:
    out = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        st = p.stat() if p.exists() else None
        out.append([str(p), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    return out


def _input_stamp(path: str | Path) -> list[Any]:
    """Size and modification time of an input file, or of every file in an input folder (a
    Hugging Face model folder)."""
    p = Path(path)
    if p.is_dir():
        return _file_stamp(sorted(f for f in p.iterdir() if f.is_file()))
    return _file_stamp([p])


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
        train = {"config": train, "init": _input_stamp(sc.train.init)}
    predict: Any = _semantic("predict", sc.predict)
    named = {s: p.checkpoint for s, p in sorted(sc.predict.items())}
    if any(c not in ("best", "last") for c in named.values()):
        # A checkpoint named by path is an input the run does not make: its file is keyed.
        stamps = {s: _input_stamp(c) for s, c in named.items() if c not in ("best", "last")}
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
            "files": _file_stamp(
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
        h = _digest(own[name])
        chain_key = _digest([chain_key, name, h])
        chain_cfg = _digest([chain_cfg, name, h]) if name != "scan" else ""
        keys[name] = {"key": chain_key, "config": chain_cfg}
    return keys


@dataclass(frozen=True)
class _StageFiles:
    """What a stage says about its own files; the rules stay in the stage's module."""

    outputs: Callable[[Any], list[Path]]  # the files a finished run leaves
    is_done: Callable[[Any], bool]  # they exist and can be read as they stand
    finished_settings: Callable[[Any], Any]  # settings of the finished run that made them


def _report_outputs(work: Path) -> list[Path]:
    return [WorkDir(work).report_md, WorkDir(work).report_html]


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
    # The run report is this module's own: rewritten by every run that reaches it.
    "report": _StageFiles(
        _report_outputs, lambda work: all(p.exists() for p in _report_outputs(work)), lambda _: None
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
    return _digest(_file_stamp(_outputs(name, sc)))


def _is_done(name: str, sc: StageConfigs) -> bool:
    """Whether every output of the stage exists and can be read as it stands (the stage's rule)."""
    return all(_FILES[name].is_done(cfg) for cfg in _configs(name, sc))


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | skipped | resumed | not configured | not run
    seconds: float = 0.0
    detail: str = ""


@dataclass
class RunResult:
    """What :func:`run` did and where the results are."""

    work: Path
    stages: list[StageOutcome]
    report: Path | None
    fusion_report: Path | None
    status_counts: dict[str, dict[str, int]]  # stage column -> status -> count
    accuracy: dict[str, dict[str, float]]  # scope -> model -> top-1
    gain: dict[str, list[float]]  # scope -> [gain, low, high]

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status in ("ran", "resumed")]

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]

    def summary(self) -> str:
        lines = [f"avfuse run -> {self.work}", f"  {'stage':<10}{'status':<16}{'time':>8}  detail"]
        for s in self.stages:
            t = f"{s.seconds:.1f}s" if s.status in ("ran", "resumed") else ""
            lines.append(f"  {s.name:<10}{s.status:<16}{t:>8}  {s.detail}")
        for col, title in (("status", "extract"), ("feature_status", "features")):
            counts = self.status_counts.get(col)
            if counts:
                lines.append(f"  videos by {title} status: {_by_count(counts)}")
        if self.accuracy:
            lines.append(f"  {'top-1 %':<26}{'video':>8}{'audio':>8}{'fused':>8}  gain (95% CI)")
            for scope, acc in self.accuracy.items():
                g = self.gain.get(scope)
                gtxt = f"{100 * g[0]:+.1f} [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]" if g else ""
                lines.append(
                    f"  {scope:<26}"
                    + "".join(
                        f"{100 * acc[m]:>8.1f}" if m in acc else f"{'-':>8}"
                        for m in ("video", "audio", "fused")
                    )
                    + f"  {gtxt}"
                )
        if self.report:
            fusion = ""
            if self.fusion_report:
                fusion = f" (fusion details: {self.fusion_report})"
            elif any(s.name == "fuse" and s.status == "not configured" for s in self.stages):
                fusion = "; fusion: not configured (set fuse.video_scores)"
            lines.append(f"  report: {self.report}{fusion}")
        return "\n".join(lines)


def _by_count(counts: dict[str, int]) -> str:
    """``"ok 40, no_audio 2"``: statuses, most frequent first."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))


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


def _save_state(work: Path, stages: dict[str, Any], dataset: str | None = None) -> None:
    doc: dict[str, Any] = {"stages": stages}
    if dataset is None:  # keep the recorded fingerprint
        dataset = _read_state(work)[0].get("dataset")
    if dataset is not None:
        doc["dataset"] = dataset
    write_json(WorkDir(work).pipeline_state, doc)


# ---------------------------------------------------------------------------------------------
# The dataset fingerprint: noticing added, deleted and replaced videos


def dataset_listing(root: str | Path, extra: Any = ()) -> pa.Table:
    """Every file under ``root``: ``path`` (relative, POSIX), ``size``, ``mtime_ns``, sorted,
    as an Arrow table (a DataFrame of it costs ~60 MB more at 420k files).

    One ``os.scandir`` walk (the entries' ``stat`` is one call per file, none per folder on
    Linux); symlinked folders are followed once each, so a link loop ends. ``extra`` files
    (a Kinetics CSV, a class list) are listed under their absolute path.
    """
    root = Path(root)
    # Three columns, the numbers in typed arrays: a tuple of Python objects per file cost
    # ~200 bytes each, ~90 MB over Kinetics' 420k files.
    paths: list[str] = []
    sizes, mtimes = array.array("q"), array.array("q")

    def add(name: str, size: int, mtime: int) -> None:
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # bytes that are not UTF-8: listed escaped, not fatal
                name = os.fsencode(name).decode("utf-8", "backslashreplace")
        paths.append(name)
        sizes.append(size)
        mtimes.append(mtime)

    seen: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            add(rel + "/", -1, -1)  # unreadable folder: listed, so a fix is noticed
            continue
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir():
                    stack.append((Path(e.path), name))
                    continue
                est = e.stat()
                add(name, int(est.st_size), int(est.st_mtime_ns))
            except OSError:  # dangling link, vanished file
                add(name, -1, -1)
    for f in extra:
        if f is None:
            continue
        try:
            est = Path(f).stat()
            add(str(Path(f).resolve()), int(est.st_size), int(est.st_mtime_ns))
        except OSError:
            add(str(f), -1, -1)
    # Sorted by path (paths are unique, so as the row tuples would sort), in Arrow's C++.
    names = pa.array(paths, pa.string())
    paths.clear()
    order = pc.sort_indices(names)
    return pa.table(
        {
            "path": names.take(order),
            "size": pa.array(np.frombuffer(sizes, np.int64)).take(order),
            "mtime_ns": pa.array(np.frombuffer(mtimes, np.int64)).take(order),
        }
    )


def listing_hash(listing: pa.Table) -> str:
    """sha256 of ``path NUL size NUL mtime_ns LF`` per row, in a block of rows at a time."""
    h = hashlib.sha256()
    cols = [listing.column(c) for c in ("path", "size", "mtime_ns")]
    for lo in range(0, listing.num_rows, 65536):
        rows = zip(*(c.slice(lo, 65536).to_pylist() for c in cols), strict=True)
        block = "".join(f"{path}\0{size}\0{mtime}\n" for path, size, mtime in rows)
        h.update(block.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _changed_paths(old: pd.DataFrame, new: pd.DataFrame) -> set[str]:
    """Paths in both listings whose size or time differ (replaced files)."""
    both = old.merge(new, on="path", suffixes=("_old", "_new"))
    diff = (both["size_old"] != both["size_new"]) | (both["mtime_ns_old"] != both["mtime_ns_new"])
    return set(both.loc[diff, "path"].astype(str))


def _invalidate_replaced(sc: StageConfigs, old: pd.DataFrame, new: pd.DataFrame) -> int:
    """Have extract and features redo the videos whose file was replaced (each stage logs them
    as failed, and retries failed records), so a plain rerun redoes exactly these videos;
    added videos are new to the stages and deleted ones leave the manifest. Returns how many."""
    changed = _changed_paths(old, new)
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
        if _digest(have_s) != _digest(want_s):
            return False
    return True


def save_run_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` as TOML without the sections' filled-in ``work`` / ``root`` keys."""
    data = to_dict(cfg)
    for name in ("scan", "extract", "features", "train", "predict", "evaluate", "fuse"):
        sec = data[name]
        for key in ("work", "root"):
            if key in sec and Path(sec[key]) == _UNSET:
                del sec[key]

    path = Path(path)
    text = dumps(data)
    if path.exists() and path.read_text("utf-8") == text:
        return path  # unchanged: keep the file (and its time) as it was
    with atomic_write(path) as tmp:
        tmp.write_text(text, "utf-8")
    return path


def load_run_config(path: str | Path) -> RunConfig:
    from avfuse.config import read_mapping

    return from_dict(RunConfig, read_mapping(path))


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
        _save_state(work, state)  # a readable record again, even if every stage is skipped
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
        complete = _is_done(name, sc)
        forced = name in cfg.force or "all" in cfg.force or (name == "scan" and dataset_changed)
        same_key = rec.get("key") == keys[name]["key"]
        if (
            rec.get("state") == "done"
            and same_key
            and complete
            and not forced
            and not changed_outside
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
        _save_state(work, state)
        t0 = time.perf_counter()
        log.info("stage %s (%s)", name, "redo" if redo else "resume" if resume else "run")
        detail = _RUNNERS[name](sc, redo, resume, executor, cfg)
        outcomes.append(
            StageOutcome(name, "resumed" if resume else "ran", time.perf_counter() - t0, detail)
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
            continue
        _save_state(work, state)

    # What every finished stage's outputs are now, so the next run notices a stage rerun by hand.
    stamped = False
    for name in STAGES:
        rec = state.get(name) or {}
        if rec.get("state") == "done" and rec.get("outputs") != (now := _outputs_stamp(name, sc)):
            rec["outputs"] = now
            stamped = True
    if stamped:  # a run that changed nothing leaves pipeline.json as it was
        _save_state(work, state)
    del listing  # ~70 MB at 420k files: not held while the summary reads the stage tables
    return _result(work, sc, outcomes)


# Stage runners: (stage configs, redo, resume, executor, run config) -> one-line detail


def _run_scan(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
    from avfuse.manifest import scan

    df = scan(sc.scan)
    counts = df["split"].value_counts().sort_index()
    n_warn = len(df.attrs.get("scan_warnings", ()))
    warned = f", {n_warn} warnings in {WorkDir(sc.scan.work).scan_warnings.name}" if n_warn else ""
    return f"{len(df)} videos ({', '.join(f'{k} {v}' for k, v in counts.items())}){warned}"


def _run_extract(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
    from avfuse.extract import extract

    res = extract(dataclasses.replace(sc.extract, force=sc.extract.force or redo), ex)
    print(terminal_safe(res.summary()))
    return _by_count(res.counts)


def _run_features(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
    from avfuse.features import compute_features

    res = compute_features(dataclasses.replace(sc.features, force=sc.features.force or redo), ex)
    print(terminal_safe(res.summary()))
    return _by_count(res.counts)


def _run_train(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
    from avfuse.train import train

    # Resume only an interrupted run of this very config; anything else trains afresh.
    last = WorkDir(sc.train.work).checkpoint(sc.train.name, "last")
    res = train(dataclasses.replace(sc.train, resume=resume and last.exists()))
    if res is None:
        return "(not rank 0)"
    print(terminal_safe(res.summary()))
    return f"{res.epochs} epochs; {res.selection_summary()}"


def _run_predict(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
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
    chosen = ""
    for split, predict_cfg in sc.predict.items():
        res = predict(predict_cfg)
        if res is not None:
            print(terminal_safe(res.summary()))
            parts.append(f"{split} {int(res.scores.has_scores.sum())}/{len(res.scores.ids)}")
            chosen = chosen or _choice_text(res.scores.meta.get("model_choice"))
    return "scored " + ", ".join(parts) + (f"; {chosen}" if chosen else "")


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
) -> str:
    from avfuse.evaluate import evaluate

    parts = []
    for split, ec in sc.evaluate.items():
        res = evaluate(ec)
        print(terminal_safe(res.summary()))
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
    return "; ".join(parts)


def _run_fuse(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
    from avfuse.fuse import fuse

    assert sc.fuse is not None
    res = fuse(sc.fuse, ex)
    print(terminal_safe(res.summary()))
    m = res.figures["metrics"]["all"]
    return f"fused top-1 {m['fused']['top1']:.1%} (video {m['video']['top1']:.1%})"


def _run_report(
    sc: StageConfigs, redo: bool, resume: bool, ex: Executor | None, cfg: RunConfig
) -> str:
    md, _ = write_run_report(sc)
    return str(md)


_RUNNERS: dict[str, Callable[[StageConfigs, bool, bool, Executor | None, RunConfig], str]] = {
    "scan": _run_scan,
    "extract": _run_extract,
    "features": _run_features,
    "train": _run_train,
    "predict": _run_predict,
    "evaluate": _run_evaluate,
    "fuse": _run_fuse,
    "report": _run_report,
}


# ---------------------------------------------------------------------------------------------
# The run report


# fusion.json's metric scopes and how the reports name them.
_FUSION_SCOPES = (("all", "all videos"), ("with_audio", "videos with audio"))


def _fusion_figures(sc: StageConfigs) -> dict[str, Any] | None:
    if sc.fuse is None:
        return None
    path = _fusion_dir(sc.fuse).figures
    return read_json(path) if path.exists() else None


def write_run_report(sc: StageConfigs) -> tuple[Path, Path]:
    """``WORK/report.md`` + ``.html``: stage outcomes, training curves, audio and fused results."""
    import pandas as pd

    from avfuse import report as rp
    from avfuse.manifest import load_manifest

    work = Path(sc.scan.work)
    wd = WorkDir(work)
    wd.figures.mkdir(parents=True, exist_ok=True)
    r = rp.Report("avfuse run report")
    man = load_manifest(work)
    r.paragraph(
        f"Dataset {rp.code(sc.scan.root)}, work folder {rp.code(work)}: {len(man)} videos, "
        f"{man['label'].nunique()} classes. Settings of this run: `{wd.run_settings.name}`."
    )

    r.heading("Stage outcomes")
    table = rp.status_table(man)
    r.table(table)
    r.image(rp.plot_status_counts(table, wd.status_counts_plot), "videos per stage status")
    bad = man[man.get("status", pd.Series("ok", index=man.index)).astype(str) != "ok"]
    if len(bad) and "reason" in bad:
        r.paragraph("Videos whose sound track could not be used (first 10):")
        r.table(bad[["video_id", "status", "reason"]].head(10))

    metrics = wd.run_metrics(sc.train.name)
    if metrics.exists():
        r.heading("Audio model training")
        chosen = _selection_split(metrics)
        r.paragraph(
            f"Model {rp.code(sc.train.model)}, {sc.train.epochs} epochs; run folder "
            f"{rp.code(wd.run(sc.train.name).relative_to(wd.root).as_posix())} (TensorBoard: "
            f"{rp.code(f'tensorboard --logdir {wd.runs}')}). "
            + (
                f"The epoch kept in `best.pt` was chosen on **{rp.lit(chosen)}**. "
                + _selection_details(metrics)
                if chosen
                else "No selection split: `best.pt` holds the last epoch."
            )
        )
        if chosen and chosen in sc.evaluate:
            r.note(
                f"The model was chosen on {rp.code(chosen)}: its {rp.code(chosen)} figures below are "
                "OPTIMISTIC (measured on the split that picked the epoch)."
            )
        r.image(rp.plot_training_curves(metrics, wd.training_curves_plot), "training curves")

    results = {}
    for split, ec in sc.evaluate.items():
        mp = _metrics_path(ec)
        if mp.exists():
            results[split] = read_json(mp)
    if results:
        r.heading("Audio-only results")
        r.paragraph(
            "Over all videos of the split (a video without a score counts as a miss) and over "
            "the scored ones; mean class accuracy counts a class without a scored video as 0. "
            "The baseline (log-mel statistics, logistic regression, fitted on the videos the "
            "network trained on) is evaluated on the same videos."
        )
        r.table(rp.audio_results_table(results))
        choice = next((m["model_choice"] for m in results.values() if m.get("model_choice")), None)
        if choice:
            r.paragraph(_choice_paragraph(choice))

    fig = _fusion_figures(sc)
    if fig is not None and sc.fuse is not None:
        out = _fusion_dir(sc.fuse)
        r.heading("Audio + video fusion")
        for scope, title in _FUSION_SCOPES:
            m = fig["metrics"][scope]
            g = m["gain_top1"]
            r.paragraph(
                f"**{title}** (n={m['fused']['n']}): top-1 video {100 * m['video']['top1']:.1f} %, "
                f"audio {100 * m['audio']['top1']:.1f} %, fused {100 * m['fused']['top1']:.1f} %; "
                f"gain {100 * g[0]:+.1f} points (95% CI {100 * g[1]:+.1f} to {100 * g[2]:+.1f})."
            )
        for png, cap in (
            (out.accuracy_plot, "video-only, audio-only and fused accuracy with the gain's 95% CI"),
            (out.class_gain_plot, "per-class top-1 change from adding audio"),
            (out.weight_curve_plot, "top-1 against the audio weight"),
        ):
            if png.exists():
                r.image(png, cap)
        if "changed" in fig:
            rp.changed_section(r, fig, out.root, wd.audio_errors_plot)
        r.paragraph(
            f"Details (alignment, chosen weights, classes): {rp.code(_rel(out.report_md, work))}."
        )
    return r.write(wd.report_md, wd.report_html)


def _choice_paragraph(choice: dict[str, Any]) -> str:
    """The audio model kept and why, with its selection-split figures."""
    cands = choice.get("candidates") or {}
    figs = ", ".join(
        f"{name} {100 * c['selection_top1']:.1f} %"
        for name, c in cands.items()
        if c.get("selection_top1") is not None
    )
    from avfuse.report import code, lit

    mode = choice.get("mode")
    text = (
        f"**Audio model kept: {lit(choice.get('chosen'))}** "
        f"({code(f'predict.model_choice = {mode}')}). "
    )
    if figs:
        text += (
            f"Top-1 on {code(choice.get('selection_split'))} ({choice.get('selection_videos')} videos, "
            f"the split that chose `best.pt`, never the evaluated one): {figs}; the ensemble's "
            "figure is cross-validated there. "
        )
    ens = choice.get("ensemble")
    if ens:
        text += (
            f"Ensemble: network weight {ens['weight_network']:.2f}, temperatures "
            f"{ens['temperature_network']:.2f} (network) and {ens['temperature_baseline']:.2f} "
            "(baseline). "
        )
    return text + f"Rule: {lit(choice.get('reason'))}."


def _selection_split(metrics_jsonl: Path) -> str:
    """The split that chose ``best.pt``, from the run's last metrics record (``val`` before
    runs recorded it)."""
    lines = [ln for ln in metrics_jsonl.read_text("utf-8").splitlines() if ln.strip()]
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        return str(rec.get("selection_split", "val"))
    return ""


def _selection_details(metrics_jsonl: Path) -> str:
    """The selection split's size, whether it saturated, the epoch kept and why (train's
    ``selection_n``, ``selection_saturated``, ``best_epoch``, ``best_reason`` records)."""
    recs = []
    for line in metrics_jsonl.read_text("utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            recs.append(json.loads(line))
    last = recs[-1] if recs else {}
    if "best_epoch" not in last:
        return ""  # a run from before these records
    sat = next((r["epoch"] for r in recs if r.get("selection_saturated")), None)
    return (
        f"It has {last['selection_n']} videos and "
        + (f"saturated (top-1 100 %) at epoch {sat}. " if sat else "did not saturate. ")
        + f"`best.pt` holds epoch {last['best_epoch']}: {last['best_reason']}."
    )


def _rel(p: Path, base: Path) -> str:
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


def status_counts(work: str | Path) -> dict[str, dict[str, int]]:
    """Videos of the manifest per extract ``status`` and per ``feature_status``.

    A video without a record counts as ``"not run"``. Reads only the ``video_id`` and status
    columns of each table: joining whole tables costs gigabytes at Kinetics scale.
    """
    wd = WorkDir(work)
    if not wd.manifest.exists():
        return {}
    counts: dict[str, dict[str, int]] = {}
    for path, col in ((wd.extract_table, "status"), (wd.features_table, "feature_status")):
        if not path.exists() or col not in pq.read_schema(path).names:
            continue
        vc = _counts_in_manifest_order(wd.manifest, path, col)
        if vc is None:  # another order or other videos: one look-up per record
            ids = pq.read_table(wd.manifest, columns=["video_id"]).column("video_id")
            t = pq.read_table(path, columns=["video_id", col])
            t = t.filter(pc.is_in(t.column("video_id"), value_set=ids))
            vc = _value_counts(t.column(col))
            unrecorded = len(ids) - len(t)
            if unrecorded:
                vc["not run"] = vc.get("not run", 0) + unrecorded
            del ids, t
        counts[col] = vc
    return counts


def _value_counts(column: Any, into: dict[str, int] | None = None) -> dict[str, int]:
    vc = {} if into is None else into
    status = pc.fill_null(column.cast("string"), "not run")
    for item in pc.value_counts(status).to_pylist():
        vc[str(item["values"])] = vc.get(str(item["values"]), 0) + int(item["counts"])
    return vc


def _counts_in_manifest_order(manifest: Path, table: Path, col: str) -> dict[str, int] | None:
    """Counts of ``col`` if ``table`` holds exactly the manifest's videos in its order (as the
    stages write it), streamed in blocks beside the manifest; ``None`` otherwise."""
    man, tab = pq.ParquetFile(manifest), pq.ParquetFile(table)
    if man.metadata.num_rows != tab.metadata.num_rows:
        return None
    vc: dict[str, int] = {}
    blocks = zip(
        man.iter_batches(batch_size=65536, columns=["video_id"]),
        tab.iter_batches(batch_size=65536, columns=["video_id", col]),
        strict=False,  # the row counts are equal: unequal blocks fail the comparison below
    )
    for a, b in blocks:
        if not a.column(0).equals(b.column(0)):
            return None
        _value_counts(b.column(1), vc)
    return vc


def _result(work: Path, sc: StageConfigs, outcomes: list[StageOutcome]) -> RunResult:
    counts = status_counts(work)
    accuracy: dict[str, dict[str, float]] = {}
    gain: dict[str, list[float]] = {}
    fig = _fusion_figures(sc)
    if fig is not None:
        for scope, title in _FUSION_SCOPES:
            m = fig["metrics"][scope]
            n = m["fused"]["n"]
            key = f"{title} (n={n})"
            accuracy[key] = {k: float(m[k]["top1"]) for k in ("video", "audio", "fused")}
            gain[key] = [float(x) for x in m["gain_top1"]]
    report = WorkDir(work).report_md
    fusion_report = None
    if sc.fuse is not None:
        fusion_report = _fusion_dir(sc.fuse).report_md
    return RunResult(
        work,
        outcomes,
        report if report.exists() else None,
        fusion_report if fusion_report and fusion_report.exists() else None,
        counts,
        accuracy,
        gain,
    )


# ---------------------------------------------------------------------------------------------
# The documented default config file


def default_config_path() -> Path:
    """``default_run.toml`` shipped with the package: every key, its default and its meaning."""
    return Path(__file__).with_name("default_run.toml")


_HEADER = """\
# avfuse run configuration: every key with its default and what it does.
#
#   avfuse run ROOT -o WORK --config this.toml --set train.epochs=10 --set fuse.method=logprob
#
# Any key can be overridden on the command line with --set KEY=VALUE (TOML syntax for the
# value, nested keys with dots). YAML with the same structure works too (--config run.yaml).
# `root` and `work` are given once here (or on the command line); every stage shares them.
# Relative paths are relative to the directory avfuse is started from.
#
# Splits: predict.split is the split the audio model scores and the report evaluates. With
# fuse.weight_selection = "heldout" the `heldout_split` videos are scored too and choose the
# fusion weights; with "cv" the weights come from k-fold cross-validation on predict.split.
# Unset score paths in [evaluate] and [fuse] point at WORK/scores/audio_SPLIT.npz.
# Without fuse.video_scores the run stops after the audio-only evaluation.
#
# Stages are skipped when their outputs exist for the same settings (WORK/pipeline.json);
# changing a key redoes that stage and the ones after it. Keys that only change how a stage
# runs (progress, num_workers, scheduler, batch_size of extract/features) redo nothing.
#
# This file is generated from the config dataclasses (avfuse.pipeline.render_config_toml);
# a test checks that it matches them.
"""


def _comment(text: str, width: int = 98) -> list[str]:
    import textwrap

    return ["# " + line for line in textwrap.wrap(text, width - 2)] or ["#"]


def _toml_value(key: str, value: Any) -> str:
    import tomli_w

    if isinstance(value, dict):  # inline, or it would become a table outside its section
        items = ", ".join(tomli_w.dumps({k: v}).strip() for k, v in value.items())
        return f"{tomli_w.dumps({key: 0}).split('=')[0].strip()} = {{{items}}}"
    return tomli_w.dumps({key: value}).strip()


def _help(f: dataclasses.Field[Any], hints: dict[str, Any]) -> str:
    """A field's help text, with the values a ``Literal`` or registry field allows."""
    help_text = str(f.metadata.get("help", ""))
    values = allowed_values(hints.get(f.name))
    if values:
        help_text += f" (one of: {', '.join(str(a) for a in values)})"
    return help_text


def _render_table(obj: Any, prefix: str, skip: set[str]) -> list[str]:
    hints = field_types(type(obj))
    plain = to_dict(obj)
    lines: list[str] = []
    nested: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        help_text = _help(f, hints)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested.append((f.name, value, help_text))
            continue
        lines += _comment(help_text)
        if value is None:
            lines.append(f"# {f.name} =   (unset by default)")
        else:
            # (a field left out of to_dict at its default is still documented here)
            lines.append(_toml_value(f.name, plain.get(f.name, value)))
    for name, value, help_text in nested:
        lines.append("")
        lines += _comment(help_text)
        lines.append(f"[{prefix}{name}]")
        lines += _render_table(value, f"{prefix}{name}.", set())
    return lines


def render_config_toml(cfg: RunConfig | None = None) -> str:
    """The documented TOML text of ``cfg`` (default: :class:`RunConfig` defaults)."""
    cfg = cfg or RunConfig()
    sections = {f.name for f in dataclasses.fields(cfg) if f.name in STAGES}
    hints = field_types(RunConfig)
    plain = to_dict(cfg)
    lines = [_HEADER]
    for f in dataclasses.fields(cfg):
        if f.name in sections:
            continue
        value = getattr(cfg, f.name)
        lines += _comment(_help(f, hints))
        if value is None and f.name == "root":
            lines.append(f'# {f.name} = "path/to/dataset"   (required here or on the command line)')
        elif value is None:
            lines.append(f"# {f.name} =   (unset by default)")
        else:
            lines.append(_toml_value(f.name, plain[f.name]))
    for f in dataclasses.fields(cfg):
        if f.name not in sections:
            continue
        section = getattr(cfg, f.name)
        doc = (type(section).__mro__[1].__doc__ or "").strip().splitlines()[0]
        lines += ["", "", f"# ---- {f.name}: {doc}", f"[{f.name}]"]
        lines += _render_table(section, f"{f.name}.", {"work", "root"})
    return "\n".join(lines) + "\n"
