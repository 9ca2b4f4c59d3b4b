"""The features stage's done rule: Arrow (what avfuse uses) against the pandas rule it replaced.

Which videos of the record log need no recomputing (an error is retried, a stored video whose
shard is gone or damaged is redone, a ``too_short`` clip with frames is redone) is decided once
per ``avfuse features`` run. avfuse had two codes for it: a pandas one over the log read as a
DataFrame (full runs) and an Arrow one over the log's blocks (reruns with nothing to do). It now
has the Arrow one only; this measures both on the log as a run reads it (``RecordLog.read()``,
then the rule), on a small folder (~20 videos, where a fixed cost would show) and a large one
(100k records), and checks they pick the same videos.

The state is built with avfuse's own writers (one frame per video, shards of 2,000 videos, a
log of 2,000-record parts), then 1 % of the videos logged as errors, 1 % as ``too_short`` with
frames, and the last shard truncated.

Usage: ``python -m benchmarks.bench_done_rule`` (``--sizes 20,100000``, ``--repeat 7``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from avfuse.features import FeaturesConfig, _done_ids
from avfuse.io import RecordLog
from avfuse.manifest import SCORED_STATUSES
from avfuse.store import check_shards, needed_rows
from avfuse.workdir import StoreLayout, WorkDir
from benchmarks.bench_scale import one_frame_store


def pandas_done_ids(store: Path, prior: pd.DataFrame, cfg: FeaturesConfig) -> pd.Series:
    """The pandas rule avfuse had for full runs (its shard check covered ``ok`` records)."""
    if not len(prior):
        return pd.Series([], dtype=str)
    shard_dir = StoreLayout(store).shards
    present = {p.name for p in shard_dir.iterdir()} if shard_dir.exists() else set()
    ok = prior[prior["feature_status"] == "ok"]
    rows = needed_rows(
        pd.DataFrame({"shard": ok["shard"], "offset": ok["offset"], "frames": ok["num_frames"]})
    )
    present -= set(check_shards(store, rows, cfg.frontend.n_mels, cfg.dtype))
    status = prior["feature_status"].astype(str)
    lost = status.isin(SCORED_STATUSES) & ~prior["shard"].astype(str).isin(present)
    short = (status == "too_short") & (pd.to_numeric(prior["num_frames"]).fillna(0) > 0)
    return prior["video_id"].astype(str)[~((status == "error") | lost | short)]


def build(work: Path, n: int) -> FeaturesConfig:
    """A committed store of ``n`` one-frame videos in shards of 2,000, its log, 1 % errors,
    1 % ``too_short`` clips with frames (one each below 100 videos), one shard truncated."""
    ids = [f"train/class{i % 600:03d}/v{i:07d}" for i in range(n)]
    # 2,000 one-frame videos a shard, as bench_scale's 256 MB shards hold 2,000 10 s clips.
    fe = FeaturesConfig(work=work).frontend
    cfg, _ = one_frame_store(work, ids, per_part=2000, max_mb=2000 * fe.n_mels * 2 / 2**20)
    store = WorkDir(work).store
    rlog = RecordLog(WorkDir(work).features_parts)
    step = n if n < 200 else n // 100  # below 200 videos: one of each
    redo = [
        {"video_id": v, "feature_status": "error", "feature_reason": "x", "num_frames": 0}
        for v in ids[::step]
    ]
    redo += [
        {"video_id": v, "feature_status": "too_short", "feature_reason": "", "num_frames": 3}
        for v in ids[1::step]
    ]
    rlog.write(redo)
    shards = StoreLayout(store).shard_files()
    if len(shards) > 1:  # a small folder's one shard stays whole: some videos are done
        shards[-1].write_bytes(shards[-1].read_bytes()[:-64])
    return cfg


def timed(a: Callable[[], Any], b: Callable[[], Any], repeat: int) -> tuple[float, float, Any, Any]:
    """Best seconds of ``a`` and ``b`` (the least disturbed run), run alternately (a busy
    machine slows both alike),
    and their last results."""
    ta, tb, out_a, out_b = [], [], None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out_a = a()
        t1 = time.perf_counter()
        out_b = b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return min(ta), min(tb), out_a, out_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,100000")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    logging.getLogger("avfuse").setLevel(logging.ERROR)  # the damaged shard, once per repeat
    print("best of --repeat runs; ratio = pandas time / Arrow time (> 1: Arrow is faster)")
    print(
        f"{'records':>8} | {'pandas rule':>11} | {'Arrow rule':>10} | ratio | "
        f"{'pandas read+rule':>16} | {'Arrow read+rule':>15} | ratio"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="avfuse-done-") as tmp:
            print(measure(Path(tmp), n, args.repeat))


def measure(work: Path, n: int, repeat: int) -> str:
    """One table row: both rules alone, then each after the read a run does."""
    cfg = build(work, n)
    store, rlog = WorkDir(work).store, RecordLog(WorkDir(work).features_parts)
    table = rlog.read()
    frame = table.to_pandas()
    r_pd, r_pa, old, new = timed(
        lambda: pandas_done_ids(store, frame, cfg),
        lambda: _done_ids([table], store, cfg)[0],
        repeat,
    )
    assert sorted(old.tolist()) == sorted(new.to_pylist()), "the rules disagree"
    t_pd, t_pa, _, _ = timed(
        lambda: pandas_done_ids(store, rlog.read().to_pandas(), cfg),
        lambda: _done_ids([rlog.read()], store, cfg)[0],
        repeat,
    )
    return (
        f"{n:>8} | {r_pd * 1e3:>8.1f} ms | {r_pa * 1e3:>7.1f} ms | {r_pd / r_pa:>4.2f}x | "
        f"{t_pd * 1e3:>13.1f} ms | {t_pa * 1e3:>12.1f} ms | {t_pd / t_pa:>4.2f}x"
        f"  ({len(new)} of {n} done)"
    )


if __name__ == "__main__":
    main()
