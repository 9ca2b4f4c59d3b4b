"""Training and inference speed per model on this machine, and accuracy vs a linear baseline.

Prints, side by side:

1. DataLoader windows/s alone (memory-mapped store -> normalised (64, 96, 64) batches), with 0
   and N workers: whether data or compute limits training.
2. For each model at batch 64: training samples/s and inference windows/s in float32,
   float32 + channels_last, and bf16 autocast (where the CPU/GPU supports bf16), with ratios.
   ``ast`` is AST-base (random weights, the AudioSet release's layout built in code, no
   download) on its 1024 x 128 windows, at ``--ast-batch`` (on CPU a batch of 64 takes minutes).
3. Accuracy on a generated dataset whose classes differ in time-frequency structure: the CNN
   trained from scratch (``avfuse.train``) vs logistic regression on per-video log-mel
   statistics (mean and std per band), the baseline a practitioner would try first.

    .venv/bin/python -m benchmarks.bench_train            # ~2 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.bench_train --models resnet --steps 10 --epochs 12 --acc-width 0.5
    .venv/bin/python -m benchmarks.bench_train --models ast --parts models --steps 2 --ast-batch 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from avfuse import distributed as D
from avfuse.data import TrainWindowSampler, WindowDataset, compute_norm_stats
from avfuse.manifest import load_manifest
from avfuse.metrics import metrics
from avfuse.models import build_model
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, train
from tests.synthetic import make_synthetic_work


def loader_rate(store: FeatureStore, ids: list[str], workers: int, batches: int) -> float:
    norm = compute_norm_stats(store, ids)
    ds = WindowDataset(store, ids, np.zeros(len(ids), np.int64), norm)
    sampler = TrainWindowSampler(ds.frames, windows_per_video=64, seed=0)
    dl = DataLoader(ds, batch_size=64, sampler=sampler, num_workers=workers)  # type: ignore[arg-type]
    it = iter(dl)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t0)


def model_rates(
    name: str, device: torch.device, steps: int, mode: str, batch: int = 64
) -> tuple[float, float]:
    """(train samples/s, inference windows/s) at ``batch`` for mode fp32 | cl | bf16."""
    torch.manual_seed(0)
    # AST-base takes 1024-frame windows of 128 bands (its position embeddings); the CNNs 96 x 64.
    frames, n_mels = (1024, 128) if name == "ast" else (96, 64)
    model = build_model(name, num_classes=400, n_mels=n_mels, frames=frames).to(device)
    cl = mode in ("cl", "bf16")
    if cl:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    dtype = torch.bfloat16 if mode == "bf16" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, frames, n_mels, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 400, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def ctx() -> contextlib.AbstractContextManager[object]:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with ctx():
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    tr = steps * batch / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        with ctx():
            model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            with ctx():
                model(x)
        sync()
    inf = steps * batch / (time.perf_counter() - t0)
    return tr, inf


def stats_features(store: FeatureStore, ids: list[str]) -> np.ndarray:
    """(videos, 2 * n_mels): per-band mean and std of each video's whole log-mel sequence."""
    rows = []
    for v in ids:
        x = np.asarray(store[v], np.float32)
        rows.append(np.concatenate([x.mean(0), x.std(0)]))
    return np.stack(rows)


