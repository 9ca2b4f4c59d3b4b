"""Read a video model's per-video class scores from the formats tools actually write.

Every reader returns a :class:`VideoScores`: the ids as the source spells them, an ``(N, C)``
float64 matrix and, when the source names them, the class of each column. Nothing here relies
on row order: :func:`match_ids` joins rows to manifest ``video_id`` values through
:func:`normalize_id`, and :func:`align_classes` reorders columns by class name.

Formats (:data:`READERS`, the one table of them; chosen by extension, or forced with ``fmt``):

``.npz`` with ``ids``, ``classes``, ``scores``
    an :class:`avfuse.scores.ScoreFile` (ours), or any npz with a 2-D array (``scores``,
    ``logits``, ``probs`` or the only 2-D array) and optionally ``ids`` / ``video_ids`` /
    ``names`` and ``classes`` / ``labels`` / ``class_names``.
``.npy``
    an ``(N, C)`` array; ids come from ``ids_file`` (one id a line) or ``annotations``.
``.csv`` / ``.tsv``
    wide (an id column, then one column per class) or long (``id, class, score`` columns).
``.pkl`` / ``.pickle``
    the ``--dump`` output of mmaction2's test tool: a list of score arrays, or of dicts with a
    ``pred_score`` (numpy array or torch tensor); row ``i`` belongs to line ``i`` of the
    ``annotations`` list. The pickle is read by :func:`avfuse.safe_pickle.load_pickle`: exact
    numpy / torch globals only, anything else is refused by name before it can run.

Annotation files giving the row order: mmaction2 lists (``path label`` or
``path total_frames label`` lines), a plain id list, a CSV with a ``video_id`` / ``id`` column,
or the Kinetics CSV (``label,youtube_id,time_start,time_end,split``).

Every reader bounds what it allocates by what the data set can need (:class:`ScoreBounds`:
rows from the manifest's size, columns from the class count) and checks it from what the file
declares before allocating: an ``.npy`` header's shape and dtype (an 8 MB ``.npz`` of zeros
declares 8 GiB), a CSV's header width and line lengths (a 5 MB cell, 10^6 columns).
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd

from avfuse.io import csv_uncell, require_regular_file
from avfuse.labels import class_key, kinetics_clip_name, match_class_names, nfc, read_label_map
from avfuse.manifest import SCORED_STATUSES
from avfuse.registry import OneOf, Registry
from avfuse.safe_pickle import CorruptPickleError, UnsafePickleError, load_pickle

# YouTube ids are 11 characters of [A-Za-z0-9_-]; Kinetics clips append start and end seconds.
_KINETICS = re.compile(r"^(?P<yt>[A-Za-z0-9_-]{11})_(?P<start>\d+)_(?P<end>\d+)$")
_EXTENSION = re.compile(r"^(?P<stem>.+)\.(?P<ext>[A-Za-z][A-Za-z0-9]{0,4})$")
_LIST_LINE = re.compile(r"^(?P<path>.+?)(?P<nums>(?:\s+-?\d+(?:,\d+)*){0,2})$")
_ID_COLUMNS = ("video_id", "id", "video", "name", "filename", "file", "path", "vid", "youtube_id")
_CLASS_COLUMNS = ("class", "label", "class_name", "category", "classname")
_SCORE_COLUMNS = ("score", "prob", "probability", "logit", "value")
_NONFINITE = ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")
_META_COLUMNS = {"status", "n_windows", "split", "label_index", "gt", "gt_label", "target"}


class VideoScoreError(ValueError):
    """A score, annotation or label-map file that cannot be used; the message names the file."""


class AmbiguousIdError(VideoScoreError):
    """Two videos of the manifest normalise to the same key."""


@dataclass(frozen=True)
class ScoreBounds:
    """The most rows and columns a score file of this data set can need.

    ``rows``: a file may score videos the manifest lacks, but not without limit; ``columns``:
    a video model may know classes the data set lacks (a Kinetics-700 model on Kinetics-400).
    Defaults (no data set at hand) are generous; :meth:`for_dataset` tightens them.
    """

    rows: int = 10_000_000
    columns: int = 100_000
    # Values of one matrix: 2^28 float32 are 1 GiB (Kinetics-700 val: 35k x 700 = 2.5e7).
    cells: int = 1 << 28
    # Longest text an id or class name may take (``U`` dtype itemsize / CSV cell), in chars.
    text: int = 4096

    @classmethod
    def for_dataset(cls, n_videos: int, n_classes: int) -> ScoreBounds:
        rows, columns = 2 * n_videos + 10_000, n_classes + max(n_classes, 1000)
        return cls(rows=rows, columns=columns, cells=rows * columns)

    @property
    def line_bytes(self) -> int:
        """Longest CSV line: every column a number or a short name, plus an id."""
        return (self.columns + 16) * 64 + 4 * self.text

    def check_array(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Refuse an array the data set cannot need, from its declared shape and dtype."""
        what = f"{path}: array {key!r} declares shape {shape} {dtype}"
        if dtype.hasobject:
            raise VideoScoreError(f"{what}: Python objects are not scores")
        if dtype.kind in "US" and dtype.itemsize > 4 * self.text:
            raise VideoScoreError(f"{what}: strings over {self.text} characters")
        if len(shape) > 2:
            raise VideoScoreError(f"{what}: more than 2 dimensions")
        if shape and shape[0] > self.rows:
            raise VideoScoreError(f"{what}: over {self.rows} rows (the data set needs fewer)")
        if len(shape) == 2 and shape[1] > self.columns:
            raise VideoScoreError(
                f"{what}: over {self.columns} columns (the class list needs fewer)"
            )
        if len(shape) == 2 and shape[0] * shape[1] > self.cells:
            raise VideoScoreError(f"{what}: over {self.cells} values (the data set needs fewer)")


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an ``.npy`` stream declares, reading its header only."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), np.dtype(dtype)


