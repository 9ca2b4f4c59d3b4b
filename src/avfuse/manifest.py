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
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from avfuse import __version__
from avfuse.config import Config, save_config
from avfuse.io import atomic_write, read_table, table_metadata, write_table
from avfuse.labels import kinetics_clip_name, nfc, read_label_map

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
MANIFEST = "manifest.parquet"
CLASSES = "classes.txt"
NO_LABEL = -1
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
    annotations: Path | None = field(
        default=None,
        metadata={
            "help": "Kinetics-style CSV (label,youtube_id,time_start,time_end,"
            "split) instead of walking the tree"
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
        default=VIDEO_EXTENSIONS, metadata={"help": "video file extensions", "cli": False}
    )


class UnknownClassError(ValueError):
    pass


_nfc = nfc


def read_class_list(path: str | Path) -> list[str]:
    """Read a label map (:func:`avfuse.labels.read_label_map`): one name a line, order kept."""
    return read_label_map(path)


def write_class_list(path: str | Path, classes: list[str]) -> None:
    with atomic_write(Path(path)) as tmp:
        tmp.write_text("".join(c + "\n" for c in classes), "utf-8")


def load_classes(work: str | Path) -> list[str]:
    return read_class_list(Path(work) / CLASSES)


def _walk(root: Path, cfg: ScanConfig) -> list[dict[str, object]]:
    exts = {e.lower() for e in cfg.extensions}
    rows: list[dict[str, object]] = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        split = _nfc(split_dir.name)
        if cfg.splits and split not in cfg.splits:
            continue
        for path in sorted(split_dir.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in exts or path.name.startswith("."):
                continue
            rel = path.relative_to(root)
            parts = rel.parts
            label = _nfc(parts[1]) if len(parts) >= 3 else None
            rows.append(
                {"split": split, "label": label, "path": str(path), "rel": _nfc(rel.as_posix())}
            )
    return rows


def _from_csv(root: Path, cfg: ScanConfig, csv_path: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    index: dict[str, list[Path]] = {}
    exts = {e.lower() for e in cfg.extensions}
    # One walk, then dictionary look-ups: ~400k stat() calls on a network filesystem are slow.
    for p in root.rglob("*"):
        if p.suffix.lower() in exts and p.is_file():
            index.setdefault(p.stem, []).append(p)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for rec in csv.DictReader(fh):
            split = _nfc(rec.get("split") or csv_path.stem)
            if cfg.splits and split not in cfg.splits:
                continue
            label = _nfc(rec.get("label") or "") or None
            stem = kinetics_clip_name(rec["youtube_id"], rec["time_start"], rec["time_end"])
            cands = index.get(stem, [])
            # Prefer a file under ROOT/SPLIT/..., then any.
            cands = sorted(cands, key=lambda p: (split not in p.relative_to(root).parts, str(p)))
            path = cands[0] if cands else None
            rel = f"{split}/{label}/{stem}" if label else f"{split}/{stem}"
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "path": str(path) if path else "",
                    "rel": rel + (path.suffix if path else ""),
                }
            )
    return rows


def _assign_ids(rows: list[dict[str, object]]) -> None:
    stems = [posixpath.splitext(str(r["rel"]))[0] for r in rows]
    counts = Counter(stems)
    for r, stem in zip(rows, stems, strict=True):
        r["video_id"] = stem if counts[stem] == 1 else str(r["rel"])


def scan(cfg: ScanConfig) -> pd.DataFrame:
    """Walk a dataset (or read its annotation CSV) and write ``WORK/manifest.parquet``.

    Returns the manifest: columns ``video_id, split, label, label_index, path, size_bytes,
    scan_status`` (``found`` or ``missing``, the latter only for CSV rows with no file).
    Raises :class:`UnknownClassError` naming any label outside the class list.
    """
    root = Path(cfg.root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    rows = _from_csv(root, cfg, Path(cfg.annotations)) if cfg.annotations else _walk(root, cfg)
    if not rows:
        raise ValueError(f"no videos found under {root}")
    _assign_ids(rows)

    if cfg.classes:
        classes = read_class_list(cfg.classes)
    else:
        classes = sorted(
            {str(r["label"]) for r in rows if r["split"] == cfg.train_split and r["label"]}
        )
        if not classes:
            raise ValueError(f"no labelled videos in split {cfg.train_split!r}; pass --classes")
    index = {c: i for i, c in enumerate(classes)}
    unknown = Counter(str(r["label"]) for r in rows if r["label"] and r["label"] not in index)
    if unknown:
        shown = ", ".join(f"{name!r} ({n} videos)" for name, n in unknown.most_common(10))
        raise UnknownClassError(f"{len(unknown)} class(es) not in the class list: {shown}")

    df = pd.DataFrame(rows)
    df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
    df["label_index"] = [index[str(x)] if x else NO_LABEL for x in df["label"]]
    df["size_bytes"] = [Path(str(p)).stat().st_size if p else -1 for p in df["path"]]
    df["scan_status"] = ["found" if p else "missing" for p in df["path"]]
    df = df[["video_id", "split", "label", "label_index", "path", "size_bytes", "scan_status"]]
    df = df.sort_values("video_id").reset_index(drop=True)

    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    existing = work / CLASSES
    if existing.exists() and read_class_list(existing) != classes:
        raise ValueError(
            f"{existing} holds a different class list; use a new work folder "
            "(outputs of later stages depend on the class order)"
        )
    write_class_list(existing, classes)
    write_table(
        df,
        work / MANIFEST,
        {"avfuse_version": __version__, "root": str(root), "num_classes": str(len(classes))},
    )
    save_config(dataclasses.replace(cfg, root=root), work / "scan.toml")
    per_split = ", ".join(f"{k}: {v}" for k, v in df["split"].value_counts().sort_index().items())
    missing = int((df["scan_status"] == "missing").sum())
    log.info(
        "%d videos (%s) in %d classes%s -> %s",
        len(df),
        per_split,
        len(classes),
        f", {missing} listed but missing on disk" if missing else "",
        work / MANIFEST,
    )
    return df


def load_manifest(work: str | Path, stages: bool = True) -> pd.DataFrame:
    """Read the manifest; with ``stages``, join every stage table found (keyed by video_id)."""
    work = Path(work)
    path = work / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `avfuse scan ROOT -o {work}` first")
    df = read_table(path)
    if stages:
        for name in ("extract", "features"):
            p = work / f"{name}.parquet"
            if p.exists():
                other = read_table(p)
                cols = ["video_id"] + [c for c in other.columns if c not in df.columns]
                df = df.merge(other[cols], on="video_id", how="left")
    return df


def manifest_root(work: str | Path) -> str:
    return table_metadata(Path(work) / MANIFEST).get("root", "")
