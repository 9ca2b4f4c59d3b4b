"""Shared fixtures. Media helpers live in :mod:`tests.media` (``from tests.media import ...``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests import media


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
