"""The manifest: one record per video, keyed by a stable string ``video_id``.

Layout of a work folder (``WORK``)::

    WORK/manifest.parquet     one row per video (this module)
    WORK/classes.txt          the class list, one name a line; line number = model index
    WORK/scan.toml            the ScanConfig that produced the manifest
    WORK/extract.parquet      stage 1 results keyed by video_id (avfuse.extract)
    WORK/audio/SPLIT/CLASS/   extracted sound tracks
    WORK/features/            the feature store (avfuse.store)
    WORK/runs/NAME/           training runs (avfuse.train)
    WORK/scores/              score files (avfuse.scores)
    WORK/fusion/              fused scores and the report (avfuse.fuse)

``video_id`` is the path below the dataset root without its extension, with ``/`` separators:
``val/abseiling/ZzW2b8ZfnHM_000060_000070``. Two files with one stem in two classes are two
videos; if two files in one folder differ only by extension, both keep their extension in the id.
Ids that would still meet (names equal after Unicode normalisation, letter case or trailing dots and spaces) get a
``~HASH`` suffix from the file's path on disk, with a scan warning: no video is ever dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import logging
import math
import os
import posixpath
import stat
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from avfuse import __version__
from avfuse.config import Config, finished_run_settings, save_config
from avfuse.io import (
    atomic_write,
    csv_cell,
    error_reason,
    read_regular_text,
    read_table,
    table_metadata,
    terminal_safe,
    write_table,
)
from avfuse.labels import kinetics_clip_name, match_class_names, nfc, read_label_map
from avfuse.workdir import WorkDir

VIDEO_EXTENSIONS = (
    ".mp4",
    ".webm",
    ".mkv",
    ".avi",
    ".mov",
    ".m4v",
    ".flv",
    ".mpg",
    ".mpeg",
    ".3gp",
    ".ogv",
    ".wmv",
    ".ts",
)
# Audio-only datasets (ESC-50, UrbanSound8K, foley libraries) are scanned like videos.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
NO_LABEL = -1
# Feature statuses of the videos whose frames are in the feature store (a padded clip is
# stored unpadded and scored from one window padded by repetition): the videos a model trains
# on, embeds and scores. A score file's rows carry the same statuses; every other status has no
# features and a NaN score row.
SCORED_STATUSES = ("ok", "padded")
# Kinetics-700 calls its validation split "validate"; other datasets spell the splits out.
SPLIT_ALIASES = {
    "validate": "val",
    "valid": "val",
    "validation": "val",
    "training": "train",
    "testing": "test",
}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanConfig(Config):
    """How to find the videos of a dataset."""

    root: Path = field(
        metadata={"help": "dataset root holding SPLIT/CLASS/VIDEO files", "positional": True}
    )
    work: Path = field(
        default=Path("work"),
        metadata={"help": "work folder for the manifest and every later output", "flags": ("-o",)},
    )
    annotations: tuple[Path, ...] = field(
        default=(),
        metadata={
            "help": "Kinetics-style CSV(s) (label,youtube_id,time_start,time_end,split; "
            "comma-separated) instead of walking the tree"
        },
    )
    classes: Path | None = field(
        default=None,
        metadata={
            "help": "class list file, one name a line (order = model index); "
            "default: sorted class folders of the training split"
        },
    )
    train_split: str = field(default="train", metadata={"help": "split that defines the classes"})
    splits: tuple[str, ...] = field(
        default=(),
        metadata={"help": "splits to keep (default: every top-level folder / every CSV split)"},
    )
    extensions: tuple[str, ...] = field(
        default=MEDIA_EXTENSIONS,
        metadata={"help": "video and audio file extensions", "cli": False},
    )
    split_aliases: dict[str, str] = field(
        default_factory=lambda: dict(SPLIT_ALIASES),
        metadata={
            "help": "split names as distributed -> avfuse split (case-insensitive)",
            "cli": False,
        },
    )

    def __post_init__(self) -> None:
        # One file given the old way (a single path, or None for none) is still a list.
        if self.annotations is None:
            object.__setattr__(self, "annotations", ())
        elif isinstance(self.annotations, str | os.PathLike):
            object.__setattr__(self, "annotations", (Path(self.annotations),))


class UnknownClassError(ValueError):
    pass


_nfc = nfc


def read_class_list(path: str | Path) -> list[str]:
    """Read a label map (:func:`avfuse.labels.read_label_map`): one name a line, order kept."""
    return read_label_map(path)


def write_class_list(path: str | Path, classes: list[str]) -> None:
    """Write one name a line; a name that would not read back as itself is refused."""
    bad = [c for c in classes if not c or c != c.strip() or _breaks_a_line(c)]
    if bad:
        raise UnsafeNameError(f"class names that cannot be written one a line: {bad[:5]!r}")
    with atomic_write(Path(path)) as tmp:
        tmp.write_text("".join(c + "\n" for c in classes), "utf-8")


def load_classes(work: str | Path) -> list[str]:
    return read_class_list(WorkDir(work).classes)


class UnsafeNameError(ValueError):
    """A split, class or id that cannot be used in paths and one-name-a-line files."""


class AnnotationError(ValueError):
    """A Kinetics-style CSV that cannot be read; the message names the file and line."""


# Unicode line/paragraph separators end a line for str.splitlines() as surely as "\n".
_BREAKS = ("Cc", "Cs", "Zl", "Zp")


def name_problem(name: str, kind: str = "label") -> str | None:
    """Why ``name`` cannot be a split / class (``kind="label"``) or id component (``"file"``).

    Refused: empty names, ``/`` and ``\\``, ``..`` (anywhere in a label; as the whole component
    in a file name), control characters, line breaks, undecodable bytes (labels: every Unicode
    "C" category, the rule of label maps) and leading or trailing whitespace. Returns ``None``
    for a usable name.
    """
    if not name:
        return "empty name"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name in (".", ".."):
        return f"is {name!r}, a folder's name for itself or its parent"
    if kind == "label" and ".." in name:
        return "contains '..'"
    if name.isascii():  # the common case, without a look-up per character
        if not name.isprintable():
            return "contains control characters or line breaks"
    else:
        cats = {unicodedata.category(ch) for ch in name}
        if "Cs" in cats:
            return "is not valid UTF-8"
        if cats & set(_BREAKS) or (kind == "label" and any(c[0] == "C" for c in cats)):
            return "contains control characters or line breaks"
    if name != name.strip():
        return "has leading or trailing whitespace"
    return None


def _breaks_a_line(name: str) -> bool:
    # The rule of read_label_map (no "C" category) plus what str.splitlines() splits on.
    return any(
        unicodedata.category(ch) in _BREAKS or unicodedata.category(ch)[0] == "C" for ch in name
    )


def _shown(path: str | Path) -> str:
    # Names that cannot be written as UTF-8 (undecodable bytes) are shown escaped.
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


@dataclass
class _Scanned:
    """What a walk found: media files, and everything it could not use, with the reason."""

    files: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)  # path, rel, size
    warnings: list[dict[str, str]] = field(default_factory=list)

    def warn(self, path: str | Path, kind: str, reason: str) -> None:
        self.warnings.append({"path": _shown(path), "kind": kind, "reason": reason})


def _walk_tree(top: Path, exts: set[str], skip: Path, found: _Scanned, check_names: bool) -> None:
    """Every media file below ``top``, following symlinked folders once each (no loops).

    One ``stat`` per file: ``os.scandir`` entries cache it. Each real folder is walked once;
    a second way to it (a symlink loop, or two links to one folder) is a counted warning, as
    are unreadable folders, dangling symlinks, FIFOs/sockets/devices and folders named like
    media files. ``skip`` (the work folder, when it lies inside the dataset) is not walked.
    """
    top_real = os.path.realpath(top)
    seen: dict[str, str] = {top_real: str(top)}
    stack: list[tuple[str, str, tuple[str, ...]]] = [(str(top), top_real, ())]
    skip_real = os.path.realpath(skip)
    while stack:
        dpath, dreal, drel = stack.pop()
        try:
            with os.scandir(dpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            found.warn(dpath, "unreadable_folder", error_reason(exc))
            continue
        subdirs: list[tuple[str, str, tuple[str, ...]]] = []
        for e in entries:
            name = nfc(e.name)
            ext = os.path.splitext(name)[1].lower()
            try:
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
            except OSError as exc:
                found.warn(e.path, "unreadable", error_reason(exc))
                continue
            if is_dir:
                if name.startswith(".") and check_names:
                    # Hidden (.git, .ipynb_checkpoints, a trash folder): not split, class or
                    # part of an id; listed so nothing inside is lost unseen.
                    found.warn(
                        e.path, "hidden", "a hidden folder (name starts with '.'); not scanned"
                    )
                    continue
                real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(dreal, e.name)
                if real == skip_real:
                    found.warn(e.path, "work_folder", "the work folder itself is not scanned")
                    continue
                if real in seen:
                    loop = dreal == real or dreal.startswith(real + os.sep)
                    found.warn(
                        e.path,
                        "symlink_loop" if loop else "duplicate_folder",
                        f"{'a loop back to' if loop else 'already scanned as'} {_shown(seen[real])}",
                    )
                    continue
                # Split and class folders are checked where they name a row (an error there);
                # a deeper folder only adds to ids, so one with an unusable name is skipped.
                if check_names and len(drel) >= 2 and (problem := name_problem(name, "file")):
                    found.warn(e.path, "unsafe_name", f"folder name {problem}; not scanned")
                    continue
                seen[real] = e.path
                if ext in exts:
                    found.warn(e.path, "folder_named_like_media", f"a folder, not a {ext} file")
                subdirs.append((e.path, real, (*drel, name)))
            elif is_file:
                if ext not in exts:
                    if os.path.splitext(name.rstrip(". \t"))[1].lower() in exts:
                        # "clip.mp4 " or "clip.mp4.": a video whose name was mangled in a
                        # copy; listed so it is not lost unseen.
                        found.warn(
                            e.path,
                            "unsafe_name",
                            f"extension {ext!r} has trailing dots or spaces; not listed",
                        )
                    continue
                if name.startswith("."):
                    # Hidden: macOS "._" resource forks and editors' temporaries, not videos.
                    # Never silently: a real video named so is listed for the user to rename.
                    found.warn(e.path, "hidden", _HIDDEN_REASON)
                    continue
                stem = os.path.splitext(name)[0]
                problem = name_problem(stem, "file") if check_names else None
                if problem:
                    found.warn(e.path, "unsafe_name", f"file name {problem}; not listed")
                    continue
                try:
                    size = e.stat().st_size
                except OSError as exc:
                    found.warn(e.path, "unreadable", error_reason(exc))
                    continue
                found.files.append((e.path, (*drel, name), size))
            else:
                found.warn(e.path, *_odd_entry(e))
        stack.extend(reversed(subdirs))


_HIDDEN_REASON = "a hidden file (name starts with '.'); not listed: rename it to include it"


def _odd_entry(e: os.DirEntry[str]) -> tuple[str, str]:
    """(kind, reason) for an entry that is neither a file nor a folder."""
    try:
        mode = e.stat().st_mode
    except FileNotFoundError:
        return "dangling_symlink", f"points to {_shown(os.readlink(e.path))}, which does not exist"
    except OSError as exc:
        return ("symlink_loop" if exc.errno == errno.ELOOP else "unreadable"), error_reason(exc)
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind, f"a {kind}, not a regular file"
    return "special_file", "not a regular file or folder"


def _aliases(cfg: ScanConfig) -> dict[str, str]:
    return {k.casefold(): v for k, v in cfg.split_aliases.items()}


def _split_name(raw: str, aliases: dict[str, str]) -> str:
    """The avfuse split of a split as distributed (``aliases`` from :func:`_aliases`)."""
    return aliases.get(raw.casefold(), raw)


def _walk(root: Path, cfg: ScanConfig, found: _Scanned) -> list[dict[str, object]]:
    exts = {e.lower() for e in cfg.extensions}
    _walk_tree(root, exts, Path(cfg.work), found, check_names=True)
    aliases = _aliases(cfg)
    checked: set[tuple[str, ...]] = set()  # split and class folders already found usable
    rows: list[dict[str, object]] = []
    for path, rel, size in found.files:
        if len(rel) < 2:
            found.warn(path, "outside_split", "a file directly under the root, not in a split")
            continue
        if rel[:1] not in checked:
            if problem := name_problem(rel[0]):
                raise UnsafeNameError(f"split folder {_shown(root / rel[0])!r}: name {problem}")
            checked.add(rel[:1])
        split = _split_name(rel[0], aliases)
        if cfg.splits and split not in cfg.splits:
            continue
        label = rel[1] if len(rel) >= 3 else None
        if label is not None and rel[:2] not in checked:
            if problem := name_problem(label):
                raise UnsafeNameError(
                    f"class folder {_shown(root / rel[0] / rel[1])!r}: name {problem}; rename it"
                )
            checked.add(rel[:2])
        rows.append(
            {"split": split, "label": label, "path": path, "rel": "/".join(rel), "size": size}
        )
    return rows


_CSV_REQUIRED = ("youtube_id", "time_start", "time_end")


MAX_CLIP_TIME = 1e6


def _csv_time(value: str, column: str, where: str) -> float:
    text = value.strip()
    if not text:
        raise AnnotationError(f"{where}: empty {column}")
    try:
        t = float(text)
    except ValueError:
        raise AnnotationError(f"{where}: {column} {text!r} is not a number") from None
    # A clip of a video over 10^6 s (11 days) long is no clip of any real video; larger values
    # would name files no downloader writes.
    if not math.isfinite(t) or t < 0 or t > MAX_CLIP_TIME:
        raise AnnotationError(f"{where}: {column} {text!r} is not a time in seconds")
    return t


def _csv_records(csv_path: Path, cfg: ScanConfig) -> list[tuple[str, str | None, str, str]]:
    """(split, label, clip stem, where) per row of one Kinetics-style annotation file.

    Header lines may repeat (files concatenated with ``cat``) and change columns (a test file
    without labels appended); ``label`` and ``split`` are optional, other columns (``is_cc``)
    are ignored. A row that cannot be used is an :class:`AnnotationError` naming file and line.
    """
    default_split = csv_path.stem.rsplit("_", 1)[-1]  # kinetics700_2020_validate -> validate
    aliases = _aliases(cfg)
    out: list[tuple[str, str | None, str, str]] = []
    try:
        text = read_regular_text(csv_path, "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{csv_path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise AnnotationError(f"{csv_path}: cannot read the annotation file ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    cols: dict[str, int] | None = None
    end = 0
    try:
        for row in reader:
            # A quoted field may span lines: name the line the row starts on.
            where, end = f"{csv_path}:{end + 1}", reader.line_num
            if not any(c.strip() for c in row):
                continue
            cells = [c.strip().lower() for c in row]
            if "youtube_id" in cells:
                missing = [c for c in _CSV_REQUIRED if c not in cells]
                if missing:
                    raise AnnotationError(f"{where}: missing column(s) {', '.join(missing)}")
                cols = {c: i for i, c in enumerate(cells)}
                continue
            if cols is None:
                raise AnnotationError(
                    f"{where}: no header line before the data "
                    "(expected label,youtube_id,time_start,time_end,split)"
                )
            if len(row) < len(cols):
                raise AnnotationError(f"{where}: {len(row)} fields, the header has {len(cols)}")
            yt = row[cols["youtube_id"]]
            if problem := name_problem(yt, "file"):
                raise AnnotationError(f"{where}: youtube_id {yt!r} {problem}")
            t0 = _csv_time(row[cols["time_start"]], "time_start", where)
            t1 = _csv_time(row[cols["time_end"]], "time_end", where)
            if t1 <= t0:
                raise AnnotationError(f"{where}: time_end {t1:g} is not after time_start {t0:g}")
            label = nfc(row[cols["label"]]) if "label" in cols else ""
            if label and (problem := name_problem(label)):
                raise AnnotationError(f"{where}: label {label!r} {problem}")
            raw_split = nfc(row[cols["split"]]) if "split" in cols else default_split
            if not raw_split:
                raise AnnotationError(f"{where}: empty split")
            split = _split_name(raw_split, aliases)
            if problem := name_problem(split):
                raise AnnotationError(f"{where}: split {split!r} {problem}")
            out.append((split, label or None, kinetics_clip_name(yt, t0, t1), where))
    except csv.Error as exc:
        raise AnnotationError(f"{csv_path}:{reader.line_num}: {exc}") from None
    if cols is None:
        raise AnnotationError(f"{csv_path}: no header line with youtube_id,time_start,time_end")
    return out


def _from_csv(root: Path, cfg: ScanConfig, found: _Scanned) -> list[dict[str, object]]:
    exts = {e.lower() for e in cfg.extensions}
    # One walk, then dictionary look-ups: ~400k stat() calls on a network filesystem are slow.
    _walk_tree(root, exts, Path(cfg.work), found, check_names=False)
    index: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    for f in found.files:
        index.setdefault(os.path.splitext(f[1][-1])[0], []).append(f)
    aliases = _aliases(cfg)
    rows: list[dict[str, object]] = []
    first: dict[tuple[str, str | None, str], str] = {}
    labelled: dict[tuple[str, str], tuple[str | None, str]] = {}
    used: set[str] = set()
    for csv_path in cfg.annotations:
        for split, label, stem, where in _csv_records(Path(csv_path), cfg):
            if cfg.splits and split not in cfg.splits:
                continue
            key = (split, label, stem)
            if key in first:
                found.warn(where, "duplicate_row", f"the same clip as {first[key]}")
                continue
            first[key] = where
            other = labelled.setdefault((split, stem), (label, where))
            if other[0] != label:
                found.warn(
                    where,
                    "label_conflict",
                    f"the same clip as {other[1]} under another label ({other[0]!r}); "
                    "kept under both",
                )
            # Prefer a file under ROOT/SPLIT/... (the split as written or as aliased), then one
            # in a folder named like its label (a clip filed under two labels keeps each
            # file), then any.
            cands = sorted(
                index.get(stem, []),
                key=lambda f: (
                    not f[1][:-1] or _split_name(f[1][0], aliases) != split,
                    len(f[1]) < 2 or nfc(f[1][-2]) != label,
                    f[0],
                ),
            )
            path, _, size = cands[0] if cands else ("", (), -1)
            used.add(path)
            rel = f"{split}/{label}/{stem}" if label else f"{split}/{stem}"
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "path": path,
                    "rel": rel + (os.path.splitext(path)[1] if path else ""),
                    "size": size,
                }
            )
    unused = sum(1 for f in found.files if f[0] not in used)
    if unused:
        log.info("%d media files under %s are not in the annotation files", unused, root)
    return rows


def _assign_ids(rows: list[dict[str, object]], root: Path, found: _Scanned) -> None:
    """Give every row a ``video_id`` unique by construction (see the module docstring).

    Two files may still meet in one id: names equal after Unicode normalisation (``café``
    precomposed and decomposed), names differing only in letter case (one file on a
    case-insensitive work folder), names differing only in trailing dots or spaces of a path
    part (``a.`` and ``a`` are one file on Windows and SMB shares), or the scheme itself (``a.mp4`` beside ``a.mp4.mkv``). Every
    member of such a group keeps its video, under its path without extension plus ``~`` and 8
    hex digits of a hash of its file's path as stored on disk: stable across runs, different
    within the group (a file already named like such an id gets a longer hash). Each is listed
    in the scan warnings (kind ``id_collision``).
    """
    stems = [posixpath.splitext(str(r["rel"]))[0] for r in rows]
    counts = Counter(stems)
    ids = [
        stem if counts[stem] == 1 else str(r["rel"]) for r, stem in zip(rows, stems, strict=True)
    ]
    first: dict[int, tuple[str, list[int]]] = {}  # row -> (the id it first met on, the group)
    for digits in (8, 16, 40):
        groups: dict[str, list[int]] = {}
        for i, vid in enumerate(ids):
            groups.setdefault(_id_key(vid), []).append(i)
        colliding = [m for m in groups.values() if len(m) > 1]
        if not colliding:
            break
        for members in colliding:
            met = ids[members[0]]
            for i in members:
                first.setdefault(i, (met, members))
                ids[i] = f"{stems[i]}~{_path_hash(rows[i], root)[:digits]}"
    else:
        dup = [k for k, n in Counter(_id_key(v) for v in ids).items() if n > 1]
        raise UnsafeNameError(f"video ids that cannot be told apart: {dup[:5]!r}; rename the files")
    for i, (met, members) in sorted(first.items()):
        others = ", ".join(
            _shown(str(rows[j]["path"] or rows[j]["rel"])) for j in members if j != i
        )
        found.warn(
            str(rows[i]["path"] or rows[i]["rel"]),
            "id_collision",
            f"same video id {met!r} as {others} (names equal after Unicode normalisation "
            f"or letter case, trailing dots or spaces, or by the id scheme); kept as {ids[i]!r}",
        )
    for r, vid in zip(rows, ids, strict=True):
        r["video_id"] = vid


def _id_key(vid: str) -> str:
    """What two ids must differ in to stay two files on every file system a work folder may
    live on: Unicode normalisation and letter case (macOS, Windows, SMB) and trailing dots and
    spaces of each path part (Windows and SMB drop them: ``a.`` and ``a`` are one file)."""
    return "/".join(part.rstrip(". ") or part for part in nfc(vid).casefold().split("/"))


def _path_hash(row: dict[str, object], root: Path) -> str:
    path = str(row["path"])
    raw = os.fsencode(os.path.relpath(path, root)) if path else str(row["rel"]).encode()
    digest = hashlib.sha1(raw + b"\0" + str(row["rel"]).encode(), usedforsecurity=False)
    return digest.hexdigest()


def _write_warnings(path: Path, warnings: list[dict[str, str]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "kind", "reason"])
        w.writeheader()
        # Read in terminals and spreadsheets: no escape sequence of a file name reaches one.
        w.writerows({k: csv_cell(terminal_safe(v)) for k, v in row.items()} for row in warnings)


def scan(cfg: ScanConfig) -> pd.DataFrame:
    """Walk a dataset (or read its annotation CSVs) and write ``WORK/manifest.parquet``.

    Returns the manifest: columns ``video_id, split, label, label_index, path, size_bytes,
    scan_status`` (``found`` or ``missing``, the latter only for CSV rows with no file).
    Folder names are matched to the class list by :func:`avfuse.labels.match_class_names`
    (``air_drumming`` finds ``air drumming``); ``label`` is the class list's spelling.
    Everything found but not usable (unreadable folders, dangling symlinks, FIFOs, symlink
    loops, unsafe file names ...) is listed in ``WORK/scan_warnings.csv`` (``path, kind,
    reason``), counted in the log and kept in ``df.attrs["scan_warnings"]``.
    Raises :class:`UnknownClassError` naming any label outside the class list,
    :class:`UnsafeNameError` for a split or class folder whose name cannot be used, and
    :class:`AnnotationError` naming the file and line of a bad CSV row.
    """
    root = Path(cfg.root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    found = _Scanned()
    rows = _from_csv(root, cfg, found) if cfg.annotations else _walk(root, cfg, found)
    if not rows:
        if cfg.annotations:
            raise ValueError(f"no rows in {', '.join(map(str, cfg.annotations))}")
        looked = " ".join(sorted({e.lower() for e in cfg.extensions}))
        raise ValueError(
            f"no videos or audio files found under {root} (looked for {looked}); to look for "
            'others, list every extension wanted: --set \'extensions=[".mp4", ".xyz"]\' '
            "(in avfuse run: --set 'scan.extensions=[...]')"
        )
    _assign_ids(rows, root, found)

    if cfg.classes:
        classes = read_class_list(cfg.classes)
    else:
        classes = sorted(
            {str(r["label"]) for r in rows if r["split"] == cfg.train_split and r["label"]}
        )
        if not classes:
            raise ValueError(f"no labelled videos in split {cfg.train_split!r}; pass --classes")
    names = sorted({str(r["label"]) for r in rows if r["label"]})
    matched = dict(zip(names, match_class_names(names, classes), strict=True))
    per_name = Counter(str(r["label"]) for r in rows if r["label"])
    unknown = {n: per_name[n] for n, i in matched.items() if i < 0}
    if unknown:
        top = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        shown = ", ".join(f"{name!r} ({n} videos)" for name, n in top)
        raise UnknownClassError(f"{len(unknown)} class(es) not in the class list: {shown}")
    loose = {n: classes[i] for n, i in matched.items() if classes[i] != n}
    if loose:
        log.info(
            "%d folder/label names matched to the class list by the loose rule, e.g. %s",
            len(loose),
            ", ".join(f"{a!r} -> {b!r}" for a, b in list(loose.items())[:3]),
        )

    for r in rows:
        r["label_index"] = matched[str(r["label"])] if r["label"] else NO_LABEL
        r["label"] = classes[int(r["label_index"])] if r["label"] else None  # type: ignore[call-overload]
    df = pd.DataFrame(rows)
    df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
    df["size_bytes"] = df["size"].astype("int64")  # from the walk's one stat per file
    df["scan_status"] = ["found" if p else "missing" for p in df["path"]]
    df = df[["video_id", "split", "label", "label_index", "path", "size_bytes", "scan_status"]]
    df = df.sort_values("video_id").reset_index(drop=True)

    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    existing = WorkDir(work).classes
    if existing.exists() and read_class_list(existing) != classes:
        raise ValueError(
            f"{existing} holds a different class list; use a new work folder "
            "(outputs of later stages depend on the class order)"
        )
    write_class_list(existing, classes)
    write_table(
        df,
        WorkDir(work).manifest,
        {"avfuse_version": __version__, "root": str(root), "num_classes": str(len(classes))},
    )
    _write_warnings(WorkDir(work).scan_warnings, found.warnings)
    save_config(dataclasses.replace(cfg, root=root), WorkDir(work).scan_config)
    per_split = ", ".join(f"{k}: {v}" for k, v in df["split"].value_counts().sort_index().items())
    missing = int((df["scan_status"] == "missing").sum())
    log.info(
        "%d videos (%s) in %d classes%s -> %s",
        len(df),
        per_split,
        len(classes),
        f", {missing} listed but missing on disk" if missing else "",
        WorkDir(work).manifest,
    )
    if found.warnings:
        kinds = Counter(w["kind"] for w in found.warnings)
        log.warning(
            "%d scan warning(s) (%s), listed in %s; first: %s (%s)",
            len(found.warnings),
            ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
            WorkDir(work).scan_warnings,
            found.warnings[0]["path"],
            found.warnings[0]["reason"],
        )
    df.attrs["scan_warnings"] = found.warnings
    return df


def load_manifest(
    work: str | Path, stages: bool = True, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Read the manifest; with ``stages``, join every stage table found (keyed by video_id).

    ``columns`` reads only those manifest columns (Kinetics-size bookkeeping reads a few).
    """
    wd = WorkDir(work)
    path = wd.manifest
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `avfuse scan ROOT -o {work}` first")
    df = read_table(path, columns)
    if stages:
        for p in (wd.extract_table, wd.features_table):
            if p.exists():
                other = read_table(p)
                cols = ["video_id"] + [c for c in other.columns if c not in df.columns]
                df = df.merge(other[cols], on="video_id", how="left")
    return df


