"""Short clips: padding policies, and the default recipe against the log-mel baseline.

Generates sound (band noise and chirps, 16 kHz), computes the real front end's log-mel
features into a feature store and trains the audio model with each ``short_clips`` policy
(``repeat``, ``zeros``, ``drop``), then scores the val split with the same policy. Prints, per
policy, top-1 over all val videos (unscored = miss) and over the scored ones, next to the
baseline (per-band mean and std + logistic regression) on the same videos.

    .venv/bin/python -m benchmarks.bench_short_clips                       # policies, many short clips
    .venv/bin/python -m benchmarks.bench_short_clips --classes 2 --train 14 --val 6 \
        --short-share 0.5 --policies repeat                                  # the small set
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.melspec import FrontendConfig, log_mel
from avfuse.predict import PredictConfig, predict
from avfuse.store import ShardWriter, commit_index, write_meta
from avfuse.train import TrainConfig, train
from avfuse.workdir import WorkDir

SR = 16000
KINDS = ("noise_low", "chirp_up", "noise_high", "chirp_down", "noise_mid", "pulses")


def synth(kind: str, seconds: float, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """``(samples,)`` float32 at 16 kHz of one class's sound, random level and phase.

    ``shift`` moves the timbre as another recording of the same class would: every frequency
    times ``1 + shift``, chirp and pulse rates times ``1 - shift / 2``, and a background hiss
    ``1 + 10 * shift`` times louder (0: the training sounds).
    """
    n = max(1, round(seconds * SR))
    t = np.arange(n) / SR
    amp = 10 ** rng.uniform(-1.5, -0.5)
    fs, rate = 1.0 + shift, 1.0 - shift / 2
    if kind.startswith("noise"):
        lo, hi = {"noise_low": (300, 800), "noise_mid": (1000, 1600), "noise_high": (2500, 4000)}[
            kind
        ]
        lo, hi = lo * fs, hi * fs
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / SR)
        spec[(f < lo) | (f > hi)] = 0
        x = np.fft.irfft(spec, n)
        x = x / (np.abs(x).max() + 1e-9)
    elif kind == "pulses":
        x = np.sin(2 * np.pi * 1200 * fs * t) * (((t * 8 * rate + rng.uniform()) % 1.0) < 0.3)
    else:
        period = 0.4 / rate
        phase = ((t / period) + rng.uniform()) % 1.0
        frac = phase if kind == "chirp_up" else 1 - phase
        freq = (400 + 2600 * frac) * fs
        x = np.sin(2 * np.pi * np.cumsum(freq) / SR)
    x = amp * x + 0.003 * (1.0 + 10.0 * shift) * rng.standard_normal(n)
    return x.astype(np.float32)


def build(
    work: Path,
    classes: int,
    per_split: dict[str, int],
    short_share: float,
    seed: int,
    shift: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Manifest, class list and a feature store of generated clips (0.2-3 s); ``shift`` per
    split moves that split's timbre (see :func:`synth`)."""
    fe = FrontendConfig()
    rng = np.random.default_rng(seed)
    names = list(KINDS[:classes])
    writer = ShardWriter(work / "features", fe.n_mels, dtype="float16", max_mb=64)
    rows = []
    for split, n in per_split.items():
        for k, name in enumerate(names):
            for j in range(n):
                short = j < round(short_share * n)
                d = rng.uniform(0.2, 0.97) if short else rng.uniform(1.0, 3.0)
                vid = f"{split}/{name}/c{j:03d}"
                sound = synth(name, d, rng, (shift or {}).get(split, 0.0))
                writer.add(vid, log_mel(sound, fe))
                rows.append(
                    {
                        "video_id": vid,
                        "split": split,
                        "label": name,
                        "label_index": k,
                        "path": "",
                        "size_bytes": 0,
                        "scan_status": "found",
                    }
                )
    write_meta(work / "features", frontend=fe, classes=names, dtype="float16")
    commit_index(work / "features", writer.close())
    write_class_list(WorkDir(work).classes, names)
    man = pd.DataFrame(rows).sort_values("video_id").reset_index(drop=True)
    write_table(man, WorkDir(work).manifest)
    return man


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--train", type=int, default=30, help="training clips per class")
    ap.add_argument("--val", type=int, default=15, help="val clips per class")
    ap.add_argument("--short-share", type=float, default=0.6, help="share of clips under 1 s")
    ap.add_argument("--policies", default="repeat,zeros,drop")
    ap.add_argument("--model", default="resnet")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--min-steps", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        man = build(
            work, args.classes, {"train": args.train, "val": args.val}, args.short_share, args.seed
        )
        from avfuse.store import FeatureStore

        store = FeatureStore(work / "features")
        n_short = int((store.frames_array(man["video_id"]) < 96).sum())
        print(
            f"{args.classes} classes, {args.train} train / {args.val} val clips a class, "
            f"{args.short_share:.0%} under 1 s ({n_short} clips); model {args.model} width "
            f"{args.width}, {args.epochs} epochs"
        )
        print(
            f"{'policy':<8}{'scored':>10}{'top-1 all':>11}{'top-1 scored':>14}"
            f"{'baseline all':>14}{'steps':>7}{'time':>8}"
        )
        for policy in args.policies.split(","):
            extra = {} if args.min_steps is None else {"min_steps": args.min_steps}
            t0 = time.perf_counter()
            res = train(
                TrainConfig(
                    work,
                    name=policy,
                    model=args.model,  # type: ignore[arg-type]
                    width=args.width,
                    epochs=args.epochs,
                    short_clips=policy,  # type: ignore[arg-type]
                    num_workers=0,
                    progress=False,
                    seed=args.seed,
                    **extra,  # type: ignore[arg-type]
                )
            )
            assert res is not None
            out = work / "scores" / f"{policy}_val.npz"
            predict(PredictConfig(work, run=policy, output=out, progress=False))
            ev = evaluate(EvaluateConfig(work, scores=out, split="val"))
            m, cov = ev.metrics, ev.coverage
            b = m.get("baseline") or {}
            print(
                f"{policy:<8}{cov['scored']:>5}/{cov['videos']:<4}{100 * m['top1_all']:>10.1f}%"
                f"{100 * m['top1']:>13.1f}%{100 * b.get('top1_all', float('nan')):>13.1f}%"
                f"{res.last_metrics['step']:>7}{time.perf_counter() - t0:>7.0f}s"
            )


if __name__ == "__main__":
    main()
