"""1 s windows or whole clips, for fine-tuning a PANNs-style network and for scoring videos.

PANNs (CNN14/CNN10) were trained on whole 10 s AudioSet clips; avfuse lets the training window
(``avfuse train --window``) and the scoring window (``avfuse predict --window``, ``-1`` = the
whole clip as one window) be chosen. This script measures the four combinations, side by side
in one run, on generated log-mel data shaped like the real case (nothing is downloaded):

1. A *pretext* work folder (8 classes, 10 s clips, 1000 frames) stands in for AudioSet: a
   ``cnn10`` is trained on whole clips, as PANNs was, and saved in the released checkpoint
   layout (``{"model": state_dict, "sampler": ...}``).
2. A *target* work folder (6 classes, 10 s clips) stands in for Kinetics: each class's sound
   is heard once per clip, in one ``--event``-frame segment at a random place (the rest is
   noise), so most 1 s windows of a video carry no evidence of its label.
3. The pretext network is fine-tuned (``--init``) on the target with whole clips and with
   96-frame windows (1 s): at the same optimizer steps (one window per clip and epoch) and at
   the same frames seen (ten per clip and epoch); model selection on a ``heldout`` split.
   For reference, the same three from random initialisation.
4. Every run's ``best.pt`` scores the target's ``val`` split both ways: mean of the window
   softmaxes over 96-frame windows (hop 96), and the whole clip as one window.

Prints val top-1 and the training time of each combination.

    .venv/bin/python -m benchmarks.bench_windows                # ~10 min on 2 cores
    .venv/bin/python -m benchmarks.bench_windows --event 400    # evidence in 40 % of a clip
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avfuse.checkpoint import load_checkpoint
from avfuse.manifest import load_manifest
from avfuse.predict import PredictConfig, predict
from avfuse.train import TrainConfig, train
from tests.synthetic import make_synthetic_work

FRAMES = 1000  # 10 s at the PANNs hop (10 ms)
SHORT = 96  # about 1 s


def _top1(work: Path, scores_path: Path) -> float:
    """Top-1 over every val video (an unscored one is a miss)."""
    from avfuse.scores import ScoreFile

    sf = ScoreFile.load(scores_path)
    man = load_manifest(work, stages=False).set_index("video_id")
    labels = man.loc[sf.ids, "label_index"].to_numpy()
    pred = np.where(sf.has_scores, np.nan_to_num(sf.scores, nan=-1).argmax(axis=1), -1)
    return float(np.mean(pred == labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--event", type=int, default=150, help="frames of a clip that carry its class")
    ap.add_argument("--videos", type=int, default=24, help="target training videos per class")
    ap.add_argument("--width", type=float, default=0.25, help="cnn10 channel-width multiplier")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pre-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="folder for the work folders")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="avfuse-windows-"))
    common = dict(
        model="cnn10",
        width=args.width,
        batch_size=16,
        base_batch_size=16,
        num_workers=0,
        min_steps=0,
        progress=False,
        seed=args.seed,
        # PANNs see raw log-mel (bn0 standardises inside the network), pretext and target alike.
        normalize="none",
    )

    pre = tmp / "pretext"
    make_synthetic_work(pre, n_classes=8, videos_per_class=24, splits=("train",),
                        frames_range=(FRAMES, FRAMES), seed=100 + args.seed)  # fmt: skip
    t0 = time.perf_counter()
    train(TrainConfig(work=pre, name="pre", window=FRAMES, epochs=args.pre_epochs, val_split="",
                      windows_per_video=1, **common))  # type: ignore[arg-type]  # fmt: skip
    released = tmp / "pretext_cnn10.pth"
    state = load_checkpoint(pre / "runs" / "pre" / "best.pt").model
    torch.save({"model": state, "sampler": {"epoch": args.pre_epochs}}, released)
    print(f"pretext cnn10 (width {args.width}) on whole clips: {time.perf_counter() - t0:.0f} s")

    target = tmp / "target"
    make_synthetic_work(target, n_classes=6, videos_per_class=args.videos,
                        splits=("train", "heldout", "val"), frames_range=(FRAMES, FRAMES),
                        event_frames=args.event, seed=200 + args.seed)  # fmt: skip
    # 1 s windows at the same optimizer steps as whole clips (one window per video per epoch)
    # and at the same frames seen (ten windows per video per epoch: ten times the steps).
    recipes = (
        (SHORT, 1, "1 s windows, 1/clip"),
        (SHORT, FRAMES // SHORT, f"1 s windows, {FRAMES // SHORT}/clip"),
        (FRAMES, 1, "whole clips"),
    )
    rows = []
    for init in (released, None):
        for window, per_video, wname in recipes:
            name = f"{'ft' if init else 'scratch'}_{window}_{per_video}"
            t0 = time.perf_counter()
            train(TrainConfig(work=target, name=name, window=window, epochs=args.epochs,
                              windows_per_video=per_video, init=init, val_split="heldout",
                              **common))  # type: ignore[arg-type]  # fmt: skip
            train_s = time.perf_counter() - t0
            tops = []
            for pwindow in (SHORT, -1):
                out = tmp / f"{name}_{pwindow}.npz"
                predict(PredictConfig(work=target, run=name, split="val", window=pwindow,
                                      hop=SHORT if pwindow > 0 else 0, output=out,
                                      progress=False))  # fmt: skip
                tops.append(_top1(target, out))
            start = "AudioSet-style pretext" if init else "random"
            rows.append((start, wname, train_s, *tops))

    print(
        f"\ntarget: 6 classes, {args.videos} train / {args.videos} heldout / {args.videos} val "
        f"videos a class, 10 s clips, the class heard in {args.event} of {FRAMES} frames; "
        f"cnn10 width {args.width}, {args.epochs} epochs, batch 16"
    )
    head = f"{'init':24s} {'trained on':22s} {'train s':>8s} {'val top-1, 1 s windows':>23s}"
    print(head + f" {'val top-1, whole clip':>22s}")
    for start, wname, secs, t_short, t_whole in rows:
        print(f"{start:24s} {wname:22s} {secs:8.0f} {t_short:23.1%} {t_whole:22.1%}")
    print(f"(work folders in {tmp})")


if __name__ == "__main__":
    main()
