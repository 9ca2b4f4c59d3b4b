"""Random 96-frame window reads: the avfuse feature store against one ``.npy`` per clip.

Builds, in a temporary folder, the same features twice (default: 2000 videos of 900-1100
frames x 64 bands):

* the seed project's layout: one ``.npy`` file per 0.96 s clip (96 x 64 float32), a folder per
  video;
* the avfuse store (:mod:`avfuse.store`): float16 shards of up to 256 MB plus ``index.parquet``.

Then reads the same random clip-aligned windows (the only ones the old layout has) from both,
after one warm-up pass so the page cache holds everything, and prints windows/s side by side:

* ``np.load`` per clip                  the old layout
* ``FeatureStore.window``               one memory-map slice per window, copied into a batch
* batches of 64, one gather             a batch's windows read by one fancy index per shard
* ``FeatureStore.window``, any start    windows at arbitrary frames (impossible in the old layout)

plus the disk footprint (allocated blocks) and file count of both layouts.

Usage: ``python -m benchmarks.bench_store [--videos 2000] [--windows 50000] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from avfuse.melspec import FrontendConfig
from avfuse.store import FeatureStore, ShardWriter, commit_index, write_meta

ROOT = Path(__file__).resolve().parents[1]

N_MELS, CLIP = 64, 96


def footprint(folder: Path) -> tuple[int, int]:
    """(bytes allocated on disk, number of files) under ``folder``."""
    total, files = 0, 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
            files += 1
    return total, files


def build(root: Path, n_videos: int, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    ids = [f"train/class{i % 400:03d}/video{i:06d}" for i in range(n_videos)]
    frames = rng.integers(900, 1100, n_videos).tolist()
    store, old = root / "store", root / "per_clip"
    writer = ShardWriter(store, N_MELS, dtype="float16", max_mb=256, prefix="bench")
    t0 = time.perf_counter()
    for vid, t in zip(ids, frames):
        feats = rng.normal(0.0, 2.0, (t, N_MELS)).astype(np.float32)
        writer.add(vid, feats)
        folder = old / vid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(t // CLIP):
            np.save(folder / f"{k:04d}.npy", feats[k * CLIP : (k + 1) * CLIP])
    rows = writer.close()
    write_meta(store, frontend=FrontendConfig(n_mels=N_MELS), classes=[], dtype="float16")
    commit_index(store, rows)
    print(f"built both layouts in {time.perf_counter() - t0:.1f} s")
    return ids, frames


def timed(fn: Callable[[], int], repeats: int) -> float:
    best = float("inf")
    n = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


CGROUP = Path("/sys/fs/cgroup/memory")


def _drop_cache(folder: Path) -> None:
    """Write back and evict ``folder``'s files from the page cache, so the next read is cold."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def training_reads(store_dir: str, order: str, batch: int, n_windows: int, getitems: bool) -> None:
    """Child side: read ``n_windows`` training windows in ``order`` and print windows/s."""
    from avfuse.data import NormStats, TrainWindowSampler, WindowDataset

    st = FeatureStore(store_dir)
    norm = NormStats(np.zeros(st.feature_dim, np.float32), np.ones(st.feature_dim, np.float32))
    window = st.frontend.window_frames
    ds = WindowDataset(st, st.ids, np.zeros(len(st), np.int64), norm, window)
    blocks = st.blocks(st.ids) if order == "blocks" else None
    sampler = TrainWindowSampler(
        ds.frames, windows_per_video=4, window=window, seed=0, blocks=blocks, group=64
    )
    items = [(int(v), int(s)) for v, s in sampler.epoch_items()[:n_windows]]
    t0 = time.perf_counter()
    for b in range(0, len(items), batch):
        chunk = items[b : b + batch]
        if getitems:
            ds.__getitems__(chunk)
        else:
            [ds[i] for i in chunk]
    print(f"RATE {len(items) / (time.perf_counter() - t0):.1f}")


