"""How long does `avfuse fuse` take at Kinetics scale, and what do its safeguards cost?

Generates a work folder with N videos x C classes (default 30k x 600: Kinetics-600 val size),
audio scores (10% of videos without audio) and video logits in an unnamed .npy with an
mmaction2-style list, then times the whole stage (reading, id/class alignment, weight search
with 5-fold CV, paired bootstrap CIs, fused score file, report with three plots) against what a
user would otherwise run: mmaction2-style fusion by list position with a fixed weight and top-k
accuracy, which has none of the checks. Also compares the exact multinomial bootstrap with
resampling video indices.

Each fuse runs in a fresh subprocess, so that its peak resident memory (``ru_maxrss``,
interpreter and libraries included) and its user and system CPU time are its own. The same
video scores are also read from a named ``.npz`` and from a wide CSV (``video_id`` plus one
column per class), to compare the two readers end to end.

    python -m benchmarks.bench_fuse [--videos 30000] [--classes 600] [--stack]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from avfuse.fuse import FuseConfig, fuse
from avfuse.fusion import paired_bootstrap_ci
from avfuse.manifest import write_class_list
from avfuse.scores import ScoreFile
from tests.synthetic import write_val_manifest


def make(work: Path, n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = [f"class {k:03d}" for k in range(c)]
    write_class_list(work / "classes.txt", classes)
    y = rng.integers(0, c, n)
    stems = [f"{i:011d}_{i % 300:06d}_{i % 300 + 10:06d}" for i in range(n)]
    ids = [f"val/{classes[k]}/{s}" for k, s in zip(y, stems, strict=True)]
    write_val_manifest(work, ids, classes, y)
    strong = np.where(np.arange(c) < c // 2, 3.0, 1.0)
    zv = rng.normal(size=(n, c)).astype(np.float32)
    zv[np.arange(n), y] += strong[y]
    za = rng.normal(size=(n, c)).astype(np.float32)
    za[np.arange(n), y] += strong[::-1][y]
    pa = np.exp(za - za.max(1, keepdims=True))
    pa /= pa.sum(1, keepdims=True)
    noa = rng.random(n) < 0.1
    pa[noa] = np.nan
    ScoreFile(
        np.array(ids), classes, pa, np.where(noa, 0, 5), np.where(noa, "no_audio", "ok")
    ).save(work / "scores" / "audio_val.npz")
    np.save(work / "video.npy", zv)
    (work / "val_list.txt").write_text(
        "".join(f"{classes[k]}/{s}.mp4 {k}\n" for k, s in zip(y, stems, strict=True))
    )
    np.savez(work / "video.npz", ids=np.array(stems), classes=np.array(classes), scores=zv)
    wide = pd.DataFrame(zv, columns=classes)
    wide.insert(0, "video_id", [f"{s}.mp4" for s in stems])
    wide.to_csv(work / "video.csv", index=False, float_format="%.7g")
    return y, zv, np.where(noa[:, None], 0.0, pa).astype(np.float32)


def naive(y: np.ndarray, zv: np.ndarray, pa: np.ndarray, w: float = 0.5) -> float:
    """mmaction2 report_accuracy style: fuse by position with a fixed weight, then top-k."""
    s = (1 - w) * zv + w * pa
    k = min(5, s.shape[1])  # under 5 classes, top-5 is every class
    top5 = np.argpartition(-s, k - 1, axis=1)[:, :k]
    top1 = s.argmax(1)
    return float(np.mean(top1 == y) + np.mean((top5 == y[:, None]).any(1)))


def child(spec: str) -> None:
    """Run one fuse from a JSON spec and print its figures as JSON (one line)."""
    a = json.loads(spec)
    work = Path(a["work"])
    kw = {"annotations": work / "val_list.txt"} if a["video"].endswith(".npy") else {}
    cfg = FuseConfig(
        work,
        video_scores=(work / a["video"],),
        method=a["method"],
        weight_selection=a["selection"],
        output=work / a["output"],
        **kw,
    )
    t = time.perf_counter()
    res = fuse(cfg)
    dt = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_SELF)
    fused = np.load(res.fused_path)["scores"]
    print(
        json.dumps(
            {
                "seconds": dt,
                "user": ru.ru_utime,
                "sys": ru.ru_stime,
                "peak_mb": ru.ru_maxrss / 1024,  # Linux: KiB
                "top1": res.figures["metrics"]["all"]["fused"]["top1"],
                "checksum": float(np.float64(fused).sum()),
            }
        )
    )


def run_child(work: Path, video: str, method: str, selection: str) -> dict:
    spec = json.dumps(
        {
            "work": str(work),
            "video": video,
            "method": method,
            "selection": selection,
            "output": f"fusion_{method}_{selection}_{video.replace('.', '_')}",
        }
    )
    out = subprocess.run(
        [sys.executable, __file__, "--child", spec], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=30000)
    ap.add_argument("--classes", type=int, default=600)
    ap.add_argument("--stack", action="store_true", help="also time the learned stacker")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        y, zv, pa = make(work, args.videos, args.classes)
        print(
            f"{args.videos} videos x {args.classes} classes (generated in "
            f"{time.perf_counter() - t:.1f} s)"
        )
        t = time.perf_counter()
        naive(y, zv, pa)
        t_naive = time.perf_counter() - t
        print(
            f"{'method':<40}{'seconds':>8}{'x naive':>8}{'user':>7}{'sys':>6}{'peak MB':>9}"
            "   fused top-1"
        )
        print(f"{'naive by position (no checks)':<40}{t_naive:>8.2f}{1.0:>8.1f}")
        runs = [
            ("video.npy", "mean", "cv"),
            ("video.npy", "logprob", "cv"),
            ("video.npy", "mean", "optimistic"),
            ("video.npz", "mean", "cv"),
            ("video.csv", "mean", "cv"),
        ]
        if args.stack:
            runs.append(("video.npy", "stack", "cv"))
        seconds = {}
        for video, method, sel in runs:
            r = run_child(work, video, method, sel)
            seconds[video, method, sel] = r["seconds"]
            name = f"avfuse fuse {method}, {sel}, {video}"
            print(
                f"{name:<40}{r['seconds']:>8.2f}{r['seconds'] / t_naive:>8.1f}"
                f"{r['user']:>7.1f}{r['sys']:>6.1f}{r['peak_mb']:>9.0f}   {100 * r['top1']:.2f}"
            )
        ratio = seconds["video.csv", "mean", "cv"] / seconds["video.npz", "mean", "cv"]
        print(f"wide CSV / npz time: {ratio:.2f}x")

        rng = np.random.default_rng(1)
        a = rng.random(args.videos) < 0.7
        b = rng.random(args.videos) < 0.6
        t = time.perf_counter()
        paired_bootstrap_ci(a, b, 2000)
        t_multi = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(20):  # 20 of the 2000 index resamples, scaled up
            idx = rng.integers(0, args.videos, args.videos)
            float(np.mean(a[idx]) - np.mean(b[idx]))
        t_index = (time.perf_counter() - t) * 100
        print(
            f"bootstrap CI, 2000 resamples: multinomial {t_multi * 1e3:.1f} ms, "
            f"index resampling {t_index * 1e3:.0f} ms ({t_index / max(t_multi, 1e-9):.0f}x)"
        )


if __name__ == "__main__":
    main()