def logistic_regression(
    xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, n_classes: int, l2: float = 1e-3
) -> np.ndarray:
    """Multinomial logistic regression (L-BFGS, L2) on standardised features; val scores."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a = torch.from_numpy((xtr - mu) / sd).double()
    b = torch.from_numpy((xva - mu) / sd).double()
    y = torch.from_numpy(ytr)
    lin = nn.Linear(a.shape[1], n_classes).double()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(a), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(lin(b), 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet,panns,vggish")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    ap.add_argument("--epochs", type=int, default=8, help="epochs of the accuracy run")
    ap.add_argument("--acc-model", default="resnet")
    ap.add_argument("--acc-width", type=float, default=0.25)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--videos", type=int, default=16, help="videos per class and split")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parts", default="loader,models,accuracy", help="sections to run")
    ap.add_argument("--ast-batch", type=int, default=2, help="batch of the ast model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = D.resolve_device(args.device)
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else D.cpu_supports_bf16()
    print(
        f"device {device}, {torch.get_num_threads()} threads, native bf16: {bf16}, "
        f"torch {torch.__version__}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        make_synthetic_work(
            work,
            n_classes=args.classes,
            videos_per_class=args.videos,
            frames_range=(200, 600),
            noise=1.5,
            seed=0,
        )
        store = FeatureStore(work / "features")
        train_ids = [v for v in store.ids if v.startswith("train/")]
        print(f"generated {len(store)} videos in {time.perf_counter() - t0:.1f} s\n")

        parts = set(args.parts.split(","))
        if "loader" in parts:
            loader_section(store, train_ids, args.workers)
        if "models" in parts:
            models_section(args, device, bf16)
        if "accuracy" in parts:
            accuracy_section(args, work, store, train_ids)


def loader_section(store: FeatureStore, train_ids: list[str], workers: int) -> None:
    print("DataLoader alone (batch 64, normalised windows from the memory-mapped store)")
    r0 = loader_rate(store, train_ids, 0, 30)
    rn = loader_rate(store, train_ids, workers, 60)
    print(f"  0 workers: {r0:9.0f} windows/s")
    print(f"  {workers} workers: {rn:9.0f} windows/s  ({rn / r0:.2f}x)\n")


def _num(v: float) -> str:
    """A rate in 7 characters: whole numbers, or 3 significant digits below 10 (AST on CPU)."""
    return f"{v:7.0f}" if v >= 10 else f"{v:7.3f}"


def models_section(args: argparse.Namespace, device: torch.device, bf16: bool) -> None:
    modes = ["fp32", "cl"] + (["bf16"] if bf16 or device.type == "cuda" else [])
    head = "".join(f"{m:>12}" for m in modes)
    print(f"models at batch 64 ({args.steps} timed steps): samples/s (ratio to fp32)")
    print(f"  {'model':8} {'':6}{head}")
    for name in args.models.split(","):
        batch = args.ast_batch if name == "ast" else 64
        res = {m: model_rates(name, device, args.steps, m, batch) for m in modes}
        for k, label in ((0, "train"), (1, "infer")):
            base = res["fp32"][k]
            cells = "".join(f"{_num(res[m][k])} {res[m][k] / base:3.1f}x" for m in modes)
            note = f"  (batch {batch})" if batch != 64 else ""
            print(f"  {name:8} {label:6}{cells}{note}")
    print()


def accuracy_section(
    args: argparse.Namespace, work: Path, store: FeatureStore, train_ids: list[str]
) -> None:
    print(
        f"accuracy on the generated set ({args.classes} classes, {args.videos} videos "
        "per class per split; classes differ in time-frequency patterns)"
    )
    man = load_manifest(work, stages=False)
    man_y = dict(zip(man["video_id"], man["label_index"].astype(int)))
    val_ids = [v for v in store.ids if v.startswith("val/")]
    ytr = np.array([man_y[v] for v in train_ids])
    yva = np.array([man_y[v] for v in val_ids])
    t0 = time.perf_counter()
    lin = logistic_regression(
        stats_features(store, train_ids), ytr, stats_features(store, val_ids), args.classes
    )
    lin_m = metrics(lin, yva)
    t_lin = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = train(
        TrainConfig(
            work,
            name="bench",
            model=args.acc_model,
            width=args.acc_width,  # type: ignore[arg-type]
            epochs=args.epochs,
            lr=2e-3,
            batch_size=64,
            windows_per_video=8,
            num_workers=args.workers,
            device=args.device,  # type: ignore[arg-type]
            progress=False,
            eval_every=args.epochs,
            checkpoint_every=0,
        )
    )
    t_cnn = time.perf_counter() - t0
    assert res is not None
    m = res.last_metrics
    print(f"  {'method':46} {'val top-1':>9} {'top-5':>7} {'time':>7}")
    print(
        f"  {'logistic regression on band mean+std':46} {lin_m['top1']:9.1%} "
        f"{lin_m['top5']:7.1%} {t_lin:6.1f}s"
    )
    print(
        f"  {f'{args.acc_model} x{args.acc_width} from scratch, {args.epochs} epochs':46} "
        f"{m['val_top1']:9.1%} {m['val_top5']:7.1%} {t_cnn:6.1f}s"
    )
    print(f"  CNN / linear top-1: {m['val_top1'] / max(lin_m['top1'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
