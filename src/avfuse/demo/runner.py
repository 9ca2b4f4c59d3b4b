"""``avfuse demo``: generate the dataset, train the stand-in video model, run every stage."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avfuse.config import Config
from avfuse.demo.baseline import VideoBaselineResult, train_video_baseline
from avfuse.demo.dataset import CATALOGUE, DatasetInfo, generate_dataset
from avfuse.io import read_json, write_json
from avfuse.model_config import ModelName
from avfuse.workdir import DATASET_INFO, VideoModelLayout, WorkDir


@dataclass(frozen=True)
class DemoConfig(Config):
    """Settings of ``avfuse demo`` (dataset size, demo-sized training) on top of a run config."""

    work: Path = field(
        default=Path("demo-work"), metadata={"help": "work folder of the demo", "flags": ("-o",)}
    )
    root: Path | None = field(
        default=None, metadata={"help": "where the dataset is generated (default WORK/dataset)"}
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "seed of the generated dataset"})
    classes: int = field(
        default=len(CATALOGUE),
        metadata={
            "min": 1,
            "max": len(CATALOGUE),
            "help": f"number of classes (1-{len(CATALOGUE)})",
        },
    )
    train_per_class: int = field(
        default=30, metadata={"min": 1, "help": "training videos per class"}
    )
    val_per_class: int = field(
        default=10, metadata={"min": 0, "help": "validation videos per class"}
    )
    heldout_per_class: int = field(
        default=10,
        metadata={
            "min": 0,
            "help": "held-out videos per class for choosing fusion weights "
            "(0: cross-validation on val instead)",
        },
    )
    seconds: float = field(
        default=3.5, metadata={"above": 0.5, "max": 600, "help": "mean clip length (+-0.5 s)"}
    )
    size: int = field(
        default=64,
        metadata={"min": 16, "max": 1024, "help": "frame width and height (pixels, even)"},
    )
    fps: int = field(default=10, metadata={"min": 1, "max": 120, "help": "frames per second"})
    no_audio_fraction: float = field(
        default=0.03,
        metadata={"min": 0, "max": 1, "help": "share of videos per split without an audio track"},
    )
    short_fraction: float = field(
        default=0.05,
        metadata={
            "help": "share of videos per split that are 0.3-0.9 s long (in a few classes)",
            "min": 0,
            "max": 1,
        },
    )
    muted_fraction: float = field(
        default=0.03,
        metadata={
            "help": "share of videos per split with a muted sound track: digital silence or "
            "-90 dBFS hiss (in a few classes)",
            "min": 0,
            "max": 1,
        },
    )
    unreadable: int = field(default=2, metadata={"help": "unreadable training files", "min": 0})
    epochs: int = field(default=15, metadata={"min": 1, "help": "audio model training epochs"})
    model: ModelName = field(default="resnet", metadata={"help": "audio model architecture"})
    width: float = field(
        default=0.25, metadata={"above": 0, "help": "audio model width multiplier"}
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "min": 0,
            "help": "processes for generation, extraction, features (default all cores)",
        },
    )
    run_config: Path | None = field(
        default=None,
        metadata={"help": "run config to start from (default: the packaged default_run.toml)"},
    )
    overrides: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "run config overrides KEY=VALUE, comma-separated, applied last "
            "(e.g. train.lr=0.003,fuse.method=logprob)"
        },
    )
    force: bool = field(default=False, metadata={"help": "regenerate and redo everything"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


@dataclass
class DemoResult:
    dataset: DatasetInfo
    video: VideoBaselineResult
    run: Any  # avfuse.run_report.RunResult

    def summary(self) -> str:
        lines = [self.dataset.summary(), self.video.summary(), self.run.summary()]
        if self.run.report:
            lines.append(f"open {WorkDir(self.run.work).report_html} to see the report")
        return "\n".join(lines)


def demo_run_config(cfg: DemoConfig, video_dir: Path) -> Any:
    """The :class:`avfuse.runconfig.RunConfig` the demo runs: the base file plus demo sizes.

    ``cfg.overrides`` (``KEY=VALUE``, as ``avfuse run --set``) are applied last.
    """
    from avfuse.config import apply_overrides
    from avfuse.runconfig import RunConfig, default_config_path, load_run_config

    base: RunConfig = load_run_config(cfg.run_config or default_config_path())
    work = Path(cfg.work)
    heldout = cfg.heldout_per_class > 0
    # Typed Any: dataclasses.replace checks every key against the fields at run time.
    workers: dict[str, Any] = {} if cfg.num_workers is None else {"num_workers": cfg.num_workers}
    by_heldout: dict[str, Any] = {"val_split": "heldout"} if heldout else {}
    heldout_video: dict[str, Any] = (
        {"heldout_video": (VideoModelLayout(video_dir).scores("heldout"),)} if heldout else {}
    )
    force: dict[str, Any] = {"force": ("all",)} if cfg.force else {}
    train = dataclasses.replace(
        base.train,
        epochs=cfg.epochs,
        model=cfg.model,
        width=cfg.width,
        # Tiny data: worker start-up would cost more than it saves.
        num_workers=0,
        batch_size=32,
        base_batch_size=32,
        # The best checkpoint is picked on held-out videos too: val stays untouched until
        # the report, so its audio-only figure is not optimistic.
        **by_heldout,
    )
    fuse = dataclasses.replace(
        base.fuse,
        video_scores=(VideoModelLayout(video_dir).scores("val"),),
        weight_selection="heldout" if heldout else "cv",
        bootstrap=1000,
        **heldout_video,
    )
    run_cfg = dataclasses.replace(
        base,
        root=Path(cfg.root) if cfg.root else WorkDir(work).demo_dataset,
        work=work,
        train=train,
        extract=dataclasses.replace(base.extract, **workers),
        features=dataclasses.replace(base.features, **workers),
        progress=cfg.progress,
        fuse=fuse,
        **force,
    )
    if cfg.overrides:
        run_cfg = apply_overrides(run_cfg, cfg.overrides)
    return run_cfg


def _clean_work(work: Path) -> None:
    """Remove the demo's outputs from ``work`` (only names the pipeline writes), and only from
    a folder a scan wrote: ``-o`` naming someone's folder must not lose their ``audio/`` or
    ``report.md``."""
    if not WorkDir(work).manifest.exists():
        return
    # Besides a run's outputs, the video model (the dataset is kept: it is reused by seed).
    for p in (*WorkDir(work).written, WorkDir(work).video_model):
        if p.is_symlink():
            p.unlink()  # the link only: never what it points to
        elif p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def demo(cfg: DemoConfig) -> DemoResult:
    """Generate the demo dataset, train the stand-in video model, run every stage.

    Each step is skipped when its outputs exist for the same settings, so a second
    ``avfuse demo`` only redoes what changed.
    """
    from avfuse.pipeline import run

    if cfg.size % 2:
        # H.264 stores colour at half resolution: the encoder refuses odd frame sizes.
        raise ValueError(f"DemoConfig.size: {cfg.size} must be even (H.264 frames)")
    work = Path(cfg.work)
    root = Path(cfg.root) if cfg.root else WorkDir(work).demo_dataset
    per_split = {"train": cfg.train_per_class, "val": cfg.val_per_class}
    if cfg.heldout_per_class > 0:
        per_split["heldout"] = cfg.heldout_per_class
    if cfg.force:
        _clean_work(work)
    elif (root / DATASET_INFO).exists() and WorkDir(work).manifest.exists():
        old = read_json(root / DATASET_INFO).get("settings", {})
        if old.get("classes") != cfg.classes or old.get("seed") != cfg.seed:
            raise ValueError(
                f"{work} holds a demo run of another dataset (seed {old.get('seed')}, "
                f"{old.get('classes')} classes): pass --force to start it afresh, or another --work"
            )
    info = generate_dataset(
        root,
        seed=cfg.seed,
        classes=cfg.classes,
        per_split=per_split,
        seconds=cfg.seconds,
        size=cfg.size,
        fps=cfg.fps,
        no_audio_fraction=cfg.no_audio_fraction,
        short_fraction=cfg.short_fraction,
        unreadable=cfg.unreadable,
        muted_fraction=cfg.muted_fraction,
        num_workers=cfg.num_workers,
        force=cfg.force,
        progress=cfg.progress,
    )
    print(info.summary())

    video_dir = WorkDir(work).video_model
    stamp = VideoModelLayout(video_dir).stamp
    dataset_settings = info.settings
    splits: list[str] = [s for s in ("val", "heldout") if s in per_split]
    video: VideoBaselineResult | None = None
    if stamp.exists() and not cfg.force:
        old = read_json(stamp)
        files: dict[str, Path] = {s: VideoModelLayout(video_dir).scores(s) for s in splits}
        if old.get("dataset") == dataset_settings and all(p.exists() for p in files.values()):
            video = VideoBaselineResult(
                VideoModelLayout(video_dir).model, files, old["accuracy"], old["failed"]
            )
    if video is None:
        video = train_video_baseline(
            root,
            video_dir,
            score_splits=splits,
            num_workers=cfg.num_workers,
            progress=cfg.progress,
        )
        data = read_json(stamp)
        data["dataset"] = dataset_settings
        write_json(stamp, data)
    print(video.summary())

    result = run(demo_run_config(cfg, video_dir))
    return DemoResult(info, video, result)
