"""Stage 2: log-mel features of every video into the feature store (``avfuse features``).

``avfuse features WORK`` reads ``WORK/manifest.parquet`` and either ``WORK/extract.parquet`` with
the extracted sound tracks (default) or, with ``--from-video``, the videos themselves (decoded
and resampled in one pass, no audio written to disk). It writes

* ``WORK/features/``: the store (:mod:`avfuse.store`): ``store.json``, ``index.parquet``,
  ``shards/*.npy``, plus ``config.toml`` (this stage's settings) and ``parts/`` (the record log);
* ``WORK/features.parquet``: ``video_id, feature_status, feature_reason, num_frames`` for every
  video of the manifest.

Statuses: ``ok``; ``padded`` (at least one frame but fewer than ``example_frames``, i.e. under
0.975 s with the VGGish preset: the real frames are stored, and training and prediction pad
them to one example when they cut windows, per their ``short_clips`` policy, so a policy change
needs no recomputation); ``too_short`` (not even one frame); ``silent`` (digital silence or a
level below the silence thresholds, see :func:`avfuse.audio.silence_reason`; nothing stored);
``not_extracted`` (the extract status was not ok/partial, or with ``--from-video`` the video has
no usable audio; the reason is copied); ``error`` (reading the audio failed; retried by a rerun).

Parallelism: videos are packed into batches of about ``shard_mb`` of features (estimated from
the extracted lengths), each batch computed by one worker that writes its own shard file(s)
under a name unique to that execution. A batch's records (index rows included) are logged only
after its shards are fully written, so after a kill a rerun skips committed batches and the final
commit (index, ``store.json``, ``features.parquet``) makes exactly the logged shards visible and
deletes any other shard file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
    audio_levels,
    decode_audio,
    load_audio,
    silence_reason,
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
    inputs_key,
    isin_ids,
    raise_if_disk_full,
    read_json,
    read_table,
    remove_stale_temporaries,
    write_table,
)
from avfuse.manifest import SCORED_STATUSES, load_classes, load_manifest
from avfuse.melspec import FrontendConfig, log_mel
from avfuse.parallel import executor_context, executor_width, map_batches
from avfuse.store import (
    FrontendMismatchError,
    ShardWriter,
    check_shards,
    commit_index,
    remove_unreferenced_shards,
    store_problem,
    write_meta,
)
from avfuse.workdir import StoreLayout, WorkDir

log = logging.getLogger(__name__)

STATUSES = ("ok", "padded", "too_short", "silent", "not_extracted", "error")
COLUMNS = ("video_id", "feature_status", "feature_reason", "num_frames")
# Length assumed for a video whose duration is unknown (--from-video): Kinetics clips are 10 s.
_ASSUMED_SECONDS = 10.0


@dataclass(frozen=True)
class FeaturesConfig(Config):
    """Settings of ``avfuse features``."""

    work: Path = field(
        metadata={
            "help": "work folder holding manifest.parquet (and extract.parquet)",
            "positional": True,
        }
    )
    from_video: bool = field(
        default=False,
        metadata={"help": "decode the videos directly (one pass, no extracted audio needed)"},
    )
    silence_peak_dbfs: float = field(
        default=SILENCE_PEAK_DBFS,
        metadata={"help": "--from-video: a track whose peak is below this (dBFS) is `silent`"},
    )
    silence_rms_dbfs: float = field(
        default=SILENCE_RMS_DBFS,
        metadata={"help": "--from-video: a track whose RMS is below this (dBFS) is `silent`"},
    )
    frontend: FrontendConfig = field(
        default_factory=FrontendConfig,
        metadata={"help": "log-mel front end (default: VGGish preset); --set frontend.n_mels=80"},
    )
    dtype: Literal["float16", "float32"] = field(
        default="float16", metadata={"help": "dtype of the stored features"}
    )
    shard_mb: float = field(
        default=256,
        metadata={"above": 0, "help": "target size of one shard file (MB); one batch per shard"},
    )
    batch_size: int = field(
        default=0,
        metadata={"min": 0, "help": "max videos per task (0: as many as fill one shard)"},
    )
    num_workers: int | None = num_workers_field()
    scheduler: str | None = scheduler_field()
    force: bool = field(
        default=False,
        metadata={"help": "discard the existing store and its log, recompute everything"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


# --- worker side ---------------------------------------------------------------------------


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    # Each worker is one process per core: a multi-threaded BLAS in every one of them would
    # oversubscribe the machine. threadpoolctl is optional (it ships with librosa/scikit-learn).
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


def _load(
    task: dict[str, Any],
    sample_rate: int,
    silence: tuple[float, float] = (SILENCE_PEAK_DBFS, SILENCE_RMS_DBFS),
) -> tuple[np.ndarray | None, str, str]:
    """Samples of one task, or ``None`` with (status, reason) when there is no usable audio."""
    if task["kind"] == "video":
        res = decode_audio(task["path"], sample_rate)
        if res.status == "error":  # reading the video failed, not its content: retried
            raise OSError(res.reason)
        if res.status not in USABLE:
            return None, "not_extracted", f"{res.status}: {res.reason}".rstrip(": ")
        quiet = silence_reason(*audio_levels(res.samples), *silence)
        if quiet:
            return None, "silent", quiet
        note = f"from partial audio: {res.reason}" if res.status == "partial" else ""
        return res.samples, "ok", note
    x = load_audio(task["path"], sample_rate=sample_rate)
    note = f"from partial audio: {task['reason']}" if task.get("upstream") == "partial" else ""
    return x, "ok", note


def _feature_one(
    task: dict[str, Any],
    frontend: FrontendConfig,
    writer: ShardWriter,
    silence: tuple[float, float] = (SILENCE_PEAK_DBFS, SILENCE_RMS_DBFS),
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "video_id": task["video_id"],
        "feature_status": "error",
        "feature_reason": "",
        "num_frames": 0,
    }
    try:
        x, status, reason = _load(task, frontend.sample_rate, silence)
        if x is None:
            rec.update(feature_status=status, feature_reason=reason)
            return rec
        if not np.isfinite(x).all():
            rec["feature_reason"] = "audio holds NaN or infinite samples"
            return rec
        feats = log_mel(x, frontend)
        rec["num_frames"] = len(feats)
        bad = int(np.count_nonzero(~np.isfinite(feats.astype(writer.dtype, copy=False))))
        if bad:
            # Never stored as ok: a NaN would poison every window of the video and every
            # score computed from it.
            rec["feature_reason"] = f"{bad} NaN or infinite feature value(s)"
            return rec
        seconds = len(x) / frontend.sample_rate
        example_s = frontend.min_samples / frontend.sample_rate
        if len(feats) == 0:
            rec["feature_status"] = "too_short"
            rec["feature_reason"] = (
                f"{seconds:.3f} s of audio gives no frame "
                f"({frontend.win_length / frontend.sample_rate:.3f} s needed)"
            )
            return rec
        writer.add(task["video_id"], feats)
        if len(feats) < frontend.example_frames:
            # The real frames are stored; windows are padded when they are cut.
            short = (
                f"{seconds:.2f} s < {example_s:.3f} s ({len(feats)} of "
                f"{frontend.example_frames} frames), padded to one example"
            )
            rec.update(
                feature_status="padded", feature_reason="; ".join(filter(None, [short, reason]))
            )
        else:
            rec.update(feature_status="ok", feature_reason=reason)
    except Exception as exc:  # one bad file fails alone; a full disk stops the run
        raise_if_disk_full(exc, writer.dir)
        rec["feature_reason"] = error_reason(exc)
    return rec


def _feature_batch(
    tasks: list[dict[str, Any]],
    store: str,
    frontend: FrontendConfig,
    dtype: str,
    shard_mb: float,
    silence: tuple[float, float] = (SILENCE_PEAK_DBFS, SILENCE_RMS_DBFS),
) -> list[dict[str, Any]]:
    """Worker side: features of one batch into this execution's own shard(s).

    Returns one record per task; ``ok`` records carry the rest of their index row (``shard,
    offset``; ``num_frames`` is its frame count). Returns only after every shard is completely
    written.
    """
    # A fresh prefix per execution: a batch retried elsewhere never overwrites, and the copy that
    # was not logged is an unreferenced file the commit deletes.
    writer = ShardWriter(
        store, frontend.n_mels, dtype=dtype, max_mb=shard_mb, prefix=uuid.uuid4().hex[:16]
    )
    with _one_blas_thread():
        records = [_feature_one(t, frontend, writer, silence) for t in tasks]
    rows = {r["video_id"]: r for r in writer.close()}
    for rec in records:
        row = rows.get(rec["video_id"])
        rec["shard"] = row["shard"] if row else ""
        rec["offset"] = int(row["offset"]) if row else -1
    return records


# --- driver side ---------------------------------------------------------------------------


@dataclass
class FeaturesResult:
    """What :func:`compute_features` did; ``table`` has one row per manifest video.

    ``table`` is read from ``features.parquet`` when first asked for if the run did not build
    it (a rerun with nothing to do never loads it).
    """

    work: Path
    store: Path
    computed: int
    skipped: int
    elapsed_s: float
    num_shards: int
    store_bytes: int
    counts: dict[str, int]
    stored_frames: int
    _table: pd.DataFrame | None = field(default=None, repr=False)

    @functools.cached_property
    def table(self) -> pd.DataFrame:
        if self._table is not None:
            return self._table
        return read_table(WorkDir(self.work).features_table)

    def summary(self) -> str:
        counts = self.counts
        n = sum(counts.values())
        order = [s for s in STATUSES if s in counts] + sorted(set(counts) - set(STATUSES))
        n_stored = sum(counts.get(s, 0) for s in SCORED_STATUSES)
        rate = self.computed / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"features: {n_stored} of {n} videos in {self.store} "
            f"({self.stored_frames} frames, {self.num_shards} shard(s), "
            f"{self.store_bytes / 2**20:.1f} MB)",
            f"  computed {self.computed} now ({rate:.1f} videos/s), {self.skipped} already done",
            "  " + ", ".join(f"{s}: {counts[s]}" for s in order),
        ]
        if n_stored < n:
            cols = ["video_id", "feature_status", "feature_reason"]
            t = pq.read_table(WorkDir(self.work).features_table, columns=cols)
            bad = t.filter(
                pc.invert(pc.is_in(t.column("feature_status"), value_set=pa.array(SCORED_STATUSES)))
            )
            for vid, st, why in zip(*(bad.column(c).slice(0, 5).to_pylist() for c in cols)):
                lines.append(f"  {vid}: {st}: {why}")
            if len(bad) > 5:
                lines.append(f"  ... {len(bad) - 5} more in {WorkDir(self.work).features_table}")
        return "\n".join(lines)


def _check_previous(store: Path, cfg: FeaturesConfig) -> None:
    """Refuse to mix front ends or dtypes in one store (``force`` starts afresh instead)."""
    want = (cfg.frontend.hash(), cfg.dtype)
    meta: Any = None
    if StoreLayout(store).meta.exists():
        try:
            meta = read_json(StoreLayout(store).meta)
        except (ValueError, OSError) as exc:  # rewritten by this run's commit
            log.warning("%s is unreadable (%s): rewriting it", StoreLayout(store).meta, exc)
    if isinstance(meta, dict):
        have = (str(meta.get("frontend_hash")), str(meta.get("dtype")))
        if have != want:
            raise FrontendMismatchError(
                f"{store} holds features of front end {have[0]} ({have[1]}), this run asks for "
                f"{want[0]} ({want[1]}); pass --force to discard them, or use another work folder"
            )
    cfg_path = WorkDir(store.parent).features_config
    prev: FeaturesConfig | None = None
    if cfg_path.exists():  # an interrupted run's parts belong to its settings
        with contextlib.suppress(Exception):  # unreadable settings: nothing to compare with
            prev = load_config(FeaturesConfig, cfg_path)
    if prev is not None:
        have = (prev.frontend.hash(), prev.dtype)
        if have != want:
            raise FrontendMismatchError(
                f"{store} holds an unfinished run with front end {have[0]} ({have[1]}), "
                f"this run asks for {want[0]} ({want[1]}); pass --force to discard it"
            )


def _clear(store: Path) -> None:
    check_inside_work(store, folder=True)  # never delete through a link out of WORK
    layout = StoreLayout(store)
    for path in (layout.meta, layout.index):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    shutil.rmtree(layout.shards, ignore_errors=True)
    shutil.rmtree(layout.parts, ignore_errors=True)


def _plan_tasks(
    work: Path, cfg: FeaturesConfig, manifest: pd.DataFrame, done: pa.Array
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(tasks to compute, records of videos with no audio to compute from, how many videos
    with audio are ``done`` already). Task dicts are built for the videos to compute only: a
    dict per video costs ~350 MB at 420k."""
    tasks: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    fe = cfg.frontend
    assumed = int(_ASSUMED_SECONDS * fe.sample_rate)
    if cfg.from_video:
        has_file = manifest["path"].map(lambda p: isinstance(p, str) and bool(p)).to_numpy(bool)
        for vid in manifest["video_id"][~has_file].astype(str).tolist():
            skipped.append(_skip(vid, "missing: no file for this row"))
        with_file = manifest[has_file]
        is_done = isin_ids(with_file["video_id"], done)
        for vid, path in zip(
            with_file["video_id"][~is_done].astype(str).tolist(),
            with_file["path"][~is_done].tolist(),
            strict=True,
        ):
            tasks.append({"video_id": vid, "kind": "video", "path": path, "samples": assumed})
        return tasks, skipped, int(is_done.sum())

    ext_path = WorkDir(work).extract_table
    if not ext_path.exists():
        raise FileNotFoundError(
            f"{ext_path} not found: run `avfuse extract {work}` first, or pass --from-video"
        )
    cols = ["video_id", "audio_path", "status", "reason", "sample_rate", "num_samples"]
    try:
        have = set(pq.read_schema(ext_path).names)
        ext = read_table(ext_path, [c for c in cols if c in have])  # 6 of its 15 columns
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(
            f"{ext_path}: unreadable ({' '.join(str(exc).split())[:160]}); run "
            f"`avfuse extract {work}` again to rebuild it"
        ) from None
    for col in cols:
        if col not in ext.columns:
            ext[col] = None
    ext = ext.drop_duplicates("video_id", keep="last")
    # One merge, not a look-up per video: the manifest may hold ~400k rows.
    joined = (
        manifest[["video_id"]]
        .astype({"video_id": str})
        .merge(ext[cols], on="video_id", how="left", indicator=True)
    )
    del ext
    audio = joined["audio_path"]
    usable = (
        (joined["_merge"] == "both").to_numpy(bool)
        & joined["status"].astype(str).isin(USABLE).to_numpy(bool)
        & audio.map(lambda a: isinstance(a, str) and bool(a)).to_numpy(bool)
    )
    for vid, merged, status, reason in zip(
        *(joined[c][~usable].tolist() for c in ("video_id", "_merge", "status", "reason")),
        strict=True,
    ):
        vid = str(vid)
        if merged != "both":
            missing = f"not in {ext_path.name} (run `avfuse extract` again)"
            skipped.append(_skip(vid, missing))
            continue
        status = str(status)
        reason = reason if isinstance(reason, str) else ""
        why = f"{status}: {reason}".rstrip(": ")
        skipped.append(_skip(vid, why, "silent" if status == "silent" else ""))
    is_done = isin_ids(joined["video_id"], done) & usable
    todo = joined[usable & ~is_done]
    root = str(work)
    # Column lists, not to_dict("records"): a dict per row costs seconds at 400k videos.
    for vid, audio_rel, status, reason, rate, n in zip(
        *(todo[c].tolist() for c in cols), strict=True
    ):
        reason = reason if isinstance(reason, str) else ""
        ratio = fe.sample_rate / float(rate) if pd.notna(rate) and rate > 0 else 1.0
        tasks.append(
            {
                "video_id": str(vid),
                "kind": "audio",
                "path": os.path.join(root, audio_rel),
                "upstream": str(status),
                "reason": reason,
                "samples": int(float(n) * ratio) if pd.notna(n) else assumed,
            }
        )
    return tasks, skipped, int(is_done.sum())


