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
import threading
import time
import wave
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import soxr

from avfuse import __version__
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

log = logging.getLogger(__name__)

AUDIO_DIR = "audio"
TABLE = "extract.parquet"
PARTS = "extract/parts"
FAILURES = "extract_failures.csv"
CONFIG = "extract.toml"

STATUSES = ("ok", "partial", "silent", "no_audio", "empty_audio", "unreadable", "missing", "error")
USABLE = ("ok", "partial")
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

# A clean decode shorter than the declared duration minus max(1 s, 20 %) is reported as partial.
_SHORT_ABS_S = 1.0
_SHORT_REL = 0.2
# Give up on a stream after this many consecutive bad packets (a truncated file's tail).
_MAX_CONSECUTIVE_ERRORS = 32
# Silence thresholds. One 16-bit LSB is -90.3 dBFS, so dithered "hiss" of a muted track sits
# near -90 dBFS RMS with peaks around -80 dBFS; quiet real recordings (room tone, distant
# speech) measure -60..-40 dBFS RMS with peaks above -45 dBFS. A peak below -60 dBFS or an
# RMS below -70 dBFS leaves 10 dB of margin on both sides.
SILENCE_PEAK_DBFS = -60.0
SILENCE_RMS_DBFS = -70.0


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


@dataclass
class DecodedAudio:
    """The sound track of one file.

    ``samples``: ``(samples,)`` float32 mono at ``sample_rate`` (empty unless status is ``ok`` or
    ``partial``). ``source_*`` describe the chosen stream before conversion.
    """

    samples: np.ndarray
    sample_rate: int
    status: str
    reason: str = ""
    codec: str = ""
    source_sample_rate: int = -1
    channels: int = -1
    stream_index: int = -1
    n_audio_streams: int = 0
    declared_duration_s: float = -1.0

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate if self.sample_rate > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.status in USABLE


# --- decoding ------------------------------------------------------------------------------

# Per packed sample format name: (NumPy dtype, scale to [-1, 1), offset of unsigned formats).
_FORMATS: dict[str, tuple[type[np.generic], float, float]] = {
    "u8": (np.uint8, 1 / 128, 128.0),
    "s16": (np.int16, 1 / 32768, 0.0),
    "s32": (np.int32, 1 / 2147483648, 0.0),
    "s64": (np.int64, 1 / 9223372036854775808, 0.0),
    "flt": (np.float32, 1.0, 0.0),
    "dbl": (np.float64, 1.0, 0.0),
}


class _MonoBuffer:
    """Growing float32 buffer the channel means are written into, reused across files.

    Reuse matters: allocating a fresh ~1 MB array per file lets glibc hand the memory back to the
    OS and fault it in again, which made decode loops up to 3x slower and noisy.
    """

    def __init__(self) -> None:
        self.data = np.empty(1 << 20, dtype=np.float32)
        self.n = 0

    def reserve(self, extra: int) -> None:
        need = self.n + extra
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), dtype=np.float32)
            grown[: self.n] = self.data[: self.n]
            self.data = grown

    def add_frame(self, frame: av.AudioFrame) -> None:
        """Append the mean over channels of one decoded frame, any sample format."""
        n = frame.samples
        if n <= 0:
            return
        name = frame.format.name
        planar = name.endswith("p")
        dtype, scale, offset = _FORMATS[name[:-1] if planar else name]
        ch = frame.layout.nb_channels
        planes: Any = frame.planes  # buffer-protocol objects
        self.reserve(n)
        out = self.data[self.n : self.n + n]
        # Views on the decoder's buffers (frame.to_ndarray copies and stacks: 5x slower).
        if planar:
            if ch == 1:
                out[:] = np.frombuffer(planes[0], dtype, n)
            else:
                np.add(
                    np.frombuffer(planes[0], dtype, n),
                    np.frombuffer(planes[1], dtype, n),
                    out=out,
                    dtype=np.float32,
                )
                for plane in planes[2:ch]:
                    out += np.frombuffer(plane, dtype, n)
        else:  # one interleaved plane
            packed = np.frombuffer(planes[0], dtype, n * ch)
            if ch == 1:
                out[:] = packed
            else:
                np.sum(packed.reshape(n, ch), axis=1, dtype=np.float32, out=out)
        if offset:
            out -= np.float32(offset * ch)
        factor = scale / ch
        if factor != 1.0:
            out *= np.float32(factor)
        self.n += n


# One buffer per thread: a Dask worker with several threads runs several batches at once.
_LOCAL = threading.local()


def _buffer() -> _MonoBuffer:
    buf: _MonoBuffer | None = getattr(_LOCAL, "buffer", None)
    if buf is None:
        buf = _LOCAL.buffer = _MonoBuffer()
    buf.n = 0
    return buf


