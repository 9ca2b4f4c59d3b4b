"""A generated work folder (manifest, classes and a feature store) for tests without media."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.melspec import FrontendConfig
from avfuse.store import ShardWriter, commit_index, write_meta
from avfuse.workdir import WorkDir


def make_synthetic_work(
    work: str | Path,
    n_classes: int = 4,
    videos_per_class: int = 8,
    splits: Sequence[str] = ("train", "val"),
    frames_range: tuple[int, int] = (150, 400),
    n_mels: int = 64,
    example_frames: int = 96,
    noise: float = 1.0,
    seed: int = 0,
    structured: bool = True,
    event_frames: int = 0,
) -> pd.DataFrame:
    """Write a small generated work folder: manifest, classes.txt and a feature store.

    The store states a VGGish-like front end of ``n_mels`` bands and ``example_frames``.

    For tests without media. Each class is a (band group, pattern)
    pair; with ``structured`` the patterns are an upward sweep, a downward sweep, fast pulses
    and slow pulses over the same bands. Sweeps in both directions (and pulses at both rates)
    give the same per-band mean and std over a video, so a classifier on those statistics
    cannot separate them, while a model that sees time-frequency structure can.
    ``event_frames > 0`` confines the pattern to one segment of that many frames at a random
    place in each video (the rest is noise), like a sound that is heard once in a clip.
    Returns the manifest (``video_id, split, label, label_index, path, ...``).
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = 4 if structured else 1
    groups = -(-n_classes // patterns)
    band_w = max(4, n_mels // max(groups, 1) // 2)
    classes = [f"class_{k:02d}" for k in range(n_classes)]
    rows = []
    writer = ShardWriter(work / "features", n_mels=n_mels, dtype="float16", max_mb=0.5)
    for split in splits:
        for k, name in enumerate(classes):
            g, pat = divmod(k, patterns) if structured else (k, 0)
            lo = (g * 2 * band_w) % max(n_mels - band_w, 1)
            for j in range(videos_per_class):
                t = int(rng.integers(frames_range[0], frames_range[1] + 1))
                x = -4.0 + noise * rng.standard_normal((t, n_mels))
                background = x.copy() if event_frames else None
                tt = np.arange(t)
                phase = rng.uniform(0, 1)
                if pat in (0, 1):
                    # One sweep across the band group every 48 frames.
                    pos = ((tt / 48.0 + phase) % 1.0) * band_w
                    band = lo + (pos if pat == 0 else band_w - 1 - pos).astype(int)
                    x[tt, np.clip(band, 0, n_mels - 1)] += 4.0
                    x[tt, np.clip(band + 1, 0, n_mels - 1)] += 4.0
                else:
                    period = 8 if pat == 2 else 32
                    on = ((tt / period + phase) % 1.0) < 0.5
                    x[np.ix_(on, np.arange(lo, min(lo + band_w, n_mels)))] += 2.0
                if background is not None:
                    start = int(rng.integers(0, max(t - event_frames, 0) + 1))
                    outside = np.ones(t, bool)
                    outside[start : start + event_frames] = False
                    x[outside] = background[outside]
                vid = f"{split}/{name}/v{j:03d}"
                writer.add(vid, x.astype(np.float32))
                rows.append(
                    {
                        "video_id": vid,
                        "split": split,
                        "label": name,
                        "label_index": k,
                        "path": f"/nonexistent/{vid}.mp4",
                        "size_bytes": 0,
                        "scan_status": "found",
                    }
                )
    index_rows = writer.close()
    write_meta(
        work / "features",
        frontend=FrontendConfig(n_mels=n_mels, example_frames=example_frames),
        classes=classes,
        dtype="float16",
    )
    commit_index(work / "features", index_rows)
    write_class_list(WorkDir(work).classes, classes)
    manifest = pd.DataFrame(rows).sort_values("video_id").reset_index(drop=True)
    write_table(manifest, WorkDir(work).manifest)
    return manifest


def write_store(root: str | Path, frontend: FrontendConfig, feats: dict[str, np.ndarray]) -> None:
    """A committed feature store at ``root`` of ``{video_id: (frames, n_mels)}`` under
    ``frontend`` (float32, one class)."""
    writer = ShardWriter(root, n_mels=frontend.n_mels, dtype="float32")
    for vid, x in feats.items():
        writer.add(vid, np.asarray(x, np.float32))
    write_meta(root, frontend=frontend, classes=["c"], dtype="float32")
    commit_index(root, writer.close())


def write_val_manifest(
    work: Path, ids: Sequence[str], classes: Sequence[str], y: np.ndarray
) -> None:
    """A manifest of found ``val`` videos ``ids`` (n) labelled ``classes[y]`` (y: (n,) class
    indices), with no media files behind them: for stages that start from scores."""
    write_table(
        pd.DataFrame(
            {
                "video_id": ids,
                "split": "val",
                "label": [classes[k] for k in y],
                "label_index": y,
                "path": "",
                "size_bytes": 1,
                "scan_status": "found",
            }
        ),
        WorkDir(work).manifest,
    )