def _skip(video_id: str, reason: str, status: str = "") -> dict[str, Any]:
    return {
        "video_id": video_id,
        "feature_status": status or "not_extracted",
        "feature_reason": reason,
        "num_frames": 0,
    }


def _pack(tasks: list[dict[str, Any]], cfg: FeaturesConfig, width: int) -> list[list[Any]]:
    """Batches of about one shard of features each, and at least ~2 per worker when possible."""
    fe = cfg.frontend
    itemsize = np.dtype(cfg.dtype).itemsize
    rows = [max(1, fe.num_frames(int(t["samples"]))) for t in tasks]
    shard_rows = max(1, int(cfg.shard_mb * 2**20 / (fe.n_mels * itemsize)))
    cap_rows = max(1, min(shard_rows, -(-sum(rows) // (2 * width))))
    cap_videos = cfg.batch_size if cfg.batch_size > 0 else len(tasks)
    batches: list[list[Any]] = []
    cur: list[Any] = []
    cur_rows = 0
    for t, n in zip(tasks, rows):
        if cur and (cur_rows + n > cap_rows or len(cur) >= cap_videos):
            batches.append(cur)
            cur, cur_rows = [], 0
        cur.append({k: v for k, v in t.items() if k != "samples"})
        cur_rows += n
    if cur:
        batches.append(cur)
    return batches


def _column(block: Any, name: str, kind: pa.DataType, fill: Any) -> pa.Array:
    """``block[name]`` as ``kind`` with nulls as ``fill`` (all ``fill`` where the column is
    missing: a log part an older version wrote)."""
    if name not in block.column_names:
        return pa.array([fill] * block.num_rows, kind)
    col = block.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return pc.fill_null(col.cast(kind), fill)


def _done_ids(
    blocks: Iterable[Any], store: Path, cfg: FeaturesConfig, ids: bool = True
) -> tuple[pa.Array, int]:
    """The done rule: ``(videos of the log that need no recomputing, records that do)``.

    ``blocks``: the record log as Arrow tables or record batches (the whole log, or one part
    streamed a block at a time: Arrow arrays column-wise, cheap at 420k videos). An error is
    retried; a stored video (``ok`` or ``padded``) whose shard is gone, truncated or damaged
    is redone (the shards' headers and sizes are read); so is a ``too_short`` clip an older
    version left out (this one stores it). ``ids=False`` counts without keeping the ids.
    """
    shard_dir = StoreLayout(store).shards
    present = pa.array(
        sorted(p.name for p in shard_dir.iterdir()) if shard_dir.exists() else [], pa.string()
    )
    kept: list[tuple[pa.Array, pa.Array]] = []
    ends: dict[str, int] = {}
    redo = 0
    for b in blocks:
        status = _column(b, "feature_status", pa.string(), "")
        shard = _column(b, "shard", pa.string(), "")
        frames = _column(b, "num_frames", pa.int64(), 0)
        stored = pc.is_in(status, value_set=pa.array(SCORED_STATUSES))
        lost = pc.and_(stored, pc.invert(pc.is_in(shard, value_set=present)))
        short = pc.and_(pc.equal(status, "too_short"), pc.greater(frames, 0))
        bad = pc.or_(pc.or_(pc.equal(status, "error"), lost), short)
        redo += int(pc.sum(bad.cast(pa.int64())).as_py() or 0)
        # The rows each present shard must hold: the end of its last stored video.
        held = pc.and_(stored, pc.invert(lost))
        end = pc.add(_column(b, "offset", pa.int64(), 0), frames)
        per = pa.table({"shard": shard.filter(held), "end": end.filter(held)})
        for row in per.group_by("shard").aggregate([("end", "max")]).to_pylist():
            ends[row["shard"]] = max(ends.get(row["shard"], 0), int(row["end_max"]))
        if ids:
            keep = pc.invert(bad)
            kept.append((_column(b, "video_id", pa.string(), "").filter(keep), shard.filter(keep)))
    damaged = check_shards(store, ends, cfg.frontend.n_mels, cfg.dtype)
    for name, why in sorted(damaged.items()) if ids else ():  # counting: the full run says
        log.warning("shard %s: %s; recomputing its videos", StoreLayout(store).shard(name), why)
    done = pa.array([], pa.string())
    if kept:
        done = pa.concat_arrays([v for v, _ in kept])
        in_damaged = pc.is_in(
            pa.concat_arrays([sh for _, sh in kept]),
            value_set=pa.array(sorted(damaged), pa.string()),
        )
        redo += int(pc.sum(in_damaged.cast(pa.int64())).as_py() or 0)
        done = done.filter(pc.invert(in_damaged))
    elif damaged:
        redo += len(damaged)  # counted without the ids: one at least per damaged shard
    return done, redo


def _dir_bytes(store: StoreLayout) -> int:
    return sum(p.stat().st_size for p in store.shard_files())


def compute_features(cfg: FeaturesConfig, executor: Executor | None = None) -> FeaturesResult:
    """Compute ``(frames, n_mels)`` log-mel features of every video into ``WORK/features``.

    Returns a :class:`FeaturesResult`; per-video statuses go to ``WORK/features.parquet``.
    Raises :class:`avfuse.store.FrontendMismatchError` if the store holds features of another
    front end or dtype (unless ``force``).
    """
    t0 = time.perf_counter()
    work = Path(cfg.work)
    store = WorkDir(work).store
    classes = load_classes(work)
    if cfg.force:
        _clear(store)
    else:
        _check_previous(store, cfg)
    rlog = RecordLog(WorkDir(work).features_parts)
    removed = remove_stale_temporaries(store)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    save_config(cfg, WorkDir(work).features_config)
    if not cfg.force and _nothing_to_do(work, cfg, rlog):
        # features.parquet and the index already hold exactly this log over these inputs.
        return _fast_result(work, cfg, time.perf_counter() - t0)

    manifest = load_manifest(
        work, stages=False, columns=("video_id", "path") if cfg.from_video else ("video_id",)
    )
    prior = rlog.read()
    done = _done_ids([prior], store, cfg)[0] if prior.num_rows else pa.array([], pa.string())
    todo, skipped, n_done = _plan_tasks(work, cfg, manifest, done)
    del done
    new: list[dict[str, Any]] = []
    if todo:
        fn = functools.partial(
            _feature_batch,
            store=str(store),
            frontend=cfg.frontend,
            dtype=cfg.dtype,
            shard_mb=cfg.shard_mb,
            silence=(cfg.silence_peak_dbfs, cfg.silence_rms_dbfs),
        )
        with executor_context(executor, cfg.num_workers, cfg.scheduler) as ex:
            batches = _pack(todo, cfg, executor_width(ex))
            for records in map_batches(
                fn, batches, ex, desc="features", unit="video", progress=cfg.progress
            ):
                # Logged only now, when the worker has returned: its shards are complete.
                rlog.write(records)
                new.extend(records)

    # The log as a rerun would read it (newest record wins), without reading every part again.
    logged = prior.to_pandas() if prior.num_rows else pd.DataFrame()
    del prior
    if new:
        logged = pd.concat([f for f in (logged, pd.DataFrame(new)) if len(f)], ignore_index=True)
        logged = logged.drop_duplicates("video_id", keep="last").reset_index(drop=True)
    # Before the commit, so the committed table names the log's one part: a kill between the
    # two leaves a compacted log, which the next run commits (its inputs key differs).
    if len(rlog.parts()) > 1:
        rlog.compact()
    table, shards = _commit(
        work, store, cfg, manifest, classes, logged, skipped, _inputs_key(work, cfg, rlog)
    )
    stored = table["feature_status"].isin(SCORED_STATUSES)
    return FeaturesResult(
        work=work,
        store=store,
        computed=len(todo),
        skipped=n_done,
        elapsed_s=time.perf_counter() - t0,
        num_shards=len(shards),
        store_bytes=_dir_bytes(StoreLayout(store)),
        counts=dict(Counter(table["feature_status"].astype(str).tolist())),
        stored_frames=int(table.loc[stored, "num_frames"].sum()),
        _table=table,
    )


def _inputs_key(work: Path, cfg: FeaturesConfig, rlog: RecordLog) -> str:
    """What features.parquet is built from: the settings, the manifest and extract table
    files, the log's parts."""
    wd = WorkDir(work)
    settings = [__version__, cfg.frontend.hash(), cfg.dtype]
    return inputs_key(rlog, [wd.manifest, wd.extract_table], settings)


def _nothing_to_do(work: Path, cfg: FeaturesConfig, rlog: RecordLog) -> bool:
    """Whether the committed store is this log over unchanged inputs, every shard intact and
    every video with usable audio done. Column-wise: cheap at 420k videos."""
    wd = WorkDir(work)
    parts = rlog.parts()
    if cfg.from_video or len(parts) != 1:
        return False
    if not committed_from(wd.features_table, _inputs_key(work, cfg, rlog)):
        return False
    # An unreadable store.json or index.parquet is rewritten by the commit of a full run.
    problem = store_problem(wd.store)
    if problem:
        log.warning("%s; rebuilding the store's index", problem)
        return False
    # Streamed in blocks of the log's one part (checked above): the whole log as a table
    # costs ~120 MB at 420k videos, a block ~2 MB.
    cols = ["feature_status", "shard", "offset", "num_frames"]
    try:
        part = pq.ParquetFile(parts[0])
    except (pa.ArrowInvalid, OSError):
        return False  # the full run sets the damaged part aside and redoes its videos
    if not set(cols) <= set(part.schema_arrow.names):
        return False
    blocks = part.iter_batches(batch_size=_BLOCK, columns=cols)
    # Every video with usable audio is in the log: the commit that wrote this inputs key
    # computed (and logged) every one that was not, over the same extract table.
    return _done_ids(blocks, wd.store, cfg, ids=False)[1] == 0


_BLOCK = 65536


def _fast_result(work: Path, cfg: FeaturesConfig, elapsed: float) -> FeaturesResult:
    """The figures of the committed table and index, read in blocks."""
    wd = WorkDir(work)
    counts: dict[str, int] = {}
    frames = 0
    table = pq.ParquetFile(wd.features_table)
    for b in table.iter_batches(batch_size=_BLOCK, columns=["feature_status", "num_frames"]):
        status = b.column("feature_status").cast(pa.string())
        for d in pc.value_counts(status).to_pylist():
            counts[str(d["values"])] = counts.get(str(d["values"]), 0) + int(d["counts"])
        stored = pc.is_in(status, value_set=pa.array(SCORED_STATUSES))
        frames += int(pc.sum(b.column("num_frames").filter(stored)).as_py() or 0)
    shards: set[str] = set()
    for b in pq.ParquetFile(StoreLayout(wd.store).index).iter_batches(
        batch_size=_BLOCK, columns=["shard"]
    ):
        shards.update(pc.unique(b.column("shard")).to_pylist())
    return FeaturesResult(
        work=work,
        store=wd.store,
        computed=0,
        skipped=sum(counts.get(s, 0) for s in SCORED_STATUSES),
        elapsed_s=elapsed,
        num_shards=len(shards),
        store_bytes=_dir_bytes(StoreLayout(wd.store)),
        counts=counts,
        stored_frames=frames,
    )


def _commit(
    work: Path,
    store: Path,
    cfg: FeaturesConfig,
    manifest: pd.DataFrame,
    classes: list[str],
    logged: pd.DataFrame,
    skipped: list[dict[str, Any]],
    inputs: str,
) -> tuple[pd.DataFrame, set[str]]:
    ids = manifest["video_id"].astype(str)
    skip_ids = pd.Series([r["video_id"] for r in skipped], dtype=str)
    if len(logged):
        # Upstream decides for videos that now have no audio; the log for the rest.
        vid = logged["video_id"]
        logged = logged[isin_ids(vid, ids) & ~isin_ids(vid, skip_ids)]
    ok = logged[logged["feature_status"].isin(SCORED_STATUSES)] if len(logged) else logged
    # Columns, not a dict per row: ~400 MB at 420k videos.
    index_rows = pd.DataFrame(
        {
            "video_id": ok["video_id"].astype(str) if len(ok) else pd.Series([], dtype=str),
            "shard": ok["shard"].astype(str) if len(ok) else pd.Series([], dtype=str),
            "offset": ok["offset"] if len(ok) else pd.Series([], dtype="int64"),
            "frames": ok["num_frames"] if len(ok) else pd.Series([], dtype="int64"),
        }
    )
    shard_dir = StoreLayout(store).shards
    missing = set(index_rows["shard"].unique().tolist()) - (
        {p.name for p in shard_dir.iterdir()} if shard_dir.exists() else set()
    )
    if missing:  # a logged shard vanished while this run went on: never commit a dangling index
        raise RuntimeError(f"shard file(s) missing from {shard_dir}: {sorted(missing)[:3]}")
    write_meta(store, frontend=cfg.frontend, classes=classes, dtype=cfg.dtype)
    index = commit_index(store, index_rows)
    frames = [
        pd.DataFrame(logged, columns=list(COLUMNS)) if len(logged) else None,
        pd.DataFrame(skipped, columns=list(COLUMNS)) if skipped else None,
    ]
    table = pd.concat([f for f in frames if f is not None], ignore_index=True)
    table = pd.DataFrame(table, columns=list(COLUMNS))
    table["num_frames"] = table["num_frames"].fillna(0).astype("int64")
    table["feature_reason"] = table["feature_reason"].fillna("").astype(str)
    table = table.sort_values("video_id").reset_index(drop=True)
    lost = ids[~isin_ids(ids, table["video_id"])]
    if len(lost):  # cannot happen unless a log part was lost; say so, never drop videos silently
        raise RuntimeError(
            f"{len(lost)} video(s) have no feature record, e.g. {sorted(lost.tolist())[:3]}"
        )
    meta = {"avfuse_version": __version__, "frontend_hash": cfg.frontend.hash(), "dtype": cfg.dtype}
    meta[INPUTS] = inputs
    write_table(table, WorkDir(work).features_table, meta)
    keep = set(index["shard"].astype(str))
    removed = remove_unreferenced_shards(store, keep)
    if removed:
        log.info("removed %d shard file(s) no committed video refers to", removed)
    return table, keep


# ---------------------------------------------------------------------------------------------
# What the orchestrator asks of this stage: its outputs, whether they are done, and redoing
# chosen videos. The record log's layout stays this module's own.


def outputs(cfg: FeaturesConfig) -> list[Path]:
    """The files a finished run leaves: ``features.parquet`` and the store's ``store.json``
    (their sizes and times say whether it was rerun)."""
    wd = WorkDir(cfg.work)
    return [wd.features_table, wd.store_meta]


def is_done(cfg: FeaturesConfig) -> bool:
    """Whether the outputs exist and the store can serve its index as it stands (its index and
    the shards' headers are read: cheap at any size). Says why, in the log, when it cannot."""
    if not all(p.exists() for p in outputs(cfg)):
        return False
    problem = store_problem(WorkDir(cfg.work).store)
    if problem:
        log.warning("features are not up to date: %s", problem)
    return not problem


def finished_settings(cfg: FeaturesConfig) -> FeaturesConfig | None:
    """The settings of the finished run whose outputs are in place; ``None`` when there is
    none, or when a later run started and may not have finished."""
    path = WorkDir(cfg.work).features_config
    return finished_run_settings(FeaturesConfig, path, outputs(cfg), saved_at_start=True)


def invalidate(work: str | Path, video_ids: Sequence[str], reason: str) -> int:
    """Log ``video_ids`` as failed with ``reason``, so that the next run, which retries failed
    records, computes exactly these videos again (a video file replaced, say). Returns how
    many were logged."""
    ids = [str(v) for v in video_ids]
    RecordLog(WorkDir(work).features_parts).write(
        {
            "video_id": v,
            "feature_status": "error",
            "feature_reason": reason,
            "num_frames": 0,
            "shard": "",
            "offset": -1,
        }
        for v in ids
    )
    return len(ids)


__all__ = [
    "COLUMNS",
    "STATUSES",
    "FeaturesConfig",
    "FeaturesResult",
    "compute_features",
    "finished_settings",
    "invalidate",
    "is_done",
    "outputs",
]
