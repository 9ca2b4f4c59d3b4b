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
import stat
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
from avfuse.config import (
    Config,
    finished_run_settings,
    load_config,
    num_workers_field,
    save_config,
    scheduler_field,
)
from avfuse.io import (
    INPUTS,
    RecordLog,
    check_inside_work,
    committed_from,
    error_reason,
    file_kind,
    inputs_key,
    isin_ids,
    raise_if_disk_full,
    read_table,
    remove_stale_temporaries,
    safe_join,
    write_csv,
    write_table,
)
from avfuse.manifest import load_manifest
from avfuse.parallel import batched, executor_context, executor_width, map_batches
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
    "source_size",
    "source_mtime_ns",
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
    sample_rate: int = field(default=16000, metadata={"min": 1, "help": "output sample rate in Hz"})
    format: Literal["flac", "wav"] = field(
        default="flac", metadata={"help": "output file format (both lossless 16-bit)"}
    )
    num_workers: int | None = num_workers_field()
    scheduler: str | None = scheduler_field()
    batch_size: int = field(
        default=32, metadata={"min": 1, "help": "videos per task (smaller on small datasets)"}
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
        "source_size": int(info.get("source_size", -1)),
        "source_mtime_ns": int(info.get("source_mtime_ns", -1)),
    }


# Decoding time allowed per file: a base plus a share of its size (audio decodes at well over
# 10 MB/s of container even on one slow core), so only a file that stalls or loops runs out.
DECODE_BASE_S = 120.0
DECODE_S_PER_MB = 1.0


def decode_time_limit(size_bytes: int) -> float:
    """Seconds :func:`decode_audio` may spend on a file of ``size_bytes``."""
    return DECODE_BASE_S + DECODE_S_PER_MB * size_bytes / 1e6