def check_npy(path: Path, bounds: ScoreBounds) -> None:
    """Check the arrays an ``.npy`` / ``.npz`` file declares before numpy allocates them."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    with zf.open(info) as fh:
                        shape, dtype = _npy_header(fh)
                    bounds.check_array(path, info.filename.removesuffix(".npy"), shape, dtype)
        else:
            with open(path, "rb") as fh:
                shape, dtype = _npy_header(fh)
            bounds.check_array(path, "", shape, dtype)
    except VideoScoreError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise VideoScoreError(f"{path}: not a readable numpy file ({_short(exc)})") from None


def _short(exc: BaseException, n: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[:n] + "..."


def check_lines(path: Path, max_bytes: int) -> int:
    """Refuse a text file with a line over ``max_bytes`` (scanned in 1 MB blocks, vectorised),
    before a parser holds such a line, or a cell of it, in memory. Returns the line count, for
    the caller to bound the rows a parser would build."""
    line_no, run = 1, 0  # run: bytes of the current line seen so far
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            if ends.size:
                lengths = np.diff(np.concatenate([[-run - 1], ends])) - 1
                over = np.flatnonzero(lengths > max_bytes)
                if over.size:
                    line_no += int(over[0])
                    run = max_bytes + 1
                    break
                line_no += ends.size
                run = len(chunk) - 1 - int(ends[-1])
            else:
                run += len(chunk)
            if run > max_bytes:
                break
    if run > max_bytes:
        raise VideoScoreError(
            f"{path}: line {line_no} is over {max_bytes} bytes (a cell or header far larger "
            "than any score table needs)"
        )
    return line_no - (run == 0)


@dataclass
class RowLabels:
    """Ground truth a source gives for its rows, to check the rows against the manifest.

    Either ``names`` (N,) class names (``""`` where a row has none), or ``index`` (N,) int64
    columns of the source's own score matrix (the video model's class order; ``-1`` = none).
    ``source`` names the file the labels came from.
    """

    source: str
    names: list[str] | None = None
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names) if self.names is not None else len(self.index)  # type: ignore[arg-type]


@dataclass
class VideoScores:
    """Scores read from one or more files.

    ``ids`` (N,) as the source spells them; ``scores`` (N, C) float32 when the source holds
    float32 (halving the memory of large files), else float64; ``classes`` the class
    name of each column, or ``None`` when the source does not name its columns; ``kind`` is
    ``"probs"`` when the format guarantees probabilities (our score files), else ``None``;
    ``labels`` the ground truth the source carries for its rows, if any.
    """

    ids: list[str]
    scores: np.ndarray
    classes: list[str] | None
    source: str
    kind: Literal["logits", "probs"] | None = None
    notes: list[str] = field(default_factory=list)
    labels: RowLabels | None = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.scores)
        self.scores = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)
        if self.scores.ndim != 2:
            raise VideoScoreError(
                f"{self.source}: scores must be a 2-D (videos, classes) array, "
                f"got shape {self.scores.shape}"
            )
        if len(self.ids) != self.scores.shape[0]:
            raise VideoScoreError(
                f"{self.source}: {len(self.ids)} ids for {self.scores.shape[0]} score rows"
            )
        if self.scores.shape[0] == 0:
            raise VideoScoreError(f"{self.source}: no score rows (empty file)")
        if self.classes is not None and len(self.classes) != self.scores.shape[1]:
            raise VideoScoreError(
                f"{self.source}: {len(self.classes)} class names for "
                f"{self.scores.shape[1]} score columns"
            )


# --------------------------------------------------------------------------- ids


def normalize_id(name: str) -> str:
    """Key under which one video matches across tools.

    Drops directories and one file extension, a ``v_`` prefix, and rewrites Kinetics clip names
    to the YouTube id plus six-digit start and end seconds, so that
    ``abseiling/ZzW2b8ZfnHM_000060_000070.mp4``, ``ZzW2b8ZfnHM_60_70`` and
    ``val/abseiling/ZzW2b8ZfnHM_000060_000070`` all give ``ZzW2b8ZfnHM_000060_000070``.
    """
    s = unicodedata.normalize("NFC", str(name)).strip().replace("\\", "/").rstrip("/")
    s = s.rsplit("/", 1)[-1]
    m = _EXTENSION.match(s)
    if m:
        s = m["stem"]
    for cand in (s, s[2:] if s.startswith("v_") else None):
        if cand is None:
            continue
        k = _KINETICS.match(cand)
        if k:
            return f"{k['yt']}_{int(k['start']):06d}_{int(k['end']):06d}"
    return s[2:] if s.startswith("v_") and len(s) > 2 else s


normalize_class = class_key


def _examples(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


@dataclass
class IdMatch:
    """Rows of a source matched to target ids.

    ``rows`` (T,) int64: the source row of each target id, ``-1`` where the source has none.
    ``missing``: target ids without a source row; ``extra``: source ids matching no target;
    ``duplicates``: source ids whose key was already taken (the first row is kept).
    """

    rows: np.ndarray
    missing: list[str]
    extra: list[str]
    duplicates: list[str]
    exact: bool

    def counts(self) -> dict[str, int]:
        return {
            "matched": int((self.rows >= 0).sum()),
            "missing": len(self.missing),
            "extra": len(self.extra),
            "duplicates": len(self.duplicates),
        }

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts())
        for k in ("missing", "extra", "duplicates"):
            out[f"{k}_examples"] = list(getattr(self, k)[:5])
        return out

    def check(self, tolerance: float, what: str, source: str) -> None:
        """Raise when missing, extra or duplicated ids exceed ``tolerance`` of the target ids."""
        n = max(len(self.rows), 1)
        limit = tolerance * n
        problems = []
        for k, label in (
            ("missing", f"videos of the split without a row in {what}"),
            ("extra", f"rows of {what} matching no video of the split"),
            ("duplicates", f"duplicated ids in {what}"),
        ):
            items = getattr(self, k)
            if len(items) > limit:
                problems.append(f"{len(items)} {label} (e.g. {_examples(items)})")
        if problems:
            raise VideoScoreError(
                f"{source}: " + "; ".join(problems) + f"; tolerance is {tolerance:.2%} of "
                f"{len(self.rows)} videos (raise --tolerance to accept; rows are never zero-filled)"
            )


def key_index(target_ids: Sequence[str]) -> dict[str, int]:
    """``normalize_id`` key -> position; :class:`AmbiguousIdError` if two ids share a key."""
    index: dict[str, int] = {}
    clash: dict[str, list[str]] = {}
    for i, t in enumerate(target_ids):
        k = normalize_id(t)
        if k in index:
            clash.setdefault(k, [target_ids[index[k]]]).append(t)
        else:
            index[k] = i
    if clash:
        shown = "; ".join(f"{k}: {' / '.join(v)}" for k, v in list(clash.items())[:5])
        raise AmbiguousIdError(
            f"{len(clash)} normalised id(s) shared by several videos of the manifest ({shown}); "
            "give the video scores with full video_ids (split/class/stem) instead"
        )
    return index


def match_ids(target_ids: Sequence[str], source_ids: Sequence[str]) -> IdMatch:
    """Match source rows to ``target_ids`` (manifest video_ids), by key, never by position.

    When every source id is literally a target id no normalisation is needed (and videos
    whose names only differ by class folder stay distinct); otherwise both sides go through
    :func:`normalize_id`.
    """
    target_ids = [str(t) for t in target_ids]
    source_ids = [str(s) for s in source_ids]
    exact_pos = {t: i for i, t in enumerate(target_ids)}
    exact = all(s in exact_pos for s in source_ids)
    if exact:
        index = exact_pos
        keys = source_ids
    else:
        index = key_index(target_ids)
        keys = [normalize_id(s) for s in source_ids]
    rows = np.full(len(target_ids), -1, dtype=np.int64)
    extra: list[str] = []
    dups: list[str] = []
    for r, (s, k) in enumerate(zip(source_ids, keys, strict=True)):
        t = index.get(k)
        if t is None:
            extra.append(s)
        elif rows[t] >= 0:
            dups.append(s)
        else:
            rows[t] = r
    missing = [t for t, r in zip(target_ids, rows, strict=True) if r < 0]
    return IdMatch(rows, missing, extra, dups, exact)


# --------------------------------------------------------------------------- classes


@dataclass
class ClassAlignment:
    """``columns`` (C,) int64: source column of each target class, ``-1`` where missing."""

    columns: np.ndarray
    missing: list[str]
    extra: list[str]
    by_name: bool

    def report(self) -> dict[str, Any]:
        return {
            "by_name": self.by_name,
            "missing": len(self.missing),
            "extra": len(self.extra),
            "missing_examples": self.missing[:5],
            "extra_examples": self.extra[:5],
        }


def align_classes(
    source_classes: Sequence[str] | None,
    classes: Sequence[str],
    *,
    n_columns: int,
    source: str,
    tolerance: int = 0,
) -> ClassAlignment:
    """Map target ``classes`` to source columns by name (:func:`avfuse.labels.match_class_names`).

    Unnamed columns are taken in ``classes`` order when their count matches, else an error.
    More than ``tolerance`` classes missing or extra on the source side is an error; within it,
    a missing class gets no column (``-1``) and the caller decides (never a zero fill).
    """
    if source_classes is None:
        if n_columns != len(classes):
            raise VideoScoreError(
                f"{source}: {n_columns} score columns but {len(classes)} classes, and the file "
                "does not name its columns; give --video-label-map (one class a line)"
            )
        return ClassAlignment(np.arange(n_columns, dtype=np.int64), [], [], by_name=False)
    # Only the same string twice is a duplicate: `Jogging` and `jogging` may be two classes.
    dup = [c for c, n in Counter(nfc(str(c)) for c in source_classes).items() if n > 1]
    if dup:
        raise VideoScoreError(f"{source}: duplicated class names {_examples(dup)}")
    cols = np.asarray(match_class_names(list(classes), list(source_classes)), dtype=np.int64)
    missing = [c for c, j in zip(classes, cols, strict=True) if j < 0]
    used = set(cols[cols >= 0].tolist())
    extra = [c for j, c in enumerate(source_classes) if j not in used]
    if len(missing) > tolerance or len(extra) > tolerance:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} class(es) of the class list missing ({_examples(missing)})"
            )
        if extra:
            parts.append(f"{len(extra)} unknown class name(s) ({_examples(extra)})")
        raise VideoScoreError(f"{source}: " + "; ".join(parts) + f" (class tolerance {tolerance})")
    return ClassAlignment(cols, missing, extra, by_name=True)


# --------------------------------------------------------------------------- annotations


def read_annotation_ids(path: str | Path) -> list[str]:
    """Ids in the order an annotation file lists its videos.

    Kinetics CSV (``youtube_id,time_start,time_end``), a CSV with a ``video_id`` / ``id``
    column, or text lines whose first field is the video (mmaction2 ``path label`` lists and
    plain id lists alike). Blank lines are skipped.
    """
    return read_annotations(path)[0]


def _labels_of(values: Sequence[str], source: str) -> RowLabels | None:
    """Integer labels are columns of the model's scores, anything else class names."""
    vals = [str(v).strip() for v in values]
    if not any(vals):
        return None
    if all(re.fullmatch(r"-?\d+", v) for v in vals if v):
        return RowLabels(source, index=np.asarray([int(v) if v else -1 for v in vals], np.int64))
    return RowLabels(source, names=vals)


