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

Usage: ``python benchmarks/bench_store.py [--videos 2000] [--windows 50000] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from avfuse.store import FeatureStore, ShardWriter, commit_index, write_meta  # noqa: E402

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
    write_meta(store, frontend={}, frontend_hash="bench", classes=[], dtype="float16", n_mels=64)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="avfuse-bench-store-", dir=args.dir))
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
