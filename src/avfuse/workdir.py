"""The work-folder layout: every path below ``WORK`` is spelled here and nowhere else.

Stages talk through these files, so a stage never needs another stage's module to find what
it reads; ``pipeline`` recognises finished stages and ``demo`` cleans a work folder through
these paths (:attr:`WorkDir.written` lists every top-level entry a run writes).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkDir", "folder_name"]


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
class WorkDir:
    """Paths of one work folder. ``WorkDir("work").manifest == Path("work/manifest.parquet")``."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

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
        return self.store / "parts"

    @property
    def store_meta(self) -> Path:
        return self.store / "store.json"

    @property
    def features_config(self) -> Path:
        return self.store / "config.toml"

    # embeddings
    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / folder_name("embedding", name)

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

    def metrics(self, split: str, model: str = "audio") -> Path:
        return self.scores_dir / f"{model}_{split}.metrics.json"

    def per_class(self, split: str, model: str = "audio") -> Path:
        return self.scores_dir / f"{model}_{split}.per_class.csv"

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
    def lock(self) -> Path:
        return self.root / ".avfuse.lock"

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
            self.root / "embeddings",
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
