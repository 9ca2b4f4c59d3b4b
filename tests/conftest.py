"""Shared fixtures. The helpers test files share are modules of this package:
``tests.media`` (generated media files), ``tests.synthetic`` (synthetic feature stores),
``tests.workfolders`` (small scanned work folders), ``tests.commands`` (running avfuse and
reading its one-line errors), ``tests.checkpoints`` (checkpoint records) and
``tests.released`` (networks in their released checkpoint layouts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import media

# AVFUSE_TEST_THREADS=N runs the suite with N torch threads (CI runs the training tests at 16
# on a 2-core machine: oneDNN defects show up with many threads, not with the core count).
# OMP_NUM_THREADS carries it into the subprocesses tests start.
_THREADS = os.environ.get("AVFUSE_TEST_THREADS", "")
if _THREADS:
    os.environ["OMP_NUM_THREADS"] = _THREADS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    if _THREADS:
        import torch

        torch.set_num_threads(int(_THREADS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture
def tone_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tone_video("name.mp4", freq=440, duration=1.0, ...)`` -> path in tmp_path."""

    def make(name: str, **kwargs: object) -> Path:
        return media.write_tone_video(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Factory: ``make_dataset({split: {class: [names]}})`` -> ``{video_id: path}`` under
    ``tmp_path / "data"``."""

    def make(layout: dict[str, dict[str, list[str]]], **kwargs: object) -> dict[str, Path]:
        return media.make_dataset(tmp_path / "data", layout, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A Dask ``LocalCluster`` of 2 single-thread worker processes on loopback (per module: a
    test may kill a worker or patch code on them)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cl:
        yield cl


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    """A ``distributed.Client`` of :func:`cluster`."""
    distributed = pytest.importorskip("distributed")
    with distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A fine-tuning work folder embedded by a tiny Cnn10 (module-scoped: tests copy it)."""
    from avfuse.embed import EmbedConfig, embed
    from tests.released import cnn10_weights, finetune_work

    tmp = tmp_path_factory.mktemp("emb")
    work = finetune_work(tmp / "w", n_mels=64, example_frames=96, frames=(96, 300))
    init = cnn10_weights(8, tmp / "i.pth")
    cfg = EmbedConfig(
        work,
        model="cnn10",
        init=init,
        width=0.125,
        device="cpu",
        amp="off",
        channels_last=False,
        progress=False,
        chunk_videos=3,
    )
    embed(cfg)
    return work, cfg


@pytest.fixture
def store_work(tmp_path: Path) -> tuple[Path, Any]:
    """A synthetic feature store of 4 classes x 40 videos a split, 60-300 frames each:
    ``(work folder, manifest)``."""
    from tests.synthetic import make_synthetic_work

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=4, videos_per_class=40, frames_range=(60, 300))
    return work, man