def larger_than_memory(root: Path, limit_mb: int, n_videos: int, n_windows: int, bs: int) -> None:
    """Training windows/s with the store several times larger than the page cache allowed.

    The readers run in a cgroup-v1 memory group limited to ``limit_mb`` (page cache counts
    against it), after the store's pages were written back and evicted.
    """
    store = root / "big"
    writer = ShardWriter(store, N_MELS, dtype="float16", max_mb=256, prefix="big")
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 2.0, (1200, N_MELS)).astype(np.float32)
    ids = [f"train/class{i % 400:03d}/video{i:06d}" for i in range(n_videos)]
    for vid, t in zip(ids, rng.integers(900, 1100, n_videos)):
        writer.add(vid, base[:t])
    write_meta(store, frontend=FrontendConfig(n_mels=N_MELS), classes=[], dtype="float16")
    commit_index(store, writer.close())
    size_mb = footprint(store)[0] / 2**20
    group = CGROUP / f"avfuse-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
    except OSError as exc:
        print(f"\nstore larger than memory: no memory cgroup ({exc}); skipped")
        return
    print(
        f"\ntraining windows, store of {size_mb:.0f} MB read by a process limited to "
        f"{limit_mb} MB (memory cgroup, page cache included), cold start, batches of {bs}"
    )
    try:
        rates = {}
        for order, getitems, name in (
            ("random", False, "random order, item by item (before)"),
            ("random", True, "random order, __getitems__"),
            ("blocks", False, "block-local order, item by item"),
            ("blocks", True, "block-local order, __getitems__ (after)"),
        ):
            _drop_cache(store)
            code = (
                "from benchmarks import bench_store as b; "
                f"b.training_reads({str(store)!r}, {order!r}, {bs}, {n_windows}, {getitems})"
            )
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                cwd=ROOT,
                # Join the group before Python starts, so every page it reads is charged there.
                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
                check=True,
            )
            rates[name] = float(out.stdout.split("RATE")[1])
        base_rate = rates["random order, item by item (before)"]
        for name, r in rates.items():
            print(f"{name:42s} {r:10,.0f} windows/s {r / base_rate:6.1f}x")
    finally:
        group.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument(
        "--larger-than-memory",
        type=int,
        default=0,
        metavar="MB",
        help="also time training reads from a store of --big-videos under a MB memory limit",
    )
    ap.add_argument("--big-videos", type=int, default=8000)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="avfuse-bench-store-", dir=args.dir))
    if args.larger_than_memory:
        try:
            larger_than_memory(
                root, args.larger_than_memory, args.big_videos, args.windows, args.batch
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    try:
        ids, frames = build(root, args.videos)
        rng = np.random.default_rng(1)
        which = rng.integers(0, len(ids), args.windows)
        clip = np.array([rng.integers(0, frames[i] // CLIP) for i in which])
        any_start = np.array([rng.integers(0, frames[i] - CLIP + 1) for i in which])
        paths = [str(root / "per_clip" / ids[i] / f"{k:04d}.npy") for i, k in zip(which, clip)]
        st = FeatureStore(root / "store")
        wids = [ids[i] for i in which]
        bs = args.batch
        out16 = np.empty((bs, CLIP, N_MELS), np.float16)
        out32 = np.empty((bs, CLIP, N_MELS), np.float32)

        def per_clip() -> int:
            for j, p in enumerate(paths):
                out32[j % bs] = np.load(p)
            return len(paths)

        def store_windows(starts: np.ndarray) -> Callable[[], int]:
            def run() -> int:
                for j, (vid, k) in enumerate(zip(wids, starts)):
                    out16[j % bs] = st.window(vid, int(k), CLIP)
                return len(wids)

            return run

        # A whole batch in one fancy-indexing call per shard: no Python loop over windows.
        starts = clip * CLIP

        def gathered() -> int:
            for b in range(0, len(wids), bs):
                ids_b = wids[b : b + bs]
                st.windows(ids_b, starts[b : b + bs], CLIP, out=out16[: len(ids_b)])
            return len(wids)

        # same data, both layouts
        k0 = int(clip[0])
        ref = np.load(paths[0]).astype(np.float16)
        assert np.array_equal(st.window(wids[0], k0 * CLIP, CLIP), ref)

        methods = {
            "np.load, one .npy per clip": per_clip,
            "FeatureStore.window": store_windows(clip * CLIP),
            f"store, batches of {bs} (one gather)": gathered,
            "FeatureStore.window, any start": store_windows(any_start),
        }
        for fn in methods.values():  # warm the page cache
            fn()
        rates = {name: timed(fn, args.repeats) for name, fn in methods.items()}
        base = rates["np.load, one .npy per clip"]
        print(f"\nrandom {CLIP}-frame windows, {args.windows} reads, warm cache")
        print(f"{'method':34s} {'windows/s':>12s} {'vs per-clip':>12s}")
        for name, r in rates.items():
            print(f"{name:34s} {r:12,.0f} {r / base:11.1f}x")
        old_b, old_n = footprint(root / "per_clip")
        new_b, new_n = footprint(root / "store")
        print(f"\ndisk footprint for {args.videos} videos ({sum(frames):,} frames)")
        print(f"{'one .npy per clip (float32)':34s} {old_b / 2**20:10.1f} MB {old_n:8d} files")
        print(f"{'avfuse store (float16)':34s} {new_b / 2**20:10.1f} MB {new_n:8d} files")
        print(f"{'ratio':34s} {old_b / new_b:10.1f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