def _extract_one(
    task: dict[str, str],
    work: Path,
    sample_rate: int,
    silence: tuple[float, float] = (SILENCE_PEAK_DBFS, SILENCE_RMS_DBFS),
) -> dict[str, Any]:
    vid, src, rel = task["video_id"], task["path"], task["audio_path"]
    try:
        st = os.stat(src) if src else None
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return _record(vid, "error", f"cannot read the file: {error_reason(exc)}", sample_rate)
    if st is None:
        return _record(
            vid, "missing", f"file not found: {src or '(no file for this row)'}", sample_rate
        )
    # The record is keyed by the file as it was read: a file that changes (one still being
    # written when it was read) is redone by a plain rerun.
    source = {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
    if not stat.S_ISREG(st.st_mode):
        # A FIFO would block the open forever, a device would read without end.
        return _record(
            vid,
            "unreadable",
            f"{file_kind(st.st_mode)}, not a regular file",
            sample_rate,
            **source,
        )
    try:
        res = decode_audio(src, sample_rate, time_limit_s=decode_time_limit(st.st_size))
    except Exception as exc:  # a decoder bug on one odd file must not sink its whole batch
        return _record(
            vid,
            read_failure_status(exc),
            f"decoding failed: {error_reason(exc)}",
            sample_rate,
            **source,
        )
    info = {
        **source,
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
    """What :func:`extract` did, for the selected splits.

    ``table`` (one row per selected video, every column of ``extract.parquet``) is read from
    that file when first asked for: a rerun with nothing to do never loads it.
    """

    work: Path
    processed: int
    skipped: int
    elapsed_s: float
    failures_path: Path
    counts: dict[str, int]
    audio_s: float
    ids: pd.Series | None = field(repr=False)  # the selected videos; None: every video

    @functools.cached_property
    def table(self) -> pd.DataFrame:
        t = read_table(WorkDir(self.work).extract_table)
        return (
            t if self.ids is None else t[isin_ids(t["video_id"], self.ids)].reset_index(drop=True)
        )

    def summary(self) -> str:
        counts = self.counts
        n = sum(counts.values())
        order = [s for s in STATUSES if s in counts] + sorted(set(counts) - set(STATUSES))
        rate = self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"extract: {n} videos in {WorkDir(self.work).extract_table} "
            f"({self.processed} decoded now at {rate:.1f} files/s, {self.skipped} already done; "
            f"{self.audio_s / 3600:.2f} h of audio)",
            "  " + ", ".join(f"{s}: {counts[s]}" for s in order),
        ]
        n_fail = n - counts.get("ok", 0)
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


def _remove_outputs(work: Path, prior: pa.Table, fmt: str) -> None:
    # A forced rerun in another format would leave the old files beside the new ones.
    if not prior.num_rows or "audio_path" not in prior.column_names:
        return
    for rel in prior.column("audio_path").to_pylist():
        if rel and not str(rel).endswith(f".{fmt}"):
            old = safe_join(work, str(rel))
            check_inside_work(old)
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


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
    wd = WorkDir(work)
    # Two columns (paths are read for the videos to decode only): a rerun over 420k finished
    # videos must stay a small process.
    manifest = everything = load_manifest(work, stages=False, columns=_MANIFEST_COLUMNS)
    if pc.count_distinct(pa.array(manifest["video_id"])).as_py() < len(manifest):
        # Written by an older scan: two files sharing an id would overwrite one another.
        dup = manifest["video_id"][manifest["video_id"].duplicated()].head(3).tolist()
        raise ValueError(
            f"{wd.manifest} lists video ids twice (e.g. {dup}): run `avfuse scan` again, "
            "which keeps every video under its own id"
        )
    if cfg.splits:
        unknown = sorted(set(cfg.splits) - set(manifest["split"]))
        if unknown:
            raise ValueError(
                f"split(s) {unknown} not in the manifest; known: {sorted(set(manifest['split']))}"
            )
        manifest = manifest[manifest["split"].isin(cfg.splits)]
    _check_previous(work, cfg)

    rlog = RecordLog(wd.extract_parts)
    if cfg.force:
        _remove_outputs(work, rlog.read(["audio_path"]), cfg.format)
        rlog.clear()
    # Temporaries of a killed run (audio being written, a part being logged) are garbage.
    removed = remove_stale_temporaries(wd.audio_dir) + remove_stale_temporaries(rlog.folder)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    save_config(cfg, wd.extract_config)

    todo = manifest
    if not cfg.force:
        if len(rlog.parts()) > 1:
            # A killed run's (or an older version's) many parts: read them once, here, into
            # the one part that the check below streams and the commit reads.
            rlog.compact()
        todo = manifest[~isin_ids(manifest["video_id"], _done_ids(work, rlog))]
    skipped = len(manifest) - len(todo)
    # Paths only for the videos to decode: at 420k finished videos that column is ~50 MB.
    todo = todo.merge(_manifest_paths(work, todo["video_id"]), on="video_id", how="left")
    tasks = [
        {
            "video_id": vid,
            "path": path if isinstance(path, str) else "",
            "audio_path": WorkDir.audio_relpath(vid, cfg.format),
        }
        for vid, path in zip(
            todo["video_id"].astype(str).tolist(), todo["path"].tolist(), strict=True
        )
    ]
    del todo
    # extract.parquet holds exactly the manifest's videos: only a split selection filters it.
    selection = manifest["video_id"] if cfg.splits else None
    if tasks:
        _run_tasks(tasks, work, cfg, rlog, executor)
    elif not cfg.force and _committed(wd, cfg, rlog):
        # Nothing decoded and extract.parquet already holds exactly this log and manifest:
        # rewriting it would write the same bytes, at seconds and ~1 GB for 420k videos.
        return _result(work, selection, 0, skipped, time.perf_counter() - t0)
    _commit(work, cfg, rlog, everything, manifest)
    return _result(work, selection, len(tasks), skipped, time.perf_counter() - t0)


_MANIFEST_COLUMNS = ("video_id", "split")
_DONE_COLUMNS = ("status", "audio_path", "reason")


def _manifest_paths(work: Path, ids: pd.Series) -> pd.DataFrame:
    """``video_id, path`` of the manifest rows of ``ids``."""
    if not len(ids):
        return pd.DataFrame(
            {"video_id": pd.Series([], dtype=str), "path": pd.Series([], dtype=str)}
        )
    man = load_manifest(work, stages=False, columns=("video_id", "path"))
    return man[isin_ids(man["video_id"], ids)]


def _done_ids(work: Path, rlog: RecordLog) -> pa.Array:
    """Videos an earlier run finished: logged with a final status and, if usable, the file.

    Column-wise over Arrow arrays, with Python strings only for the paths it checks, a block
    at a time: per-row lists of four columns cost ~250 MB at 420k videos. A log of one part
    (compacted: the usual state) is streamed in blocks of its file.
    """
    cols = ["video_id", *_DONE_COLUMNS]
    parts = rlog.parts()
    part = pq.ParquetFile(parts[0]) if len(parts) == 1 else None
    if part is not None and set(cols) <= set(part.schema_arrow.names):
        batches = part.iter_batches(batch_size=_CHUNK, columns=cols)
        blocks: Any = (pa.Table.from_batches([b]) for b in batches)
    else:
        whole = rlog.read(_DONE_COLUMNS)
        blocks = [whole] if whole.num_rows else []
    done = [_done_in(work, block) for block in blocks]
    ids = pa.concat_arrays(done) if done else pa.array([], pa.string())
    changed = _changed_sources(work, rlog)
    if changed:
        log.info("%d video file(s) changed since they were read: they are redone", len(changed))
        ids = ids.filter(pc.invert(pc.is_in(ids, value_set=pa.array(changed, pa.string()))))
    return ids


def _changed_sources(work: Path, rlog: RecordLog) -> list[str]:
    """Videos whose file differs (size, mtime) from the file as it was read: one read while it
    was still being written, or replaced since.

    A ``stat`` each for the few records worth a look: those that are not ``ok``, and those whose
    file had another size when it was scanned (it changed between scan and extract). A file
    replaced after an ``ok`` read is caught by a rescan (``avfuse run`` rescans a changed tree).
    """
    table = rlog.read(["status", "source_size", "source_mtime_ns"])
    if not table.num_rows:
        return []
    sizes = pq.read_table(WorkDir(work).manifest, columns=["video_id", "size_bytes"])
    table = table.join(sizes.replace_schema_metadata(None), keys="video_id", join_type="left outer")
    read_size = pc.fill_null(table.column("source_size").cast(pa.int64()), -1)
    scanned = pc.fill_null(table.column("size_bytes").cast(pa.int64()), -1)
    grew = pc.and_(
        pc.and_(pc.greater_equal(read_size, 0), pc.greater_equal(scanned, 0)),
        pc.not_equal(read_size, scanned),
    )
    not_ok = pc.fill_null(pc.not_equal(table.column("status").cast(pa.string()), "ok"), True)
    table = table.filter(pc.or_(not_ok, grew))
    if not table.num_rows:
        return []
    ids = table.column("video_id").cast(pa.string()).to_pylist()
    size = pc.fill_null(table.column("source_size").cast(pa.int64()), -1).to_pylist()
    mtime = pc.fill_null(table.column("source_mtime_ns").cast(pa.int64()), -1).to_pylist()
    paths = _manifest_paths(work, pd.Series(ids, dtype=object))
    where = dict(zip(paths["video_id"].astype(str), paths["path"], strict=True))
    changed = []
    for vid, n, t in zip(ids, size, mtime, strict=True):
        src = where.get(vid)
        if not isinstance(src, str) or not src:
            continue
        try:
            st = os.stat(src)
        except OSError:
            continue  # gone or unreadable: the record's status stands
        if (st.st_size, st.st_mtime_ns) != (n, t):
            changed.append(vid)
    return changed


def _done_in(work: Path, prior: pa.Table) -> pa.Array:
    """:func:`_done_ids` of one block of records."""
    status = prior.column("status").cast(pa.string())
    reason = pc.fill_null(prior.column("reason").cast(pa.string()), "")
    usable = pc.fill_null(pc.is_in(status, value_set=pa.array(sorted(USABLE))), False)
    retry = pc.is_in(status, value_set=pa.array(["missing", "error"]))
    # logged by an older avfuse that called write failures unreadable
    old_write_failure = pc.and_(
        pc.equal(status, "unreadable"), pc.starts_with(reason, _WRITE_FAILED)
    )
    done = ~np.asarray(pc.fill_null(pc.or_(retry, old_write_failure), False), dtype=bool)
    rows = np.flatnonzero(np.asarray(usable, dtype=bool))
    paths = pc.fill_null(prior.column("audio_path").cast(pa.string()), "")
    root = str(work)
    for lo in range(0, len(rows), _CHUNK):
        chunk = rows[lo : lo + _CHUNK]
        # Plain strings and os.path: a Path object per video costs more than the stat itself.
        lost = [
            not os.path.isfile(os.path.join(root, rel)) for rel in paths.take(chunk).to_pylist()
        ]
        done[chunk[np.asarray(lost, dtype=bool)]] = False  # output lost: redo
    return prior.column("video_id").cast(pa.string()).combine_chunks().filter(pa.array(done))


_CHUNK = 65536


def _run_tasks(
    tasks: list[dict[str, Any]],
    work: Path,
    cfg: ExtractConfig,
    rlog: RecordLog,
    executor: Executor | None,
) -> None:
    # Absolute paths: cluster workers do not share this process's working directory.
    fn = functools.partial(
        _extract_batch,
        work=str(work.resolve()),
        sample_rate=cfg.sample_rate,
        log_dir=str(rlog.folder.resolve()),
        silence=(cfg.silence_peak_dbfs, cfg.silence_rms_dbfs),
    )
    with executor_context(executor, cfg.num_workers, cfg.scheduler) as ex:
        # Enough batches for every worker to get several, bounded by batch_size.
        per = max(1, min(cfg.batch_size, -(-len(tasks) // (4 * executor_width(ex)))))
        for _ in map_batches(
            fn, batched(tasks, per), ex, desc="extract", unit="file", progress=cfg.progress
        ):
            pass
    # A worker killed mid-write (its batch was redone elsewhere) leaves its temporaries.
    remove_stale_temporaries(WorkDir(work).audio_dir)
    remove_stale_temporaries(rlog.folder)


def _inputs_key(wd: WorkDir, cfg: ExtractConfig, rlog: RecordLog) -> str:
    """What extract.parquet is built from: the settings, the manifest file, the log's parts."""
    return inputs_key(rlog, [wd.manifest], [__version__, cfg.sample_rate, cfg.format])


def _committed(wd: WorkDir, cfg: ExtractConfig, rlog: RecordLog) -> bool:
    key = _inputs_key(wd, cfg, rlog)
    return len(rlog.parts()) <= 1 and committed_from(wd.extract_table, key)


def _commit(
    work: Path,
    cfg: ExtractConfig,
    rlog: RecordLog,
    everything: pd.DataFrame,
    selected: pd.DataFrame,
) -> None:
    """Compact the log and write extract.parquet (every video extracted so far)."""
    wd = WorkDir(work)
    # Compacting here makes the next run's read one file, however many batches ever ran.
    # Arrow throughout: at 420k videos a pandas table of every column costs ~400 MB.
    full = rlog.compact()
    full = full.filter(
        pc.is_in(full.column("video_id"), value_set=pa.array(everything["video_id"]))
    )
    for col in COLUMNS:
        if col not in full.column_names:
            full = full.append_column(col, pa.nulls(full.num_rows))
    full = full.select(list(COLUMNS))
    full = full.take(pc.sort_indices(full, sort_keys=[("video_id", "ascending")]))
    selected_ids = pa.array(selected["video_id"].astype(str))
    missing = selected_ids.filter(
        pc.invert(pc.is_in(selected_ids, value_set=full.column("video_id")))
    )
    if len(missing):  # cannot happen unless a worker's log part was lost; say so, never drop
        raise RuntimeError(
            f"{len(missing)} video(s) have no extract record, e.g. {sorted(missing.to_pylist())[:3]}"
        )
    meta = {"avfuse_version": __version__, "sample_rate": str(cfg.sample_rate)}
    meta |= {"format": cfg.format, INPUTS: _inputs_key(wd, cfg, rlog)}
    write_table(full, wd.extract_table, meta)


def _result(
    work: Path, selected: pd.Series | None, processed: int, skipped: int, elapsed: float
) -> ExtractResult:
    """The result for the ``selected`` videos (``None``: all), from extract.parquet; writes
    the failures CSV."""
    wd = WorkDir(work)
    cols = ["video_id", "status", "reason", "duration_s"]
    t = pq.read_table(wd.extract_table, columns=cols).replace_schema_metadata(None)
    if selected is not None:
        t = t.filter(pc.is_in(t.column("video_id"), value_set=pa.array(selected)))
    # Counted column-wise: only the failures become a DataFrame.
    counts = {
        str(d["values"]): int(d["counts"])
        for d in pc.value_counts(t.column("status").cast(pa.string())).to_pylist()
    }
    bad = t.filter(pc.fill_null(pc.not_equal(t.column("status"), "ok"), True)).to_pandas()
    failures = bad.merge(_manifest_paths(work, bad["video_id"]), on="video_id", how="left")
    write_csv(failures[["video_id", "status", "reason", "path"]], wd.extract_failures)
    return ExtractResult(
        work=work,
        processed=processed,
        skipped=skipped,
        elapsed_s=elapsed,
        failures_path=wd.extract_failures,
        counts=counts,
        audio_s=float(pc.sum(t.column("duration_s")).as_py() or 0.0),
        ids=selected,
    )


# ---------------------------------------------------------------------------------------------
# What the orchestrator asks of this stage: its outputs, whether they are done, and redoing
# chosen videos. The record log's layout stays this module's own.


def outputs(cfg: ExtractConfig) -> list[Path]:
    """The files a finished extraction leaves: ``extract.parquet`` (its sizes and times say
    whether it was rerun)."""
    return [WorkDir(cfg.work).extract_table]


def is_done(cfg: ExtractConfig) -> bool:
    """Whether the outputs are there to be read (a rerun finds what is left to decode)."""
    return all(p.exists() for p in outputs(cfg))


def finished_settings(cfg: ExtractConfig) -> ExtractConfig | None:
    """The settings of the finished extraction whose outputs are in place; ``None`` when there
    is none, or when a later extraction started and may not have finished."""
    path = WorkDir(cfg.work).extract_config
    return finished_run_settings(ExtractConfig, path, outputs(cfg), saved_at_start=True)


def invalidate(work: str | Path, video_ids: Sequence[str], reason: str) -> int:
    """Log ``video_ids`` as failed with ``reason``, so that the next extraction, which retries
    failed records, decodes exactly these videos again (a video file replaced, say). Returns
    how many were logged."""
    ids = [str(v) for v in video_ids]
    RecordLog(WorkDir(work).extract_parts).write(
        {"video_id": v, "status": "error", "reason": reason, "audio_path": ""} for v in ids
    )
    return len(ids)


__all__ = [
    "DecodedAudio",
    "ExtractConfig",
    "ExtractResult",
    "audio_levels",
    "decode_audio",
    "extract",
    "finished_settings",
    "invalidate",
    "is_done",
    "load_audio",
    "outputs",
    "silence_reason",
    "write_audio",
]