def read_annotations(path: str | Path) -> tuple[list[str], RowLabels | None]:
    """Ids in the order an annotation file lists its videos, and the labels it gives them.

    Labels: the ``label`` column of a Kinetics CSV (class names; absent in test CSVs), a
    ``label`` / ``class`` / ``label_index`` column of an id CSV, or the last integer field of
    mmaction2 ``path label`` / ``path total_frames label`` lines (an index into the model's
    class order). Multi-label lines (``1,4``) give no labels.
    """
    path = Path(path)
    try:
        require_regular_file(path)
        bounds = ScoreBounds()
        if check_lines(path, bounds.line_bytes) > bounds.rows + 1:
            raise VideoScoreError(
                f"{path}: over {bounds.rows} lines, more videos than any data set"
            )
        text = path.read_text("utf-8-sig")
    except OSError as exc:
        raise VideoScoreError(f"{path}: cannot read annotations ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise VideoScoreError(f"{path}: annotations are not UTF-8 text ({exc.reason})") from None
    try:
        return _parse_annotations(path, text)
    except csv.Error as exc:
        raise VideoScoreError(f"{path}: malformed CSV ({_short(exc)})") from None


def _parse_annotations(path: Path, text: str) -> tuple[list[str], RowLabels | None]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise VideoScoreError(f"{path}: annotation / id file is empty")
    head = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    if "," in lines[0] and {"youtube_id", "time_start", "time_end"} <= set(head):
        rows = [
            {k.strip().lower(): v for k, v in r.items() if k is not None}
            for r in csv.DictReader(io.StringIO("\n".join(lines)))
        ]
        try:
            ids = [
                kinetics_clip_name(r["youtube_id"], r["time_start"], r["time_end"]) for r in rows
            ]
        except (KeyError, ValueError, TypeError) as exc:
            raise VideoScoreError(f"{path}: bad Kinetics CSV row ({exc})") from exc
        names = [str(r.get("label") or "").strip() for r in rows] if "label" in head else []
        return ids, (RowLabels(str(path), names=names) if any(names) else None)
    if "," in lines[0] and any(h in _ID_COLUMNS for h in head):
        col = next(h for h in _ID_COLUMNS if h in head)
        j = head.index(col)
        recs = [r for r in csv.reader(lines[1:]) if r]
        lab = next((h for h in ("label", "class", "class_name", "label_index") if h in head), None)
        labels = None
        if lab is not None:
            li = head.index(lab)
            labels = _labels_of([r[li] if li < len(r) else "" for r in recs], str(path))
        return [r[j].strip() for r in recs], labels
    # "path label" / "path total_frames label": the path may contain blanks (Kinetics class
    # folders do), so drop up to two trailing integer fields rather than split on blanks.
    ids, last = [], []
    for ln in lines:
        m = _LIST_LINE.match(ln.strip())
        assert m is not None  # the pattern matches any non-empty line
        ids.append(m["path"])
        nums = m["nums"].split()
        last.append(nums[-1] if nums else "")
    labels = None
    if all(last) and not any("," in v for v in last):
        labels = RowLabels(str(path), index=np.asarray([int(v) for v in last], np.int64))
    return ids, labels


# --------------------------------------------------------------------------- readers


def _load_npz(path: Path, bounds: ScoreBounds) -> VideoScores:
    check_npy(path, bounds)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise VideoScoreError(f"{path}: not a readable .npz file ({exc})") from exc
    with z:
        keys = list(z.files)
        if not keys:
            raise VideoScoreError(f"{path}: empty .npz file")
        if {"ids", "classes", "scores", "status"} <= set(keys):
            from avfuse.scores import ScoreFile

            sf = ScoreFile.load(path)
            ok = sf.has_scores
            notes = []
            if (~ok).any():
                notes.append(f"{int((~ok).sum())} rows without scores (status != ok) skipped")
            return VideoScores(
                sf.ids[ok].tolist(), sf.scores[ok], list(sf.classes), str(path), "probs", notes
            )
        arrays = {k: z[k] for k in keys}
    name = next((k for k in ("scores", "logits", "probs", "pred_score") if k in arrays), None)
    if name is None:
        two_d = [k for k, a in arrays.items() if a.ndim == 2 and a.dtype.kind in "fiu"]
        if len(two_d) != 1:
            raise VideoScoreError(
                f"{path}: cannot tell which array holds the scores (keys {keys}); name it 'scores'"
            )
        name = two_d[0]
    ids_key = next((k for k in ("ids", "video_ids", "names", "videos") if k in arrays), None)
    cls_key = next((k for k in ("classes", "class_names", "labels") if k in arrays), None)
    classes = None
    if cls_key is not None and arrays[cls_key].dtype.kind in "US":
        classes = [str(c) for c in arrays[cls_key].tolist()]
    ids = [str(i) for i in arrays[ids_key].tolist()] if ids_key else None
    kind: Literal["logits", "probs"] | None = None
    if name == "logits":
        kind = "logits"
    elif name == "probs":
        kind = "probs"
    return _with_ids(arrays[name], ids, classes, path, kind)


def _with_ids(
    scores: np.ndarray,
    ids: list[str] | None,
    classes: list[str] | None,
    path: Path,
    kind: Literal["logits", "probs"] | None = None,
) -> VideoScores:
    scores = np.asarray(scores)
    if scores.dtype.kind not in "fiu":
        raise VideoScoreError(f"{path}: scores are not numbers (dtype {scores.dtype})")
    if scores.ndim == 1 and scores.size == 0:
        raise VideoScoreError(f"{path}: no score rows (empty file)")
    if scores.ndim != 2:
        raise VideoScoreError(f"{path}: expected an (N, C) array, got shape {scores.shape}")
    # Placeholder ids: the caller must supply an id list or annotations for unnamed rows.
    return VideoScores(
        ids if ids is not None else [f"#{i}" for i in range(scores.shape[0])],
        scores,
        classes,
        str(path),
        kind,
        [] if ids is not None else ["unnamed rows"],
    )


def _load_npy(path: Path, bounds: ScoreBounds) -> VideoScores:
    check_npy(path, bounds)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise VideoScoreError(f"{path}: not a readable .npy array ({exc})") from exc
    return _with_ids(arr, None, None, path)


def _find(cols: list[str], names: Sequence[str]) -> str | None:
    low = {c.strip().lower(): c for c in cols}
    return next((low[n] for n in names if n in low), None)


def _load_csv(path: Path, bounds: ScoreBounds) -> VideoScores:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    # Lines (so cells) bounded before any parser holds one; the header's width before pandas
    # builds a frame of 10^6 columns.
    n_lines = check_lines(path, bounds.line_bytes)
    # pandas silently turns one extra field per row into an index column: check the widths.
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = csv.reader(fh, delimiter=sep)
            head = [r for _, r in zip(range(1000), rows, strict=False) if r]
    except csv.Error as exc:
        raise VideoScoreError(f"{path}: malformed CSV ({_short(exc)})") from None
    except UnicodeDecodeError as exc:
        raise VideoScoreError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if head and len(head[0]) > bounds.columns + len(_META_COLUMNS) + 1:
        raise VideoScoreError(
            f"{path}: the header has {len(head[0])} columns, over the {bounds.columns} "
            "the class list can need"
        )
    for n, r in enumerate(head[1:], start=2):
        if len(r) != len(head[0]):
            raise VideoScoreError(
                f"{path}: line {n} has {len(r)} fields, the header has {len(head[0])} "
                "(wrong column count)"
            )
    hcols = [str(c) for c in head[0]] if head else []
    long_layout = bool(
        _find(hcols, _CLASS_COLUMNS) and _find(hcols, _SCORE_COLUMNS) and len(hcols) <= 4
    )
    # Bounded before pandas builds a frame: a long table has a line per (video, class).
    most = bounds.cells if long_layout else bounds.rows
    if n_lines - 1 > most:
        raise VideoScoreError(
            f"{path}: {n_lines - 1} data lines, over the {most} the data set can need"
        )
    usecols = None
    if hcols and not long_layout and len(set(hcols)) == len(hcols):
        # Wide: pandas reads only the id / meta columns as text; the class columns are parsed
        # to numbers in one pass by _wide_numbers.
        hid = _find(hcols, _ID_COLUMNS) or hcols[0]
        usecols = [c for c in hcols if c == hid or c.strip().lower() in _META_COLUMNS]
    try:
        df = pd.read_csv(
            path, sep=sep, dtype=str, keep_default_na=False, index_col=False, usecols=usecols
        )
    except pd.errors.EmptyDataError as exc:
        raise VideoScoreError(f"{path}: empty CSV file") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise VideoScoreError(f"{path}: malformed CSV ({_short(exc)})") from None
    if len(df) > most:
        raise VideoScoreError(f"{path}: {len(df)} rows, over the {most} the data set needs")
    if df.empty:
        raise VideoScoreError(f"{path}: CSV has a header but no rows (empty file)")
    cols = hcols if usecols is not None else [str(c) for c in df.columns]
    id_col = _find(cols, _ID_COLUMNS) or cols[0]
    cls_col = _find(cols, _CLASS_COLUMNS)
    score_col = _find(cols, _SCORE_COLUMNS)

    if cls_col is not None and score_col is not None and len(cols) <= 4:
        # Long format: one (id, class, score) row per pair.
        ids = df[id_col].astype(str).str.strip()
        cl = df[cls_col].astype(str).str.strip()
        sc = _csv_numbers(df[[score_col]], path, "scores")[:, 0]
        pairs = pd.DataFrame({"id": ids, "cls": cl, "s": sc})
        dup = pairs.duplicated(["id", "cls"])
        if dup.any():
            first = pairs[dup].iloc[0]
            raise VideoScoreError(
                f"{path}: {int(dup.sum())} repeated (id, class) pairs "
                f"(e.g. {first['id']!r}, {first['cls']!r})"
            )
        wide = pairs.pivot(index="id", columns="cls", values="s")
        order = list(dict.fromkeys(ids.tolist()))
        wide = wide.loc[order]
        holes = int(wide.isna().sum().sum()) - int(np.isnan(sc).sum())
        if holes > 0:
            raise VideoScoreError(
                f"{path}: long-format CSV lacks {holes} (id, class) pairs; every video needs "
                "a score for every class"
            )
        # Names as avfuse's CSV writer escaped them for spreadsheets read back as they were.
        return VideoScores(
            [csv_uncell(str(i)) for i in order],
            wide.to_numpy(np.float64),
            [csv_uncell(str(c)) for c in wide.columns],
            str(path),
        )
    class_cols = [c for c in cols if c != id_col and c.strip().lower() not in _META_COLUMNS]
    if not class_cols:
        raise VideoScoreError(f"{path}: no score columns besides the id column {id_col!r}")
    keep = None
    n_rows = len(df)
    if "status" in [c.lower() for c in cols]:
        st = df[_find(cols, ("status",)) or "status"].astype(str)
        # The statuses that carry scores (``padded`` short clips too), as in our .npz files.
        keep = st.str.strip().isin(SCORED_STATUSES).to_numpy()
        df = df[keep]
    gt_col = _find(cols, ("gt_label", "gt", "target", "label_index"))
    return VideoScores(
        [csv_uncell(i) for i in df[id_col].astype(str).str.strip().tolist()],
        _wide_numbers(path, sep, cols, class_cols, keep, n_rows),
        [csv_uncell(c.strip()) for c in class_cols],
        str(path),
        labels=None if gt_col is None else _labels_of(df[gt_col].tolist(), str(path)),
    )


def _wide_numbers(
    path: Path,
    sep: str,
    cols: list[str],
    class_cols: list[str],
    keep: np.ndarray | None,
    n_rows: int,
) -> np.ndarray:
    """The class columns of a wide CSV as one ``(n_rows, C)`` float64 array, in one parse.

    pyarrow converts every column in C++ (pandas' per-column ``to_numeric`` plus a second
    pass for spelled-out NaN / inf took 3x the CPU time of reading an npz), streaming record
    batches into the result: no second full-size copy. A cell that is not a number is an
    error naming its column and data row.
    """
    import pyarrow as pa
    from pyarrow import csv as pacsv

    conv = pacsv.ConvertOptions(
        column_types={c: pa.float64() for c in class_cols},
        include_columns=class_cols,
        # Rows a status column leaves out (no score: avfuse writes their cells empty) may be
        # blank; a blank cell in a row that is read is refused below.
        null_values=[] if keep is None else [""],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    n_keep = n_rows if keep is None else int(keep.sum())
    arr = np.empty((n_keep, len(class_cols)), dtype=np.float64)
    row = out = 0
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(encoding="utf-8"),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=conv,
        )
        for batch in reader:
            m = batch.num_rows
            if row + m > n_rows:
                break
            sel = slice(None) if keep is None else keep[row : row + m]
            k = m if keep is None else int(sel.sum())  # type: ignore[union-attr]
            for j, name in enumerate(class_cols):
                col = batch.column(name)
                if col.null_count:
                    blank = col.is_null().to_numpy(zero_copy_only=False)[sel]
                    if blank.any():
                        kept = np.arange(m)[sel]  # batch rows that are read
                        first = int(kept[np.argmax(blank)])
                        raise VideoScoreError(
                            f"{path}: an empty score in column {name!r}, data row "
                            f"{row + first + 1}, whose status says it has scores"
                        )
                arr[out : out + k, j] = col.to_numpy(zero_copy_only=False)[sel]
            row += m
            out += k
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError) as exc:
        _raise_bad_cell(path, sep, class_cols, exc)
    if row != n_rows:
        raise VideoScoreError(f"{path}: malformed CSV (rows read twice disagree in number)")
    return arr


