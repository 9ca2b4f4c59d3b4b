"""Stage 1: decode the sound track of every video to mono FLAC (or WAV) at one sample rate.

``avfuse extract WORK`` reads ``WORK/manifest.parquet`` and writes

* ``WORK/audio/SPLIT/CLASS/STEM.flac``: mono, ``sample_rate`` Hz (16 kHz by default), s16;
* ``WORK/extract.parquet``: one row per video (``video_id, status, reason, codec,
  source_sample_rate, channels, duration_s, stream_index, n_audio_streams, sample_rate,
  num_samples, audio_path``), consolidated from ``WORK/extract/parts/`` (one part per batch);
* ``WORK/extract_failures.csv``: every video whose status is not ``ok``;
* ``WORK/extract.toml``: the :class:`ExtractConfig` of the run.

Decoding (:func:`decode_audio`) uses PyAV: the container is opened without decoding video
frames, the default audio stream is demuxed alone, channels are averaged in NumPy (the mean of
channels, as VGGish and the s16 path use; FFmpeg's float downmix would give 0.707*(L+R), 3 dB
louder) and the result is resampled once with soxr. Errors are caught per packet, so a truncated
file keeps the audio before the damage (status ``partial``).

The stage is resumable: a rerun skips videos already in the record log whose output exists,
removes temporaries left by a killed run, and redoes the rest. Workers never import torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from avfuse import __version__
from avfuse.audio import (
    SILENCE_PEAK_DBFS,
    SILENCE_RMS_DBFS,
    USABLE,
    DecodedAudio,
    audio_levels,
    decode_audio,
    load_audio,
    read_failure_status,
    silence_reason,
    write_audio,
)
from avfuse.config import Config, load_config, num_workers_field, save_config, scheduler_field
from avfuse.io import (
    RecordLog,
    atomic_write,
    error_reason,
    raise_if_disk_full,
    remove_stale_temporaries,
    safe_join,
    write_table,
)
from avfuse.manifest import load_manifest
from avfuse.parallel import batched, executor_width, make_executor, map_batches
from avfuse.workdir import WorkDir

log = logging.getLogger(__name__)

STATUSES = ("ok", "partial", "silent", "no_audio", "empty_audio", "unreadable", "missing", "error")
COLUMNS = (
    "video_id",
    "status",
    "reason",
    "codec",
    "source_sample_rate",
    "channels",
    "duration_s",
    "stream_index",
    "n_audio_streams",
    "sample_rate",
    "num_samples",
    "audio_path",
    "peak_dbfs",
    "rms_dbfs",
)


@dataclass(frozen=True)
class ExtractConfig(Config):
    """Settings of ``avfuse extract``."""

    work: Path = field(
        metadata={
            "help": "work folder holding manifest.parquet (from `avfuse scan`)",
            "positional": True,
        }
    )
    sample_rate: int = field(default=16000, metadata={"help": "output sample rate in Hz"})
    format: Literal["flac", "wav"] = field(
        default="flac", metadata={"help": "output file format (both lossless 16-bit)"}
    )
    num_workers: int | None = num_workers_field()
    scheduler: str | None = scheduler_field()
    batch_size: int = field(
        default=32, metadata={"help": "videos per task (smaller on small datasets)"}
    )
    splits: tuple[str, ...] = field(
        default=(), metadata={"help": "only these splits (default: all)"}
    )
    silence_peak_dbfs: float = field(
        default=SILENCE_PEAK_DBFS,
        metadata={"help": "a track whose peak is below this level (dBFS) is `silent`"},
    )
    silence_rms_dbfs: float = field(
        default=SILENCE_RMS_DBFS,
        metadata={"help": "a track whose RMS level is below this (dBFS) is `silent`"},
    )
    force: bool = field(default=False, metadata={"help": "redo every video, ignoring earlier runs"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


# --- the stage -----------------------------------------------------------------------------


def _tune_malloc() -> None:
    # Keep freed memory in the process between files instead of returning it to the OS and
    # faulting it back in for the next one (glibc only; harmless elsewhere).
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)
        libc.mallopt(m_mmap_threshold, 64 * 1024 * 1024)


_TUNED = False
_WRITE_FAILED = "writing output failed"


def _record(
    video_id: str, status: str, reason: str, sample_rate: int, **info: Any
) -> dict[str, Any]:
    return {
        "video_id": str(video_id),
        "status": status,
        "reason": reason,
        "codec": str(info.get("codec", "")),
        "source_sample_rate": int(info.get("source_sample_rate", -1)),
        "channels": int(info.get("channels", -1)),
        "duration_s": float(info.get("duration_s", 0.0)),
        "stream_index": int(info.get("stream_index", -1)),
        "n_audio_streams": int(info.get("n_audio_streams", 0)),
        "sample_rate": int(sample_rate),
        "num_samples": int(info.get("num_samples", 0)),
        "audio_path": str(info.get("audio_path", "")),
        "peak_dbfs": float(info.get("peak_dbfs", float("nan"))),
        "rms_dbfs": float(info.get("rms_dbfs", float("nan"))),
    }


def _extract_one(
    task: dict[str, str],
    work: Path,
    sample_rate: int,
    silence: tuple[float, float] = (SILENCE_PEAK_DBFS, SILENCE_RMS_DBFS),
) -> dict[str, Any]:
    vid, src, rel = task["video_id"], task["path"], task["audio_path"]
    if not src or not os.path.exists(src):
        return _record(
            vid, "missing", f"file not found: {src or '(no file for this row)'}", sample_rate
        )
    try:
        res = decode_audio(src, sample_rate)
    except Exception as exc:  # a decoder bug on one odd file must not sink its whole batch
        return _record(
            vid, read_failure_status(exc), f"decoding failed: {error_reason(exc)}", sample_rate
        )
    info = {
        "codec": res.codec,
        "source_sample_rate": res.source_sample_rate,
        "channels": res.channels,
        "stream_index": res.stream_index,
        "n_audio_streams": res.n_audio_streams,
    }
    if res.status not in USABLE:
        return _record(vid, res.status, res.reason, sample_rate, **info)
    peak, level = audio_levels(res.samples)
    info.update(peak_dbfs=peak, rms_dbfs=level)
    quiet = silence_reason(peak, level, *silence)
    if quiet:
        # A muted upload is not sound: no file, no features, no audio score.
        return _record(
            vid,
            "silent",
            quiet,
            sample_rate,
            duration_s=res.duration_s,
            num_samples=len(res.samples),
            **info,
        )
    try:
        out = safe_join(work, rel)
        write_audio(out, res.samples, sample_rate)
    except Exception as exc:
        # A full disk stops the run (every later video would fail alike); anything else
        # (permissions, a vanished folder) fails this video with a status a rerun retries.
        raise_if_disk_full(exc, (work / rel).parent)
        return _record(vid, "error", f"{_WRITE_FAILED}: {error_reason(exc)}", sample_rate, **info)
    return _record(
        vid,
        res.status,
        res.reason,
        sample_rate,
        duration_s=res.duration_s,
        num_samples=len(res.samples),
        audio_path=rel,
        **info,
    )


def _extract_batch(
    tasks: list[dict[str, str]],
    work: str,
    sample_rate: int,
    log_dir: str,
    silence: tuple[float, float] = (SILENCE_PEAK_DBFS, SILENCE_RMS_DBFS),
) -> list[dict[str, Any]]:
    """Worker side: decode and write one batch, then log its records (one atomic part)."""
    global _TUNED
    if not _TUNED:
        _tune_malloc()
        _TUNED = True
    root = Path(work)
    records = [_extract_one(t, root, sample_rate, silence) for t in tasks]
    RecordLog(log_dir).write(records)
    return records


@dataclass
class ExtractResult:
    """What :func:`extract` did. ``table`` holds one row per video of the selected splits."""

    work: Path
    table: pd.DataFrame
    processed: int
    skipped: int
    elapsed_s: float
    failures_path: Path

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(self.table["status"]))

    def summary(self) -> str:
        counts = self.counts
        order = [s for s in STATUSES if s in counts] + sorted(set(counts) - set(STATUSES))
        rate = self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        audio_h = float(self.table["duration_s"].sum()) / 3600
        lines = [
            f"extract: {len(self.table)} videos in {WorkDir(self.work).extract_table} "
            f"({self.processed} decoded now at {rate:.1f} files/s, {self.skipped} already done; "
            f"{audio_h:.2f} h of audio)",
            "  " + ", ".join(f"{s}: {counts[s]}" for s in order),
        ]
        n_fail = len(self.table) - counts.get("ok", 0)
        if n_fail:
            lines.append(f"  {n_fail} not ok, listed with reasons in {self.failures_path}")
        else:
            lines.append("  no failures")
        return "\n".join(lines)


def _check_previous(work: Path, cfg: ExtractConfig) -> None:
    prev_path = WorkDir(work).extract_config
    if cfg.force or not prev_path.exists():
        return
    try:
        prev = load_config(ExtractConfig, prev_path)
    except Exception:  # unreadable old settings: nothing to compare, the log decides
        return
    if (prev.sample_rate, prev.format) != (cfg.sample_rate, cfg.format):
        raise ValueError(
            f"{work} was extracted at {prev.sample_rate} Hz as {prev.format}, now asked for "
            f"{cfg.sample_rate} Hz as {cfg.format}: pass --force to redo everything"
        )


def _remove_outputs(work: Path, prior: pd.DataFrame, fmt: str) -> None:
    # A forced rerun in another format would leave the old files beside the new ones.
    if not len(prior) or "audio_path" not in prior:
        return
    for rel in prior["audio_path"]:
        if rel and not str(rel).endswith(f".{fmt}"):
            with contextlib.suppress(FileNotFoundError):
                (work / str(rel)).unlink()


def _isin(values: pd.Series, among: pd.Series) -> np.ndarray:
    """``values.isin(among)`` for string ids, as one Arrow hash look-up (pandas' ``isin`` on
    Arrow strings walks the values in Python: seconds at 400k videos)."""
    found = pc.is_in(pa.array(values.astype(str)), value_set=pa.array(among.astype(str)))
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def extract(cfg: ExtractConfig, executor: Executor | None = None) -> ExtractResult:
    """Decode every video of the manifest to ``WORK/audio/{video_id}.{format}``.

    Output audio: ``(samples,)`` mono s16 at ``cfg.sample_rate``. Work runs on ``executor`` if
    given, else on a pool built from ``cfg.num_workers`` / ``cfg.scheduler``. Videos already
    logged by an earlier (even killed) run whose output exists are skipped unless ``cfg.force``.
    Returns an :class:`ExtractResult` for the selected splits; ``WORK/extract.parquet`` holds the
    records of every video extracted so far.
    """
    t0 = time.perf_counter()
    work = Path(cfg.work)
    manifest = everything = load_manifest(work, stages=False)
    if cfg.splits:
        unknown = sorted(set(cfg.splits) - set(manifest["split"]))
        if unknown:
            raise ValueError(
                f"split(s) {unknown} not in the manifest; known: {sorted(set(manifest['split']))}"
            )
        manifest = manifest[manifest["split"].isin(cfg.splits)]
    _check_previous(work, cfg)

    rlog = RecordLog(WorkDir(work).extract_parts)
    prior = rlog.read()
    if cfg.force:
        _remove_outputs(work, prior, cfg.format)
        rlog.clear()
    # Temporaries of a killed run (audio being written, a part being logged) are garbage.
    removed = remove_stale_temporaries(WorkDir(work).audio_dir) + remove_stale_temporaries(
        rlog.folder
    )
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    save_config(cfg, WorkDir(work).extract_config)

    done: set[str] = set()
    if not cfg.force and len(prior):
        # Plain strings and os.path: a Path object and an Arrow-string lookup per video cost
        # more than the stat itself at 400k videos.
        root = str(work)
        for vid, status, rel, reason in zip(
            prior["video_id"].astype(str).tolist(),
            prior["status"].astype(str).tolist(),
            prior["audio_path"].astype(str).tolist(),
            prior["reason"].astype(str).tolist(),
            strict=True,
        ):
            if status in USABLE:
                if not os.path.isfile(os.path.join(root, rel)):
                    continue  # output lost: redo
            elif status in ("missing", "error"):
                continue  # the file may have appeared since / the failure may be transient
            elif status == "unreadable" and reason.startswith(_WRITE_FAILED):
                continue  # logged by an older avfuse that called write failures unreadable
            done.add(vid)

    tasks = [
        {
            "video_id": vid,
            "path": path if isinstance(path, str) else "",
            "audio_path": WorkDir.audio_relpath(vid, cfg.format),
        }
        for vid, path in zip(
            manifest["video_id"].astype(str).tolist(), manifest["path"].tolist(), strict=True
        )
        if vid not in done
    ]
    skipped = len(manifest) - len(tasks)
    if tasks:
        # Absolute paths: cluster workers do not share this process's working directory.
        fn = functools.partial(
            _extract_batch,
            work=str(work.resolve()),
            sample_rate=cfg.sample_rate,
            log_dir=str(rlog.folder.resolve()),
            silence=(cfg.silence_peak_dbfs, cfg.silence_rms_dbfs),
        )
        ctx = (
            contextlib.nullcontext(executor)
            if executor is not None
            else make_executor(cfg.num_workers, cfg.scheduler)
        )
        with ctx as ex:
            # Enough batches for every worker to get several, bounded by batch_size.
            per = max(1, min(cfg.batch_size, -(-len(tasks) // (4 * executor_width(ex)))))
            for _ in map_batches(
                fn, batched(tasks, per), ex, desc="extract", unit="file", progress=cfg.progress
            ):
                pass

        # A worker killed mid-write (its batch was redone elsewhere) leaves its temporaries.
        remove_stale_temporaries(WorkDir(work).audio_dir)
        remove_stale_temporaries(rlog.folder)

    # The table covers every video extracted so far (earlier runs on other splits included).
    # Compacting here makes the next run's read one file, however many batches ever ran.
    full = prior if not (tasks or cfg.force) and len(rlog.parts()) <= 1 else rlog.compact()
    if len(full):
        full = full[_isin(full["video_id"], everything["video_id"])]
    full = pd.DataFrame(full, columns=list(COLUMNS)).sort_values("video_id")
    full = full.reset_index(drop=True)
    selected_ids = manifest["video_id"].astype(str)
    table = full[_isin(full["video_id"], selected_ids)].reset_index(drop=True)
    missing_ids = set(selected_ids.tolist()) - set(table["video_id"].tolist())
    if missing_ids:  # cannot happen unless a worker's log part was lost; say so, never drop
        raise RuntimeError(
            f"{len(missing_ids)} video(s) have no extract record, e.g. {sorted(missing_ids)[:3]}"
        )
    write_table(
        full,
        WorkDir(work).extract_table,
        {"avfuse_version": __version__, "sample_rate": str(cfg.sample_rate), "format": cfg.format},
    )
    failures = table[table["status"] != "ok"].merge(
        manifest[["video_id", "path"]], on="video_id", how="left"
    )[["video_id", "status", "reason", "path"]]
    failures_path = WorkDir(work).extract_failures
    with atomic_write(failures_path) as tmp:
        failures.to_csv(tmp, index=False)
    return ExtractResult(
        work=work,
        table=table,
        processed=len(tasks),
        skipped=skipped,
        elapsed_s=time.perf_counter() - t0,
        failures_path=failures_path,
    )


__all__ = [
    "DecodedAudio",
    "ExtractConfig",
    "ExtractResult",
    "audio_levels",
    "decode_audio",
    "extract",
    "load_audio",
    "silence_reason",
    "write_audio",
]