def manifest_root(work: str | Path) -> str:
    return table_metadata(WorkDir(work).manifest).get("root", "")


def videos_of_files(work: str | Path, root: str | Path, files: set[str]) -> list[str]:
    """The ``video_id`` of every manifest video whose file is one of ``files`` (POSIX paths
    relative to the dataset ``root``), in manifest order."""
    man = load_manifest(work, stages=False, columns=("video_id", "path"))
    return [
        str(v)
        for v, p in zip(man["video_id"], man["path"], strict=True)
        if isinstance(p, str) and p and Path(os.path.relpath(p, root)).as_posix() in files
    ]


# ---------------------------------------------------------------------------------------------
# What the orchestrator asks of the scan: its outputs and whether they are done.


def outputs(cfg: ScanConfig) -> list[Path]:
    """The files a finished scan leaves: the manifest and the class list."""
    wd = WorkDir(cfg.work)
    return [wd.manifest, wd.classes]


def is_done(cfg: ScanConfig) -> bool:
    """Whether the outputs are there to be read."""
    return all(p.exists() for p in outputs(cfg))


def finished_settings(cfg: ScanConfig) -> ScanConfig | None:
    """The settings of the scan whose outputs are in place (``None``: none, or unreadable)."""
    return finished_run_settings(ScanConfig, WorkDir(cfg.work).scan_config, outputs(cfg))
