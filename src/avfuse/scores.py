"""Score files: per-video class scores keyed by ``video_id``, class names in column order.

Format (``.npz``, loadable with numpy alone)::

    ids        (N,)   str     video_id of each row
    classes    (C,)   str     class names, column order of ``scores``
    scores     (N, C) float32 probabilities (rows of videos without audio are NaN)
    n_windows  (N,)   int32   windows averaged into the row (0 where no audio)
    status     (N,)   str     "ok"; "padded" (scored from one padded window: a clip shorter
                              than one example); else why the row has no scores ("no_audio",
                              "silent", "too_short", ...)
    meta       ()     str     JSON: what produced the file (model, checkpoint, aggregation, ...)

Rows are never matched by position: every consumer joins on ``ids``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from avfuse.io import atomic_write, require_regular_file, write_csv
from avfuse.manifest import SCORED_STATUSES


@dataclass
class ScoreFile:
    ids: np.ndarray
    classes: list[str]
    scores: np.ndarray
    n_windows: np.ndarray
    status: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=str)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.n_windows = np.asarray(self.n_windows, dtype=np.int32)
        self.status = np.asarray(self.status, dtype=str)
        self.classes = [str(c) for c in self.classes]
        n = len(self.ids)
        if self.scores.shape != (n, len(self.classes)):
            raise ValueError(f"scores shape {self.scores.shape} != ({n}, {len(self.classes)})")
        if self.n_windows.shape != (n,) or self.status.shape != (n,):
            raise ValueError("n_windows and status must have one entry per id")
        if len(set(self.ids.tolist())) != n:
            raise ValueError("duplicated video ids in score file")

    @property
    def has_scores(self) -> np.ndarray:
        """Boolean mask of rows that carry real scores (status ``ok`` or ``padded``)."""
        return np.isin(self.status, SCORED_STATUSES)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                ids=self.ids,
                classes=np.asarray(self.classes, dtype=str),
                scores=self.scores,
                n_windows=self.n_windows,
                status=self.status,
                meta=np.asarray(json.dumps(self.meta, sort_keys=True, default=str)),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreFile:
        # The arrays' headers first: a small compressed file may declare gigabytes.
        from avfuse.video_scores import ScoreBounds, check_npy

        require_regular_file(path)
        check_npy(Path(path), ScoreBounds())
        with np.load(path, allow_pickle=False) as z:
            lacking = [k for k in ("ids", "classes", "scores", "n_windows", "status") if k not in z]
            if lacking:
                raise ValueError(
                    f"{path} is not an avfuse score file: no {', '.join(lacking)} array(s) "
                    f"(it holds {', '.join(sorted(z.files)) or 'nothing'})"
                )
            return cls(
                ids=z["ids"],
                classes=z["classes"].tolist(),
                scores=z["scores"],
                n_windows=z["n_windows"],
                status=z["status"],
                meta=json.loads(str(z["meta"])) if "meta" in z else {},
            )

    def to_frame(self) -> pd.DataFrame:
        """Wide table: video_id, status, n_windows, then one column per class."""
        df = pd.DataFrame(self.scores, columns=self.classes)
        df.insert(0, "n_windows", self.n_windows)
        df.insert(0, "status", self.status)
        df.insert(0, "video_id", self.ids)
        return df

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        # Class names and ids come from the data: escaped for spreadsheets.
        return write_csv(self.to_frame(), path, float_format="%.6g")

    def index(self) -> dict[str, int]:
        return {v: i for i, v in enumerate(self.ids.tolist())}

    def select(self, ids: Sequence[str]) -> ScoreFile:
        """Rows for ``ids`` in that order (KeyError for an id the file lacks)."""
        pos = self.index()
        rows = np.asarray([pos[i] for i in ids], dtype=np.int64)
        return ScoreFile(
            self.ids[rows],
            self.classes,
            self.scores[rows],
            self.n_windows[rows],
            self.status[rows],
            dict(self.meta),
        )

    @classmethod
    def from_rows(
        cls,
        classes: Sequence[str],
        rows: Mapping[str, tuple[np.ndarray | None, int, str]],
        meta: dict[str, Any] | None = None,
    ) -> ScoreFile:
        """Build from ``{video_id: (scores or None, n_windows, status)}``, sorted by id."""
        ids = sorted(rows)
        c = len(classes)
        scores = np.full((len(ids), c), np.nan, dtype=np.float32)
        n_win = np.zeros(len(ids), dtype=np.int32)
        status = []
        for i, vid in enumerate(ids):
            s, n, st = rows[vid]
            if s is not None:
                scores[i] = s
            n_win[i] = n
            status.append(st)
        return cls(np.asarray(ids), list(classes), scores, n_win, np.asarray(status), meta or {})
