"""Small work folders the tests share: tone videos scanned into a work folder, the stage settings
that run them inline, and a file outside the folder that nothing may touch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from avfuse.extract import ExtractConfig
from avfuse.features import FeaturesConfig
from avfuse.io import read_table
from avfuse.lock import work_lock
from avfuse.manifest import ScanConfig, scan
from avfuse.store import FeatureStore
from tests.media import make_dataset


def truncate(path: Path, keep: int = 200) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])


def store_rows(store: FeatureStore) -> dict[str, np.ndarray]:
    return {v: np.asarray(store[v]).copy() for v in store.ids}


def copy_work(work0: Path, tmp_path: Path) -> Path:
    """A private copy of a module-scoped work folder, for a test that changes it."""
    work = tmp_path / "w"
    shutil.copytree(work0, work)
    return work


TONE_LAYOUT = {
    "train": {"a": ["x1.mp4", "x2.mp4"], "b": ["y1.mp4", "y2.mp4"]},
    "val": {"a": ["v1.mp4"], "b": ["w1.mp4"]},
}
TONE_FREQ = {"a": 440.0, "b": 880.0}


def tone_dataset(root: Path) -> dict[str, Path]:
    return make_dataset(root, TONE_LAYOUT, duration=1.3, freq_of=TONE_FREQ)


def scanned_tones(tmp: Path, name: str = "work", data: str = "data") -> Path:
    if not (tmp / data).exists():
        tone_dataset(tmp / data)
    work = tmp / name
    scan(ScanConfig(root=tmp / data, work=work))
    return work


def extract_cfg(work: Path, **kw: Any) -> ExtractConfig:
    return ExtractConfig(work=work, num_workers=0, progress=False, **kw)


def features_cfg(work: Path, **kw: Any) -> FeaturesConfig:
    return FeaturesConfig(work=work, num_workers=0, progress=False, **kw)


def stage_status(work: Path, table: str = "extract.parquet", col: str = "status") -> dict[str, str]:
    return read_table(work / table).set_index("video_id")[col].to_dict()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


SMALL_LAYOUT = {"train": {"a": ["x1.mp4"], "b": ["y1.mp4"]}, "val": {"a": ["v1.mp4"]}}
PRECIOUS = b"someone else's file\n"


def scanned_small(tmp: Path) -> Path:
    make_dataset(tmp / "data", SMALL_LAYOUT, duration=0.6)
    work = tmp / "work"
    with work_lock(work, create=True):
        scan(ScanConfig(root=tmp / "data", work=work))
    return work


def outside_file(tmp: Path, name: str = "victim.txt") -> Path:
    p = tmp / "outside" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(PRECIOUS)
    return p