def _csv_numbers(values: pd.DataFrame, path: Path, what: str) -> np.ndarray:
    """Text cells ``(N, K)`` as float64 numbers; a cell that is not one is an error naming it."""
    arr = values.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    # NaN / inf spelled out are numbers (check_finite reports them); anything else is not.
    spelled = values.apply(lambda c: c.str.strip().str.lower().isin(_NONFINITE)).to_numpy()
    bad = np.isnan(arr) & ~spelled
    if bad.any():
        r, c = (int(x) for x in np.argwhere(bad)[0])
        raise VideoScoreError(
            f"{path}: {int(bad.sum())} non-numeric {what} (e.g. {str(values.iat[r, c])[:40]!r} "
            f"in column {str(values.columns[c])[:80]!r}, data row {r + 1})"
        )
    return arr


def _raise_bad_cell(path: Path, sep: str, class_cols: list[str], exc: Exception) -> None:
    """Find the first non-numeric cell (slow path, only on a bad file) and name it."""
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False)
    values = df[[c for c in df.columns if str(c) in class_cols]]
    try:
        _csv_numbers(values, path, "scores")
    except VideoScoreError as bad:
        raise bad from exc
    raise VideoScoreError(f"{path}: malformed CSV ({_short(exc)})") from exc


def _as_array(x: Any, limit: int | None = None, path: Path | None = None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    if limit is not None and isinstance(x, list | tuple) and len(x) > limit:
        raise VideoScoreError(f"{path}: a score vector of {len(x)} values, over {limit} classes")
    try:
        out = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise VideoScoreError(
            f"{path}: a score vector that is not numbers ({_short(exc)})"
        ) from None
    if limit is not None and out.size > limit:
        raise VideoScoreError(f"{path}: a score vector of {out.size} values, over {limit} classes")
    return out


def _load_pkl(path: Path, bounds: ScoreBounds) -> VideoScores:
    try:
        obj = load_pickle(path)
    except (UnsafePickleError, CorruptPickleError) as exc:
        raise VideoScoreError(str(exc)) from None  # names the file and any refused global
    except OSError as exc:
        raise VideoScoreError(f"{path}: cannot read the pickle ({exc})") from None
    if isinstance(obj, np.ndarray):
        bounds.check_array(path, "", obj.shape, obj.dtype)
        return _with_ids(obj, None, None, path)
    if not isinstance(obj, list | tuple) or not obj:
        raise VideoScoreError(f"{path}: expected a non-empty list of per-video scores")
    if len(obj) > bounds.rows:
        raise VideoScoreError(
            f"{path}: {len(obj)} items, over the {bounds.rows} the data set needs"
        )
    rows = []
    for i, item in enumerate(obj):
        if isinstance(item, dict):
            key = next((k for k in ("pred_score", "pred_scores", "scores") if k in item), None)
            if key is None:
                raise VideoScoreError(
                    f"{path}: item {i} is a dict without 'pred_score' (keys {sorted(item)})"
                )
            val = item[key]
            if isinstance(val, dict) and "item" in val:  # mmaction 1.0 LabelData
                val = val["item"]
            rows.append(_as_array(val, bounds.columns, path))
        else:
            rows.append(_as_array(item, bounds.columns, path))
    widths = Counter(len(r) for r in rows)
    if len(widths) != 1:
        raise VideoScoreError(f"{path}: score vectors of different lengths {dict(widths)}")
    vs = _with_ids(np.stack(rows), None, None, path)
    vs.labels = _dump_labels(obj, path)
    return vs


def _dump_labels(obj: Sequence[Any], path: Path) -> RowLabels | None:
    """``gt_label`` of each item of an mmaction2 dump: the model's class index of row ``i``."""
    out = []
    for item in obj:
        val = None
        if isinstance(item, dict):
            val = next((item[k] for k in ("gt_label", "gt_labels", "label") if k in item), None)
        if isinstance(val, dict) and "item" in val:  # mmaction 1.0 LabelData
            val = val["item"]
        if val is None:
            return None
        try:
            flat = _as_array(val, 1 << 16, path)
        except VideoScoreError:
            return None
        if flat.size != 1 or not np.isfinite(flat[0]):
            return None  # multi-label or missing: nothing to check against
        out.append(int(flat[0]))
    return RowLabels(str(path), index=np.asarray(out, dtype=np.int64))


@dataclass(frozen=True)
class ScoreReader:
    """One entry of :data:`READERS`: the file extensions (lower case, no dot) it is chosen by,
    and the function reading such a file within the data set's bounds."""

    extensions: tuple[str, ...]
    read: Callable[[Path, ScoreBounds], VideoScores]


# The score file formats: a new one is one entry; ``--video-format`` and detection read it.
READERS: Registry[ScoreReader] = Registry(
    "video score format",
    {
        "npz": ScoreReader(("npz",), _load_npz),
        "npy": ScoreReader(("npy",), _load_npy),
        "csv": ScoreReader(("csv", "tsv"), _load_csv),
        "pkl": ScoreReader(("pkl", "pickle"), _load_pkl),
    },
)
# A format name, or ``auto``: by the file's extension.
Format = Annotated[str, OneOf(READERS, extra=("auto",))]


def detect_format(path: str | Path) -> str:
    """The :data:`READERS` name of ``path`` by its extension."""
    ext = Path(path).suffix.lower().lstrip(".")
    for name, reader in READERS.items():
        if ext in reader.extensions:
            return name
    known = ", ".join(f".{e}" for reader in READERS.values() for e in reader.extensions)
    raise VideoScoreError(
        f"{path}: unknown score file type .{ext} (known: {known}); pass --video-format"
    )


def read_one(
    path: str | Path,
    fmt: Format = "auto",
    ids_file: str | Path | None = None,
    label_map: str | Path | None = None,
    bounds: ScoreBounds | None = None,
) -> VideoScores:
    """Read one file; unnamed rows take their ids from ``ids_file`` (ids or annotations).

    ``bounds``: the most rows and columns the data set can need (default: generous limits).
    """
    path = Path(path)
    bounds = bounds or ScoreBounds()
    if not path.exists():
        raise VideoScoreError(f"{path}: file not found")
    require_regular_file(path)
    if path.stat().st_size == 0:
        raise VideoScoreError(f"{path}: empty file")
    kind = detect_format(path) if fmt == "auto" else fmt
    vs = READERS.entry(kind).read(path, bounds)
    if "unnamed rows" in vs.notes:
        if ids_file is None:
            raise VideoScoreError(
                f"{path}: the file does not list its videos; give --video-ids (one id a line) "
                "or --annotations (the list the model was tested on)"
            )
        ids, ann_labels = read_annotations(ids_file)
        if len(ids) != vs.scores.shape[0]:
            raise VideoScoreError(
                f"{path}: {vs.scores.shape[0]} score rows but {len(ids)} videos in {ids_file}"
            )
        vs.ids = ids
        # Labels stored with the rows (a dump's gt_label) also test the list's line order;
        # the list's own labels only test the list and the label map.
        if vs.labels is None:
            vs.labels = ann_labels
        vs.notes = [n for n in vs.notes if n != "unnamed rows"] + [f"ids from {ids_file}"]
    if label_map is not None:
        # One class a line: bounded like the columns it names, before it is read whole.
        n_lines = check_lines(Path(label_map), 4 * bounds.text)
        if n_lines > bounds.columns:
            raise VideoScoreError(
                f"{label_map}: {n_lines} lines, over the {bounds.columns} classes a label map "
                "of this data set can name"
            )
        names = read_label_map(label_map)
        if vs.classes is None:
            if len(names) != vs.scores.shape[1]:
                raise VideoScoreError(
                    f"{path}: {vs.scores.shape[1]} score columns but {len(names)} classes in "
                    f"the label map {label_map}"
                )
            vs.classes = names
    return vs


def read_video_scores(
    paths: Sequence[str | Path],
    fmt: Format = "auto",
    ids_file: str | Path | None = None,
    label_map: str | Path | None = None,
    bounds: ScoreBounds | None = None,
) -> VideoScores:
    """Read and stack one or more score files (parts of one model's output).

    All parts must name the same classes (matched by name, so their column orders may differ).
    Ids are kept as written; duplicates across parts surface in :func:`match_ids`.
    """
    if not paths:
        raise VideoScoreError("no video score file given")
    parts = [read_one(p, fmt, ids_file, label_map, bounds) for p in paths]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    blocks = [first.scores]
    for p in parts[1:]:
        if (p.classes is None) != (first.classes is None):
            raise VideoScoreError(f"{p.source}: names its classes unlike {first.source}")
        if first.classes is not None and p.classes is not None:
            al = align_classes(
                p.classes, first.classes, n_columns=p.scores.shape[1], source=p.source
            )
            blocks.append(p.scores[:, al.columns])
        else:
            if p.scores.shape[1] != first.scores.shape[1]:
                raise VideoScoreError(
                    f"{p.source}: {p.scores.shape[1]} columns, {first.source} has "
                    f"{first.scores.shape[1]}"
                )
            blocks.append(p.scores)
    kinds = {p.kind for p in parts}
    return VideoScores(
        [i for p in parts for i in p.ids],
        np.concatenate(blocks),
        first.classes,
        " + ".join(p.source for p in parts),
        first.kind if len(kinds) == 1 else None,
        [n for p in parts for n in p.notes],
        _stack_labels(parts),
    )


def _stack_labels(parts: Sequence[VideoScores]) -> RowLabels | None:
    """Labels of several parts, index labels renumbered to the first part's columns."""
    labs = [p.labels for p in parts]
    if any(lb is None for lb in labs):
        return None
    source = " + ".join(lb.source for lb in labs if lb is not None)
    if all(lb is not None and lb.names is not None for lb in labs):
        return RowLabels(source, names=[n for lb in labs if lb and lb.names for n in lb.names])
    if not all(lb is not None and lb.index is not None for lb in labs):
        return None
    first, out = parts[0], []
    for p in parts:
        idx = p.labels.index  # type: ignore[union-attr]
        assert idx is not None
        if first.classes is not None and p.classes is not None and p is not first:
            al = align_classes(p.classes, first.classes, n_columns=p.scores.shape[1], source="")
            to_first = np.full(p.scores.shape[1], -1, dtype=np.int64)
            to_first[al.columns[al.columns >= 0]] = np.flatnonzero(al.columns >= 0)
            ok = (idx >= 0) & (idx < len(to_first))
            idx = np.where(ok, to_first[np.clip(idx, 0, len(to_first) - 1)], -1)
        out.append(idx)
    return RowLabels(source, index=np.concatenate(out))


def check_finite(scores: np.ndarray, ids: Sequence[str], source: str) -> None:
    """Raise naming the file and an example video when a score is NaN, infinite, or too
    large for float32 (the scores are fused in float32: such a value would become inf, and
    its row NaN)."""
    limit = float(np.finfo(np.float32).max)
    bad = np.zeros(scores.shape[0], dtype=bool)
    big = np.zeros(scores.shape[0], dtype=bool)
    for lo in range(0, scores.shape[0], _CHUNK):
        blk = scores[lo : lo + _CHUNK]
        bad[lo : lo + _CHUNK] = ~np.isfinite(blk).all(axis=1)
        if blk.dtype != np.float32:
            with np.errstate(invalid="ignore"):
                big[lo : lo + _CHUNK] = (np.abs(blk) > limit).any(axis=1)
    big &= ~bad
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VideoScoreError(
            f"{source}: {int(bad.sum())} row(s) with NaN or infinite scores "
            f"(e.g. row {i}, {ids[i]!r})"
        )
    if big.any():
        i = int(np.flatnonzero(big)[0])
        j = int(np.argmax(np.abs(scores[i])))
        raise VideoScoreError(
            f"{source}: {int(big.sum())} row(s) with scores beyond the float32 range "
            f"(e.g. row {i}, {ids[i]!r}: {float(scores[i, j]):.3g} in column {j}); "
            "rescale the scores"
        )


# Rows per block when a pass over an (N, C) matrix would otherwise allocate a full-size copy.
_CHUNK = 512


@dataclass
class LabelCheck:
    """How the labels a source gives its rows agree with the manifest (see :func:`check_labels`)."""

    source: str
    checked: int
    disagree: int
    examples: list[str]

    def report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "checked": self.checked,
            "disagree": self.disagree,
            "disagree_examples": self.examples[:5],
        }


