"""The ``avfuse run`` config: one file for every stage, and how it resolves into stage configs.

One :class:`RunConfig` nests the config of every stage (``[scan]``, ``[extract]``,
``[features]``, ``[train]``, ``[predict]``, ``[evaluate]``, ``[fuse]``); ``default_run.toml``
next to this module documents every key (:func:`render_config_toml` writes it). The dataset
``root`` and the work folder ``work`` are given once, at the top: each stage's own ``work`` (and
scan's ``root``) is filled from them, and setting it inside a section is an error (one run, one
work folder).

Splits. ``predict.split`` (default ``val``) is the split the audio model scores and the report
evaluates. With ``fuse.weight_selection = "heldout"`` the fusion weights are chosen on the
``heldout_split`` videos, which the audio model then scores too; with ``"cv"`` (the default)
they come from k-fold cross-validation on the evaluated split. Unset score paths of ``[fuse]``
and ``[evaluate]`` point at the files ``predict`` writes (``WORK/scores/audio_SPLIT.npz``).
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from avfuse.config import (
    Config,
    allowed_values,
    dumps,
    field_types,
    from_dict,
    read_mapping,
    to_dict,
)
from avfuse.evaluate import EvaluateConfig
from avfuse.extract import ExtractConfig
from avfuse.features import FeaturesConfig
from avfuse.fuse import FuseConfig
from avfuse.io import atomic_write
from avfuse.manifest import ScanConfig
from avfuse.model_config import PredictConfig, TrainConfig
from avfuse.workdir import FusionLayout, ScoreLayout, WorkDir

# The stages of a run, in the order they run.
StageName = Literal["scan", "extract", "features", "train", "predict", "evaluate", "fuse", "report"]
STAGES: tuple[StageName, ...] = typing.get_args(StageName)
_UNSET = Path(".")
_FILLED_HELP = "filled from the run's top-level value; leave unset"

C = TypeVar("C")


# ---------------------------------------------------------------------------------------------
# Sections: the stage configs with ``work`` (and scan's ``root``) optional, filled by the run


def section(cls: type[C], filled: tuple[str, ...] = ("work",), **defaults: Any) -> type[C]:
    """The ``[stage]`` table of a run config: a frozen subclass of the stage config ``cls``.

    Its ``filled`` fields (paths the run fills from its top-level values) default to unset and
    have no command-line option; ``defaults`` give other fields another default, with the
    stage's help text. Fields keep their place, so a section renders in the stage's order.
    """
    hints = field_types(cls)
    own = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    spec: list[tuple[str, Any, Any]] = [
        (name, Path, field(default=_UNSET, metadata={"help": _FILLED_HELP, "cli": False}))
        for name in filled
    ]
    spec += [
        (name, hints[name], field(default=value, metadata=own[name].metadata))
        for name, value in defaults.items()
    ]
    name = cls.__name__.removesuffix("Config") + "Section"
    made = dataclasses.make_dataclass(name, spec, bases=(cls,), frozen=True)
    made.__module__ = __name__  # where pickle finds it (a module-level name below)
    made.__doc__ = cls.__doc__  # the section's title in the rendered file
    return made


def _table(cls: type[C], stage: str) -> C:
    """The run config's ``[stage]`` field: a ``cls`` section, built from its defaults."""
    factory: Callable[[], C] = cls  # every field of a section has a default
    return field(default_factory=factory, metadata={"help": f"avfuse {stage}"})


if typing.TYPE_CHECKING:  # a section has its stage config's fields, and so its type
    ScanSection = ScanConfig
    ExtractSection = ExtractConfig
    FeaturesSection = FeaturesConfig
    TrainSection = TrainConfig
    PredictSection = PredictConfig
    EvaluateSection = EvaluateConfig
    FuseSection = FuseConfig
else:
    ScanSection = section(ScanConfig, ("root", "work"))
    ExtractSection = section(ExtractConfig)
    FeaturesSection = section(FeaturesConfig)
    TrainSection = section(TrainConfig)
    # A run keeps whichever audio model does best where best.pt was chosen: never below the
    # baseline a user could have had for free.
    PredictSection = section(PredictConfig, model_choice="best")
    EvaluateSection = section(EvaluateConfig)
    FuseSection = section(FuseConfig)


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
    scan: ScanSection = _table(ScanSection, "scan")
    extract: ExtractSection = _table(ExtractSection, "extract")
    features: FeaturesSection = _table(FeaturesSection, "features")
    train: TrainSection = _table(TrainSection, "train")
    predict: PredictSection = _table(PredictSection, "predict")
    evaluate: EvaluateSection = _table(EvaluateSection, "evaluate")
    fuse: FuseSection = _table(FuseSection, "fuse")


# ---------------------------------------------------------------------------------------------
# Stage configs from the run config


def _stage(cls: type[Any], values: Any, name: str, **fill: Any) -> Any:
    """The real stage config: the section's ``values``, with the run-level ones filled in."""
    data = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls)}
    for key, value in fill.items():
        if key in ("work", "root") and data.get(key) not in (None, _UNSET):
            raise ValueError(
                f"[{name}].{key} is set to {data[key]}; set `{key}` once, at the top of the run "
                "config (every stage shares it)"
            )
        data[key] = value
    return cls(**data)


def audio_scores_path(work: Path, split: str) -> Path:
    """The scores file ``predict`` writes for ``split`` unless its ``output`` is set."""
    return WorkDir(work).scores(split)


def metrics_path(ec: EvaluateConfig) -> Path:
    """The metrics file ``evaluate`` writes next to its scores file."""
    return ScoreLayout(ec.scores or "").metrics


def fusion_dir(fc: FuseConfig) -> FusionLayout:
    """The folder ``fuse`` writes into."""
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
                scores=Path(predict[sp].output or audio_scores_path(work, sp)),
            ),
            "evaluate",
            work=work,
        )
    fuse: FuseConfig | None = None
    if fz.video_scores:
        repl: dict[str, Any] = {
            "audio_scores": fz.audio_scores
            or predict[split].output
            or audio_scores_path(work, split),
            "split": fz.split or split,
        }
        if fz.weight_selection == "heldout" and fz.heldout_audio is None:
            repl["heldout_audio"] = audio_scores_path(work, cfg.heldout_split)
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
    return from_dict(RunConfig, read_mapping(path))


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
# This file is generated from the config dataclasses (avfuse.runconfig.render_config_toml);
# a test checks that it matches them.
"""


def _comment(text: str, width: int = 98) -> list[str]:
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
        doc = (type(section).__doc__ or "").strip().splitlines()[0]
        lines += ["", "", f"# ---- {f.name}: {doc}", f"[{f.name}]"]
        lines += _render_table(section, f"{f.name}.", {"work", "root"})
    return "\n".join(lines) + "\n"
