"""Kinetics-scale bookkeeping: each stage's fixed costs over a tree of N videos, against goals.

Builds, in a temporary folder (or ``--tmp``):

* a dataset tree of N videos (600 classes, 90 % train / 10 % val) made of hard links to a few
  generated clips, so it costs directory entries, not disk;
* the finished work folder an earlier run would leave, written with avfuse's own writers:
  ``RecordLog`` parts of 32 videos for extract (its default batch) and of 2,000 videos for
  features (one 256 MB shard's worth), ``extract.parquet`` / ``features.parquet``, a committed
  feature store (one frame per video) and hard-linked audio files.

Then runs each measured step in its own process and prints wall time and peak memory
(``ru_maxrss`` of that process and its children, read with ``RUSAGE_CHILDREN`` by a small parent
started for that step alone) against the goal:

* ``avfuse scan``, with ``stat`` calls counted (``os.stat`` / ``os.lstat`` / ``Path.stat``
  patched in that process; ``DirEntry.stat`` of ``os.scandir`` is not seen);
* ``avfuse extract`` and ``avfuse features`` with nothing to do: first on the log as written
  (many parts), then again (the log compacted by the first rerun);
* ``avfuse run`` (scan -> features) over the finished outputs without ``pipeline.json``, then with
  nothing to do;
* the bytes of a pickled :class:`avfuse.store.FeatureStore` (what each DataLoader worker gets).

Usage: ``python -m benchmarks.bench_scale --videos 20000`` (420k: ``--videos 420000``, needs
about 1 GB of disk and several minutes). ``--src DIR`` measures another checkout's ``src``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from avfuse import __version__
from avfuse.extract import _record, write_audio
from avfuse.features import FeaturesConfig
from avfuse.io import RecordLog, read_table, write_table
from avfuse.store import ShardWriter, commit_index, write_meta
from avfuse.workdir import WorkDir
from tests.media import write_tone_video

ROOT = Path(__file__).resolve().parents[1]

N_CLASSES = 600
CLIPS = 4
# ext4 allows 65,000 links to one inode: a larger tree links to more copies.
LINKS_PER_FILE = 60_000

# Runs one step in a child and reports that child's peak RSS (and its children's, e.g. pool
# workers): RUSAGE_CHILDREN of this fresh parent covers exactly that one step.
MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss, cpu = ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime
    print(json.dumps({"rc": p.returncode, "wall_s": wall, "peak_bytes": rss, "cpu_s": cpu,
                      "stdout": p.stdout[-4000:], "stderr": p.stderr[-4000:]}))
    """
)

SCAN = """
import os, pathlib
from avfuse.manifest import ScanConfig, scan
calls = [0]
def counting(fn):
    def f(*a, **k):
        calls[0] += 1
        return fn(*a, **k)
    return f
os.stat = counting(os.stat)
os.lstat = counting(os.lstat)
pathlib.Path.stat = counting(pathlib.Path.stat)
pathlib.Path.lstat = counting(pathlib.Path.lstat)
scan(ScanConfig(root={root!r}, work={work!r}))
print("STATS", calls[0])
"""

EXTRACT = """
from avfuse.extract import ExtractConfig, extract
r = extract(ExtractConfig(work={work!r}, progress=False))
print("PROCESSED", r.processed, r.skipped)
"""

FEATURES = """
from avfuse.features import FeaturesConfig, compute_features
r = compute_features(FeaturesConfig(work={work!r}, progress=False))
print("PROCESSED", r.computed, r.skipped)
"""

RUN = """
from avfuse.pipeline import run
from avfuse.runconfig import RunConfig
r = run(RunConfig(root={root!r}, work={work!r}, stop_after="features"))
print("STAGES", [(s.name, s.status) for s in r.stages])
"""

PICKLE = """
import pickle
from avfuse.store import FeatureStore
print("PICKLE", len(pickle.dumps(FeatureStore({store!r}))))
"""


def measure(code: str, src: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, code], capture_output=True, text=True, env=env, check=True
    )
    res: dict[str, object] = json.loads(out.stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"step failed:\n{res['stderr']}")
    return res


