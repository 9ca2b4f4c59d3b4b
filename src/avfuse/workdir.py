"""The work-folder layout: every path below ``WORK`` is spelled here and nowhere else.

Stages talk through these files, so a stage never needs another stage's module to find what
it reads; ``pipeline`` recognises finished stages and ``demo`` cleans a work folder through
these paths (:attr:`WorkDir.written` lists every top-level entry a run writes).

Folders that may sit outside ``WORK`` have their own layout here too: a feature or embedding
store (:class:`StoreLayout`), a fusion output folder (:class:`FusionLayout`), the files beside a
score file (:class:`ScoreLayout`) and the demo's stand-in video model (:class:`VideoModelLayout`).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

__all__ = [
    "DATASET_INFO",
    "LOCK_NAME",
    "FusionLayout",
    "RecordLogLayout",
    "ScoreLayout",
    "StoreLayout",
    "VideoModelLayout",
    "WorkDir",
    "folder_name",
]

# Marks a work folder: every stage that writes one holds this lock file.
LOCK_NAME = ".avfuse.lock"
# What the demo generator records about the dataset it wrote, in the dataset's root folder.
DATASET_INFO = "demo_dataset.json"


def folder_name(kind: str, name: str) -> str:
    """``name`` if it is one plain folder name, else ``ValueError``: names from the command line
    and config files (run and embedding names) never decide a path outside their folder."""
    if (
        not name
        or len(name) > 128
        or name.startswith(".")
        or any(c in "/\\" or unicodedata.category(c)[0] == "C" for c in name)
    ):
        raise ValueError(
            f"invalid {kind} name {name!r}: one folder name (no / or \\, no leading '.', no "
            "control characters, at most 128 characters)"
        )
    return name


@dataclass(frozen=True)
class _Folder:
    """A folder whose names a layout owns; made from a ``str`` or a ``Path``. Frozen, compared
    and hashed by ``root``; the layouts below add names only."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))