def _pick_stream(streams: list[Any]) -> Any:
    # FFmpeg's rule, simplified: the stream flagged default, else the first one.
    for s in streams:
        with contextlib.suppress(Exception):
            if s.disposition & av.stream.Disposition.default:
                return s
    return streams[0]


def _declared_duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1e6
    return -1.0


def _decode_mono(path: str | Path, buf: _MonoBuffer) -> DecodedAudio:
    """Decode the default audio stream into ``buf`` (mono, source rate); samples left empty."""
    empty = np.zeros(0, dtype=np.float32)
    try:
        # skip_frame=all: probing the streams does not decode video frames (+50 % on 360p files);
        # audio decoders ignore it.
        container = av.open(str(path), options={"skip_frame": "all"}, metadata_errors="replace")
    except Exception as exc:  # a bad file must never stop the run
        return DecodedAudio(empty, -1, read_failure_status(exc), error_reason(exc))
    with container:
        audio = list(container.streams.audio)
        if not audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
            return DecodedAudio(empty, -1, "no_audio", f"no audio stream (streams: {kinds})")
        stream = _pick_stream(audio)
        # The demuxer then skips the other streams' packets instead of reading and freeing them.
        for other in container.streams:
            if other.index != stream.index:
                with contextlib.suppress(Exception):
                    other.discard = av.stream.Discard.all
        ctx = stream.codec_context
        info: dict[str, Any] = {
            "codec": ctx.name or "",
            "source_sample_rate": int(ctx.sample_rate or -1),
            "channels": int(ctx.channels or -1),
            "stream_index": int(stream.index),
            "n_audio_streams": len(audio),
            "declared_duration_s": _declared_duration(container, stream),
        }
        rate = int(ctx.sample_rate or 0)
        errors: list[str] = []
        consecutive = 0
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except Exception as exc:  # demuxer hit damaged/truncated data: keep what we have
                if read_failure_status(exc) == "error":
                    # The file could not be read (I/O error, permissions): not its content's
                    # fault, so no partial result a rerun would keep.
                    return DecodedAudio(empty, -1, "error", f"reading failed: {error_reason(exc)}")
                errors.append(error_reason(exc))
                break
            try:
                for frame in ctx.decode(packet):
                    if frame.sample_rate and not rate:
                        rate = int(frame.sample_rate)
                    if frame.sample_rate and frame.sample_rate != rate:
                        # Mid-stream rate changes are rare; resampling them in would need a
                        # second resampler. Keep the first rate's audio, report the rest.
                        errors.append(f"sample rate changed to {frame.sample_rate} Hz")
                        continue
                    buf.add_frame(frame)
                consecutive = 0
            except Exception as exc:
                errors.append(error_reason(exc))
                consecutive += 1
                if consecutive >= _MAX_CONSECUTIVE_ERRORS:
                    break
        if rate and info["source_sample_rate"] < 0:
            info["source_sample_rate"] = rate
    if buf.n == 0:
        reason = (
            f"no decodable audio samples ({errors[0]})"
            if errors
            else "audio stream has no decodable samples"
        )
        return DecodedAudio(empty, -1, "empty_audio", reason, **info)
    got = buf.n / rate
    declared = info["declared_duration_s"]
    if errors:
        return DecodedAudio(
            empty,
            rate,
            "partial",
            f"{len(errors)} decode error(s), kept {got:.2f} s of {max(declared, got):.2f} s: "
            f"{errors[0]}",
            **info,
        )
    if declared > 0 and got < declared - max(_SHORT_ABS_S, _SHORT_REL * declared):
        return DecodedAudio(
            empty,
            rate,
            "partial",
            f"decoded {got:.2f} s of {declared:.2f} s declared (truncated file?)",
            **info,
        )
    return DecodedAudio(empty, rate, "ok", "", **info)


def read_failure_status(exc: BaseException) -> str:
    """``"error"`` for a failure to read the file (any ``OSError``: EIO, EACCES, EMFILE, a
    vanished file; retried by a rerun), ``"unreadable"`` for content FFmpeg cannot decode
    (``av.error.InvalidDataError`` and the other non-``OSError`` FFmpeg errors)."""
    return "error" if isinstance(exc, OSError) else "unreadable"


def _take(buf: _MonoBuffer, rate: int, sample_rate: int) -> np.ndarray:
    """The buffer's samples at ``sample_rate``, in a new array (the buffer is reused)."""
    mono = buf.data[: buf.n]
    return mono.copy() if rate == sample_rate else soxr.resample(mono, rate, sample_rate)