def figures(res: dict[str, object]) -> str:
    """``"wall s (CPU s), peak MB"``: on a shared CPU the CPU time is the steadier figure."""
    wall, cpu, peak = (float(res[k]) for k in ("wall_s", "cpu_s", "peak_bytes"))  # type: ignore[arg-type]
    return f"{wall:.1f} s ({cpu:.1f} cpu), {peak / 2**20:.0f} MB"


def tagged(res: dict[str, object], tag: str) -> list[str]:
    for line in str(res["stdout"]).splitlines():
        if line.startswith(tag + " "):
            return line.split(" ", 1)[1].split()
    raise RuntimeError(f"no {tag} line in {res['stdout']!r}")


def build_tree(root: Path, clips: Path, n: int) -> list[str]:
    """N hard links to the generated clips; returns the video ids (split/class/name)."""
    sources = []
    for i in range(max(CLIPS, -(-n // LINKS_PER_FILE))):
        p = clips / f"clip{i}.mkv"
        write_tone_video(
            p, freq=300.0 + 100 * i, duration=1.0, codec="pcm_s16le", rate=16000, video=False
        )
        sources.append(p)
    ids = []
    made: set[Path] = set()
    for i in range(n):
        split = "val" if (i // N_CLASSES) % 10 == 9 else "train"
        cls = f"class{i % N_CLASSES:03d}"
        folder = root / split / cls
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        os.link(sources[i % len(sources)], folder / f"v{i:07d}.mkv")
        ids.append(f"{split}/{cls}/v{i:07d}")
    return ids


def finish_extract(work: Path, ids: list[str], per_part: int = 32) -> None:
    """What a finished extract leaves: a record log of 32-video parts, audio, the table."""
    audio = work / "audio"
    one = write_audio(work / "one.flac", np.zeros(16000, np.float32), 16000)
    rlog = RecordLog(work / "extract" / "parts")
    records = []
    made: set[Path] = set()
    for k, vid in enumerate(ids):
        if k and k % LINKS_PER_FILE == 0:
            one = write_audio(work / f"one{k}.flac", np.zeros(16000, np.float32), 16000)
        rel = f"audio/{vid}.flac"
        folder = (audio / vid).parent
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        os.link(one, work / rel)
        records.append(
            _record(
                vid,
                "ok",
                "",
                16000,
                codec="pcm_s16le",
                source_sample_rate=16000,
                channels=1,
                duration_s=1.0,
                stream_index=0,
                n_audio_streams=1,
                num_samples=16000,
                audio_path=rel,
            )
        )
    for i in range(0, len(records), per_part):
        rlog.write(records[i : i + per_part])
    table = pd.DataFrame(records).sort_values("video_id").reset_index(drop=True)
    write_table(
        table,
        work / "extract.parquet",
        {"avfuse_version": __version__, "sample_rate": "16000", "format": "flac"},
    )


def one_frame_store(
    work: Path, ids: list[str], per_part: int = 2000, max_mb: float = 256
) -> tuple[FeaturesConfig, list[dict[str, object]]]:
    """A committed store holding one frame per video of ``ids`` (shards of ``max_mb``) and its
    record log in parts of ``per_part`` records; returns the config and the ``ok`` records."""
    cfg = FeaturesConfig(work=work)
    fe = cfg.frontend
    layout = WorkDir(work)
    writer = ShardWriter(
        layout.store, fe.n_mels, dtype=cfg.dtype, max_mb=max_mb, prefix="synthetic"
    )
    x = np.zeros((1, fe.n_mels), np.float32)
    for vid in ids:
        writer.add(vid, x)
    rows = writer.close()
    write_meta(
        layout.store,
        frontend=fe,
        classes=[f"class{k:03d}" for k in range(N_CLASSES)],
        dtype=cfg.dtype,
    )
    commit_index(layout.store, rows)
    records: list[dict[str, object]] = [
        {
            "video_id": r["video_id"],
            "feature_status": "ok",
            "feature_reason": "",
            "num_frames": 1,
            "shard": r["shard"],
            "offset": int(r["offset"]),
        }
        for r in rows
    ]
    rlog = RecordLog(layout.features_parts)
    for i in range(0, len(records), per_part):
        rlog.write(records[i : i + per_part])
    return cfg, records


def finish_features(work: Path, ids: list[str], per_part: int = 2000) -> None:
    """A committed store (one frame per video), its record log and features.parquet."""
    cfg, records = one_frame_store(work, ids, per_part)
    table = pd.DataFrame(records)[["video_id", "feature_status", "feature_reason", "num_frames"]]
    write_table(
        table.sort_values("video_id").reset_index(drop=True),
        WorkDir(work).features_table,
        {"avfuse_version": __version__, "frontend_hash": cfg.frontend.hash(), "dtype": cfg.dtype},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=20000)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the trees (default: /tmp)")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="avfuse sources to measure")
    ap.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    args = ap.parse_args()
    n, src = args.videos, args.src.resolve()
    rows: list[tuple[str, str, str, bool]] = []

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
    keep = contextlib.nullcontext(str(args.keep)) if args.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="avfuse-scale-", dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        root, work = tmp / "data", tmp / "work"
        t0 = time.perf_counter()
        ids = build_tree(root, tmp / "clips", n)
        print(f"tree: {n} videos, {N_CLASSES} classes ({time.perf_counter() - t0:.1f} s)")

        for mod in ("avfuse.extract", "avfuse.features", "avfuse.pipeline"):
            res = measure(f"import {mod}", src)
            rows.append((f"(import {mod} alone)", figures(res), "-", True))
        res = measure(SCAN.format(root=str(root), work=str(work)), src)
        stats = int(tagged(res, "STATS")[0])
        rows.append(("scan: stat calls per file", f"{stats / n:.2f}", "1", stats <= n))
        rows.append(("scan", figures(res), "-", True))
        ids = sorted(read_table(work / "manifest.parquet")["video_id"].astype(str))

        t0 = time.perf_counter()
        finish_extract(work, ids)
        finish_features(work, ids)
        e_parts = len(RecordLog(work / "extract" / "parts").parts())
        f_parts = len(RecordLog(work / "features" / "parts").parts())
        print(
            f"finished state: {e_parts} extract parts, {f_parts} feature parts "
            f"({time.perf_counter() - t0:.1f} s)"
        )

        for stage, code, parts in (
            ("extract", EXTRACT, e_parts),
            ("features", FEATURES, f_parts),
        ):
            for label in (f"first, log of {parts} parts", "second"):
                res = measure(code.format(work=str(work)), src)
                done = tagged(res, "PROCESSED")
                assert done[0] == "0", f"{stage} redid {done[0]} videos"
                wall, peak = float(res["wall_s"]), int(res["peak_bytes"])  # type: ignore[arg-type]
                rows.append(
                    (
                        f"{stage} rerun, nothing to do ({label})",
                        figures(res),
                        "< 10 s, < 300 MB",
                        wall < 10 and peak < 300 * 2**20,
                    )
                )

        (work / "pipeline.json").unlink(missing_ok=True)
        res = measure(RUN.format(root=str(root), work=str(work)), src)
        wall, peak = float(res["wall_s"]), int(res["peak_bytes"])  # type: ignore[arg-type]
        rows.append(
            (
                "run over finished outputs, no pipeline.json",
                figures(res),
                "< 60 s",
                wall < 60,
            )
        )
        res = measure(RUN.format(root=str(root), work=str(work)), src)
        stages = " ".join(tagged(res, "STAGES"))
        assert "'ran'" not in stages and "'resumed'" not in stages, stages
        wall, peak = float(res["wall_s"]), int(res["peak_bytes"])  # type: ignore[arg-type]
        rows.append(
            (
                "run with nothing to do",
                figures(res),
                "< 300 MB",
                peak < 300 * 2**20,
            )
        )
        res = measure(PICKLE.format(store=str(work / "features")), src)
        size = int(tagged(res, "PICKLE")[0])
        rows.append(
            ("feature store pickled per worker", f"{size / 1024:.1f} KB", "a few KB", size < 8192)
        )
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n} videos, avfuse from {src}")
    print(f"{'what':50s} {'now':>32s}  {'goal':18s} met")
    for what, now, goal, ok in rows:
        print(f"{what:50s} {now:>32s}  {goal:18s} {'yes' if ok else 'NO'}")
    print("(one run; wall times depend on the CPU and on what else runs on it)")


if __name__ == "__main__":
    main()