def check_labels(
    labels: RowLabels,
    rows: np.ndarray,
    expected: np.ndarray,
    ids: Sequence[str],
    classes: Sequence[str],
    columns: np.ndarray,
    tolerance: float,
) -> LabelCheck:
    """Check a source's row labels against the manifest's, by class name.

    ``rows`` (M,): source row of each joined video; ``expected`` (M,): its manifest class
    index (``-1`` = unlabelled, not checked); ``ids`` (M,) its video_id; ``columns`` (C,): the
    source column of each class (:class:`ClassAlignment`), which also turns index labels
    (columns of the video model) into class names: a list or dump numbered in another class
    order than the label map given (or than the class list, when none is given) disagrees.
    More than ``tolerance`` of the checked videos disagreeing is an error with counts and
    examples.
    """
    rows = np.asarray(rows, dtype=np.int64)
    expected = np.asarray(expected, dtype=np.int64)
    if labels.names is not None:
        names = [labels.names[r] for r in rows]
        uniq = sorted({n for n in names if n})
        # Each name on its own: rows name classes, they do not claim columns from each other.
        to_ours = {n: match_class_names([n], list(classes))[0] for n in uniq}
        got = np.asarray([to_ours[n] if n else -2 for n in names], dtype=np.int64)
        said = names
    else:
        assert labels.index is not None
        idx = labels.index[rows]
        col_to_class = np.full(max(len(columns), int(columns.max(initial=-1)) + 1), -1, np.int64)
        have = columns >= 0
        col_to_class[columns[have]] = np.flatnonzero(have)
        inside = (idx >= 0) & (idx < len(col_to_class))
        got = np.where(inside, col_to_class[np.clip(idx, 0, len(col_to_class) - 1)], -1)
        got[idx < 0] = -2  # no label given for this row
        said = [f"label {int(i)}" for i in idx]
    check = (expected >= 0) & (got != -2)
    wrong = np.flatnonzero(check & (got != expected))
    examples = [
        f"{ids[i]}: {labels.source.rsplit('/', 1)[-1]} says {said[i]!r}"
        + (f" ({classes[got[i]]!r})" if labels.names is None and got[i] >= 0 else "")
        + f", the manifest {classes[expected[i]]!r}"
        for i in wrong[:5]
    ]
    res = LabelCheck(labels.source, int(check.sum()), len(wrong), examples)
    if len(wrong) > tolerance * max(res.checked, 1):
        raise VideoScoreError(
            f"{labels.source}: the labels given with the video scores disagree with the "
            f"manifest for {len(wrong)} of {res.checked} videos ({len(wrong) / res.checked:.1%};"
            f" tolerance {tolerance:.1%}), e.g. " + "; ".join(examples) + ". The rows do not "
            "belong to the videos they are joined to: check that the annotation list is in the "
            "order the scores were written, and that --video-label-map gives the model's class "
            "order (raise --label-tolerance to accept)"
        )
    return res