class WorkDir(_Folder):
    """Paths of one work folder. ``WorkDir("work").manifest == Path("work/manifest.parquet")``."""

    # scan
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def classes(self) -> Path:
        return self.root / "classes.txt"

    @property
    def scan_config(self) -> Path:
        return self.root / "scan.toml"

    @property
    def scan_warnings(self) -> Path:
        return self.root / "scan_warnings.csv"

    # extract
    @property
    def audio_dir(self) -> Path:
        return self.root / "audio"

    @staticmethod
    def audio_relpath(video_id: str, fmt: str) -> str:
        """A video's sound track relative to WORK, as ``extract.parquet`` records it."""
        return f"audio/{video_id}.{fmt}"

    @property
    def extract_table(self) -> Path:
        return self.root / "extract.parquet"

    @property
    def extract_parts(self) -> Path:
        return self.root / "extract" / "parts"

    @property
    def extract_config(self) -> Path:
        return self.root / "extract.toml"

    @property
    def extract_failures(self) -> Path:
        return self.root / "extract_failures.csv"

    # features
    @property
    def store(self) -> Path:
        return self.root / "features"

    @property
    def features_table(self) -> Path:
        return self.root / "features.parquet"

    @property
    def features_parts(self) -> Path:
        return StoreLayout(self.store).parts

    @property
    def store_meta(self) -> Path:
        return StoreLayout(self.store).meta

    @property
    def features_config(self) -> Path:
        return StoreLayout(self.store).config

    # embeddings
    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    def embeddings(self, name: str) -> Path:
        return self.embeddings_dir / folder_name("embedding", name)

    # train
    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, name: str) -> Path:
        return self.runs / folder_name("run", name)

    def checkpoint(self, run: str, which: str = "best") -> Path:
        return self.run(run) / f"{which}.pt"

    def run_tensorboard(self, run: str) -> Path:
        return self.run(run) / "tb"

    def run_metrics(self, run: str) -> Path:
        return self.run(run) / "metrics.jsonl"

    def run_config(self, run: str) -> Path:
        return self.run(run) / "config.toml"

    # predict / evaluate
    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    def scores(self, split: str, model: str = "audio") -> Path:
        return self.scores_dir / f"{model}_{split}.npz"

    # The files beside a score file: ``ScoreLayout(WorkDir(w).scores("val")).metrics``.

    # fuse
    @property
    def fusion(self) -> Path:
        return self.root / "fusion"

    # run
    @property
    def pipeline_state(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def run_settings(self) -> Path:
        return self.root / "run.toml"

    @property
    def dataset_files(self) -> Path:
        """The dataset's fingerprint (paths, sizes, mtimes) a run compares to notice changes."""
        return self.root / "dataset_files.parquet"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def status_counts_plot(self) -> Path:
        return self.figures / "status_counts.png"

    @property
    def training_curves_plot(self) -> Path:
        return self.figures / "training_curves.png"

    @property
    def audio_errors_plot(self) -> Path:
        return self.figures / "audio_errors.png"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    # demo (beside a run's outputs: the generated dataset and the stand-in video model)
    @property
    def demo_dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def video_model(self) -> Path:
        return self.root / "video_model"

    @property
    def written(self) -> tuple[Path, ...]:
        """Every top-level entry the stages and ``avfuse run`` write (``--force`` clears them)."""
        return (
            self.manifest,
            self.classes,
            self.scan_config,
            self.scan_warnings,
            self.extract_table,
            self.extract_config,
            self.extract_failures,
            self.extract_parts.parent,
            self.audio_dir,
            self.features_table,
            self.store,
            self.embeddings_dir,
            self.runs,
            self.scores_dir,
            self.fusion,
            self.figures,
            self.report_md,
            self.report_html,
            self.pipeline_state,
            self.run_settings,
            self.dataset_files,
        )


class RecordLogLayout(_Folder):
    """Part files of a record log (``WORK/extract/parts``, ``WORK/features/parts``).

    A part's name sorts by the time it was written, so "newest wins" is a plain sort on names.
    """

    # Ends the name of a part that replaced many ("~" sorts after the "." of a plain part).
    COMPACTED: ClassVar[str] = "~compact"

    def part(self, time_ns: int, tag: str) -> Path:
        """A new part written at ``time_ns`` (``tag`` tells apart parts of one nanosecond)."""
        return self.root / f"part-{time_ns:020d}-{tag}.parquet"

    def parts(self) -> list[Path]:
        """Every part file present, oldest first (temporaries included: callers drop them)."""
        return sorted(self.root.glob("part-*.parquet"))

    def compacted(self, newest: Path) -> Path:
        """The part that replaces every part up to ``newest`` and sorts where it does."""
        stem = newest.name.removesuffix(".parquet").split(self.COMPACTED)[0]
        return self.root / f"{stem}{self.COMPACTED}.parquet"

    @classmethod
    def is_compacted(cls, part: Path) -> bool:
        return cls.COMPACTED in part.name

    @staticmethod
    def set_aside(part: Path) -> Path:
        """Where an unreadable part goes: out of the log (its name no longer matches a part)."""
        return part.with_name(part.name + ".corrupt")


class StoreLayout(_Folder):
    """Files of a feature store (``WORK/features``) or an embedding store
    (``WORK/embeddings/NAME``): ``StoreLayout(p).index == p / "index.parquet"``."""

    @property
    def meta(self) -> Path:
        return self.root / "store.json"

    @property
    def index(self) -> Path:
        return self.root / "index.parquet"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard(self, name: str) -> Path:
        """A shard the index names (``name`` as the index records it; see
        :meth:`is_shard_name` before opening it)."""
        return self.shards / name

    @staticmethod
    def is_shard_name(name: str) -> bool:
        """Whether ``name`` (read from an index) names a file directly inside ``shards/``."""
        return name.endswith(".npy") and "/" not in name and "\\" not in name and "\0" not in name

    @staticmethod
    def shard_name(prefix: str, number: int) -> str:
        """The ``number``-th shard a writer with ``prefix`` starts."""
        return f"shard-{prefix}-{number:05d}.npy"

    def shard_files(self) -> list[Path]:
        """The shard files present (committed or not), sorted."""
        return sorted(self.shards.glob("*.npy")) if self.shards.exists() else []

    @property
    def parts(self) -> Path:
        """The features stage's record log."""
        return self.root / "parts"

    @property
    def config(self) -> Path:
        """The features stage's settings."""
        return self.root / "config.toml"

    @property
    def embed_config(self) -> Path:
        """The settings an embedding store was written with."""
        return self.root / "embed.toml"


@dataclass(frozen=True)
class ScoreLayout:
    """The files beside a score file ``NAME.npz`` (``WORK/scores/audio_val.npz`` or any
    ``--output``): ``ScoreLayout(Path("a/audio_val.npz")).metrics ==
    Path("a/audio_val.metrics.json")``."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".npz") + suffix)

    @property
    def csv(self) -> Path:
        """The same scores as CSV (the score file's suffix replaced)."""
        return self.path.with_suffix(".csv")

    @property
    def metrics(self) -> Path:
        return self._beside(".metrics.json")

    @property
    def per_class(self) -> Path:
        return self._beside(".per_class.csv")

    @property
    def predict_config(self) -> Path:
        return self._beside(".predict.toml")

    @property
    def evaluate_config(self) -> Path:
        return self._beside(".evaluate.toml")

    def candidate(self, name: str) -> Path:
        """A candidate model's scores: ``audio_val.npz`` -> ``audio_val.baseline.npz``."""
        return self._beside(f".{name}.npz")


class FusionLayout(_Folder):
    """Files of a fusion output folder (``WORK/fusion`` or ``--output``)."""

    # Marks a folder as a fusion output: only such a folder (or an empty one) is replaced.
    MARKER: ClassVar[str] = "fusion.json"

    @property
    def figures(self) -> Path:
        return self.root / self.MARKER

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def scores(self, split: str) -> Path:
        return self.root / f"fused_{split}.npz"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def accuracy_plot(self) -> Path:
        return self.root / "accuracy.png"

    @property
    def weight_curve_plot(self) -> Path:
        return self.root / "weight_curve.png"

    @property
    def class_gain_plot(self) -> Path:
        return self.root / "class_gain.png"

    @property
    def audio_errors_plot(self) -> Path:
        return self.root / "audio_errors.png"

    @staticmethod
    def excerpt(number: int) -> str:
        """The ``number``-th sound excerpt (Ogg Opus) relative to the folder, as
        ``fusion.json`` records it (numbered: names never come from the data)."""
        return f"audio/changed_{number:03d}.ogg"


class VideoModelLayout(_Folder):
    """The demo's stand-in video model folder (``WORK/video_model``)."""

    @property
    def model(self) -> Path:
        return self.root / "video_model.npz"

    def scores(self, split: str) -> Path:
        return self.root / f"video_{split}.csv"

    @property
    def stamp(self) -> Path:
        """Accuracy, failures and the dataset settings the model was trained for."""
        return self.root / "video_baseline.json"
