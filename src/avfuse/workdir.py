"""The work-folder layout: every path below ``WORK`` is spelled here and nowhere else.

Stages talk through these files, so a stage never needs another stage's module to find what
it reads; ``pipeline`` and ``demo`` list a stage's outputs through :meth:`WorkDir.outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkDir"]


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

    @property
    def extract_table(self) -> Path:
        return self.root / "extract.parquet"

    @property
    def extract_parts(self) -> Path:
        return self.root / "extract" / "parts"

    @property
    def extract_config(self) -> Path:
        return self.root / "extract" / "config.toml"

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

    # embeddings
    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / name

    # train
    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, name: str) -> Path:
        return self.runs / name

    def checkpoint(self, run: str, which: str = "best") -> Path:
        return self.run(run) / f"{which}.pt"

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
