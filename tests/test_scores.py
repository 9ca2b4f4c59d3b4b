"""Our score files: headers checked before arrays are read, CSV exports that spreadsheets cannot run."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from avfuse.scores import ScoreFile
from avfuse.video_scores import read_one
from tests.test_io import _assert_inert
from tests.test_video_scores import _npy_header_only


def test_our_score_file_loader_checks_headers_first(tmp_path: Path) -> None:
    path = tmp_path / "audio_val.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ids.npy", _npy_header_only((100_000,), "<U8"))
        zf.writestr("scores.npy", _npy_header_only((100_000, 10_000)))
    with pytest.raises(ValueError, match="over 268435456 values") as info:
        ScoreFile.load(path)
    assert str(path) in str(info.value)


def test_score_csv_is_inert_and_reads_back_as_the_same_names(tmp_path: Path) -> None:
    classes = ['=HYPERLINK("http://evil","x")', "@cls", "plain"]
    ids = ["+cmd", "-abc_000001_000011", "val/a/x"]
    rng = np.random.default_rng(0)
    scores = rng.random((3, 3)).astype(np.float32)
    sf = ScoreFile(ids, classes, scores, np.ones(3), np.array(["ok"] * 3))
    path = sf.to_csv(tmp_path / "audio_val.csv")
    _assert_inert(path)
    back = read_one(path)
    assert back.ids == ids and back.classes == classes
    np.testing.assert_allclose(back.scores, scores, rtol=1e-5)
