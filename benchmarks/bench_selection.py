"""Model selection: the epoch each ``selection`` rule keeps, scored on the evaluated split.

Trains once, keeping every epoch's weights, replays each rule (``top1``: the first epoch with
the highest selection top-1, the old behaviour; ``auto``, the default; ``last``) on the run's
recorded selection figures (``metrics.jsonl``), and scores the evaluated split with the epoch
each rule keeps: top-1 over all its videos (unscored = miss) and the mean log-likelihood of the
true class over the scored ones, side by side with ``top1``'s.

    python -m benchmarks.bench_selection --data short     # bench_short_clips' small set
    python -m benchmarks.bench_selection --data shift     # val sounds shifted from train's
    python -m benchmarks.bench_selection --work demo-work # the demo's run (after avfuse demo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from avfuse.checkpoint import load_checkpoint
from avfuse.config import load_config
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.manifest import load_classes, load_manifest
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.train import EpochSelector, TrainConfig, train
from avfuse.workdir import WorkDir
from benchmarks.bench_short_clips import build

RULES = ("top1", "auto", "last")


def _snapshots(run_dir: Path) -> Any:
    """An ``on_step`` hook copying ``last.pt`` to ``epochNNN.pt`` each time an epoch wrote it."""
    seen: dict[str, int] = {}

    def hook(step: int) -> None:
        last = run_dir / "last.pt"
        if last.exists() and last.stat().st_mtime_ns != seen.get("mtime"):
            seen["mtime"] = last.stat().st_mtime_ns
            epoch = int(load_checkpoint(last).epoch)
            shutil.copyfile(last, run_dir / f"epoch{epoch:03d}.pt")

    return hook


def _loglik(scores: Path, work: Path) -> float:
    sf = ScoreFile.load(scores)
    ok = sf.has_scores
    labels = load_manifest(work).set_index("video_id").loc[[str(v) for v in sf.ids[ok]]]
    true = sf.scores[ok][np.arange(int(ok.sum())), labels["label_index"].to_numpy()]
    return float(np.log(np.clip(true, 1e-7, 1.0)).mean())


def bench(cfg: TrainConfig, split: str) -> None:
    """Train ``cfg`` once and print what each rule keeps and how it scores ``split``."""
    work = Path(cfg.work)
    run_dir = WorkDir(work).run(cfg.name)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    res = train(cfg, on_step=_snapshots(run_dir))
    assert res is not None
    shutil.copyfile(run_dir / "last.pt", run_dir / f"epoch{cfg.epochs:03d}.pt")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("val_top1") is not None]
    n, classes = recs[0]["selection_n"], len(load_classes(work))
    kept: dict[str, tuple[int, str]] = {}
    for rule in RULES:
        sel = EpochSelector(rule, n, classes)
        for r in recs:
            sel.update(r["epoch"], r["val_top1"], r["val_loglik"], r["val_loglik_se"])
        kept[rule] = (sel.kept_epoch, sel.reason)
    # The replay is the rule training ran: its best.pt is the epoch replayed for it.
    assert load_checkpoint(run_dir / "best.pt").epoch == kept[cfg.selection][0]
    sat = next((r["epoch"] for r in recs if r["val_top1"] >= 1.0), None)
    print(
        f"selection split {res.selection_split}: {n} videos ({n / classes:.1f} a class), "
        + (f"top-1 100 % first at epoch {sat}" if sat else "never 100 %")
        + f" of {cfg.epochs}; trained in {time.perf_counter() - t0:.0f}s"
    )
    print(f"{'rule':<6}{'epoch':>6}{f'{split} top-1 (all)':>18}{'vs top1':>9}{'log-lik':>9}  why")
    base: tuple[float, float] | None = None
    for rule in RULES:
        epoch, why = kept[rule]
        out = work / "scores" / f"sel_{rule}.npz"
        ck = run_dir / f"epoch{epoch:03d}.pt"
        pc = PredictConfig(work, run=cfg.name, checkpoint=str(ck), split=split, output=out)
        p = predict(dataclasses.replace(pc, progress=False))
        assert p is not None
        top1 = evaluate(EvaluateConfig(work, scores=out, split=split)).metrics["top1_all"]
        ll = _loglik(out, work)
        base = base or (top1, ll)
        print(
            f"{rule:<6}{epoch:>6}{100 * top1:>17.1f}%{100 * (top1 - base[0]):>+8.1f}p"
            f"{ll:>9.3f}  {why}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("short", "shift"), default="short")
    ap.add_argument("--work", type=Path, help="an existing work folder (its run's settings)")
    ap.add_argument("--run", default="audio", help="with --work: the run whose settings to use")
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--train", type=int, default=14, help="training clips per class")
    ap.add_argument("--val", type=int, default=6, help="val clips per class")
    ap.add_argument("--short-share", type=float, default=0.5, help="share of clips under 1 s")
    ap.add_argument("--shift", type=float, default=0.15, help="--data shift: val's timbre shift")
    ap.add_argument("--model", default="resnet")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--carve-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.work:
        saved = load_config(TrainConfig, WorkDir(args.work).run_config(args.run))
        cfg = dataclasses.replace(
            saved, name="selbench", checkpoint_every=0, resume=False, progress=False
        )
        print(f"{args.work}: run {args.run!r}'s settings ({cfg.model}, {cfg.epochs} epochs)")
        bench(cfg, "val")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        shift = {"val": args.shift} if args.data == "shift" else {}
        build(
            work,
            args.classes,
            {"train": args.train, "val": args.val},
            args.short_share,
            args.seed,
            shift,
        )
        print(
            f"{args.classes} classes, {args.train} train / {args.val} val clips a class, "
            f"{args.short_share:.0%} under 1 s, val timbre shift {shift.get('val', 0.0)}; "
            f"{args.model} width {args.width}, {args.epochs} epochs"
        )
        cfg = TrainConfig(
            work,
            name="selbench",
            model=args.model,
            width=args.width,
            epochs=args.epochs,
            carve_fraction=args.carve_fraction,
            checkpoint_every=0,
            num_workers=0,
            progress=False,
            seed=args.seed,
        )
        bench(cfg, "val")


if __name__ == "__main__":
    main()
