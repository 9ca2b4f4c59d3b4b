"""The baseline's statistics: per-band mean + std against the default ``dynamics`` set.

Fits each on the training videos of generated sets (and of a work folder you name, e.g. the
demo's) and prints val top-1 over the videos in the store, side by side:

* the ``bench_short_clips`` set (band noise, chirps up and down, pulses; 60 % under 1 s);
* ``tests/synthetic.py`` structured sets (sweeps up/down and fast/slow pulses over one band
  group, which per-band mean and std cannot tell apart).

    .venv/bin/python -m benchmarks.bench_baseline
    .venv/bin/python -m benchmarks.bench_baseline --work demo-work --splits heldout,val
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from avfuse.baseline import fit_baseline
from avfuse.manifest import load_manifest
from avfuse.store import FeatureStore
from benchmarks.bench_short_clips import build
from tests.synthetic import make_synthetic_work

STATS = ("meanstd", "dynamics")


def top1(store: FeatureStore, man: pd.DataFrame, split: str, fitted: object) -> tuple[float, int]:
    rows = man[(man["split"] == split) & (man["label_index"] >= 0)]
    rows = rows[rows["video_id"].isin(set(store.ids))].sort_values("video_id")
    p = fitted.predict_proba(store, rows["video_id"].tolist())  # type: ignore[attr-defined]
    return float(np.mean(p.argmax(1) == rows["label_index"].to_numpy())), len(rows)


def measure(name: str, work: Path, splits: list[str]) -> None:
    store = FeatureStore(work / "features")
    man = load_manifest(work, stages=False)
    tr = man[(man["split"] == "train") & (man["label_index"] >= 0)]
    tr = tr[tr["video_id"].isin(set(store.ids))].sort_values("video_id")
    n_classes = int(man["label_index"].max()) + 1
    fits = {
        s: fit_baseline(
            store, tr["video_id"].tolist(), tr["label_index"].to_numpy(), n_classes, stats=s
        )
        for s in STATS
    }
    for split in splits:
        acc = {s: top1(store, man, split, f) for s, f in fits.items()}
        a, b = acc["meanstd"][0], acc["dynamics"][0]
        print(
            f"{name:<34}{split:<9}{acc['meanstd'][1]:>6}{100 * a:>10.1f}%{100 * b:>10.1f}%"
            f"{100 * (b - a):>+9.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="also measure on this work folder")
    ap.add_argument("--splits", default="val", help="splits of --work to score")
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()
    print(f"{'set':<34}{'split':<9}{'videos':>6}{'meanstd':>11}{'dynamics':>11}{'points':>9}")
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), 4, {"train": 30, "val": 15}, 0.6, seed)
            measure(f"bench_short_clips set, seed {seed}", Path(tmp), ["val"])
        with tempfile.TemporaryDirectory() as tmp:
            make_synthetic_work(tmp, n_classes=8, videos_per_class=20, seed=seed)
            measure(f"synthetic 8 classes, seed {seed}", Path(tmp), ["val"])
    if args.work:
        measure(str(args.work), args.work, args.splits.split(","))


if __name__ == "__main__":
    main()