def audio_levels(samples: np.ndarray) -> tuple[float, float]:
    """``(samples,)`` float audio in [-1, 1] -> (peak dBFS, RMS dBFS); ``-inf`` for all zeros.

    0 dBFS is a full-scale peak (|x| = 1) and the RMS of a full-scale square wave.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return float("-inf"), float("-inf")
    peak = float(np.max(np.abs(x)))
    ms = float(np.mean(x * x))
    with np.errstate(divide="ignore"):
        return float(20 * np.log10(peak)), float(10 * np.log10(ms))


def silence_reason(
    peak_dbfs: float,
    rms_dbfs: float,
    peak_threshold: float = SILENCE_PEAK_DBFS,
    rms_threshold: float = SILENCE_RMS_DBFS,
) -> str:
    """Why a track counts as silent ("" when it does not): digital zeros or a level below either
    threshold."""
    if not np.isfinite(peak_dbfs):
        return "digital silence (every sample is zero)"
    if peak_dbfs < peak_threshold or rms_dbfs < rms_threshold:
        return (
            f"near-silence: peak {peak_dbfs:.1f} dBFS, RMS {rms_dbfs:.1f} dBFS "
            f"(thresholds: peak {peak_threshold:g}, RMS {rms_threshold:g} dBFS)"
        )
    return ""


def decode_audio(path: str | Path, sample_rate: int = 16000) -> DecodedAudio:
    """Decode a media file's default audio stream to mono float32 at ``sample_rate``.

    Returns ``samples``: ``(samples,)`` float32 with the mean of the source channels, resampled
    with soxr. Never raises for a bad file: see ``status`` and ``reason``.
    """
    buf = _buffer()
    res = _decode_mono(path, buf)
    if buf.n == 0 or res.sample_rate <= 0:
        res.sample_rate = int(sample_rate)
        return res
    res.samples = _take(buf, res.sample_rate, sample_rate)
    res.sample_rate = int(sample_rate)
    return res


def load_audio(path: str | Path, sample_rate: int | None = None) -> np.ndarray:
    """Read an extracted sound track: ``(samples,)`` float32 mono.

    With ``sample_rate`` the audio is resampled to it if the file differs (it does not for files
    written by :func:`extract` with the same rate). Raises ``ValueError`` if the file holds no
    audio.
    """
    path = Path(path)
    if path.suffix.lower() == ".wav":
        with contextlib.suppress(wave.Error), wave.open(str(path), "rb") as w:
            if w.getsampwidth() == 2 and w.getnchannels() == 1:
                raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
                x = raw.astype(np.float32) / np.float32(32768)
                rate = w.getframerate()
                if sample_rate and rate != sample_rate:
                    x = soxr.resample(x, rate, sample_rate)
                return x
    buf = _buffer()
    res = _decode_mono(path, buf)
    if res.status not in USABLE:
        raise ValueError(f"{path}: {res.status}: {res.reason}")
    return _take(buf, res.sample_rate, sample_rate or res.sample_rate)


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write ``(samples,)`` float audio as mono 16-bit FLAC or WAV (by suffix), atomically."""
    path = Path(path)
    pcm = np.clip(np.rint(np.asarray(samples, dtype=np.float32) * 32768), -32768, 32767).astype(
        np.int16
    )
    with atomic_write(path) as tmp:
        if path.suffix.lower() == ".wav":
            with wave.open(str(tmp), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(int(sample_rate))
                w.writeframes(pcm.astype("<i2").tobytes())
        else:
            with av.open(str(tmp), "w", format="flac") as out:
                # 4096-sample blocks (the reference encoder's default) rather than FFmpeg's 1152:
                # a third of the packets to hand through Python, ~30 % faster, slightly smaller.
                stream: Any = out.add_stream(
                    "flac",
                    rate=int(sample_rate),
                    layout="mono",
                    options={"frame_size": "4096", "compression_level": "1"},
                )
                stream.format = "s16"
                frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
                frame.sample_rate = int(sample_rate)
                frame.pts = 0
                out.mux(stream.encode(frame))
                out.mux(stream.encode(None))
    return path


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
            f"extract: {len(self.table)} videos in {self.work / TABLE} "
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


def _audio_rel(video_id: str, fmt: str) -> str:
    return f"{AUDIO_DIR}/{video_id}.{fmt}"


def _check_previous(work: Path, cfg: ExtractConfig) -> None:
    prev_path = work / CONFIG
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

    rlog = RecordLog(work / PARTS)
    prior = rlog.read()
    if cfg.force:
        _remove_outputs(work, prior, cfg.format)
        rlog.clear()
    # Temporaries of a killed run (audio being written, a part being logged) are garbage.
    removed = remove_stale_temporaries(work / AUDIO_DIR) + remove_stale_temporaries(rlog.folder)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    save_config(cfg, work / CONFIG)

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
            "audio_path": _audio_rel(vid, cfg.format),
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
        remove_stale_temporaries(work / AUDIO_DIR)
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
        work / TABLE,
        {"avfuse_version": __version__, "sample_rate": str(cfg.sample_rate), "format": cfg.format},
    )
    failures = table[table["status"] != "ok"].merge(
        manifest[["video_id", "path"]], on="video_id", how="left"
    )[["video_id", "status", "reason", "path"]]
    failures_path = work / FAILURES
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
