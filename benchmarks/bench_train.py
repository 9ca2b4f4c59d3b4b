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

4. ``--parts sweep``: training samples/s per batch size (64 to 1024 on CUDA), the achieved
   TFLOP/s from FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, and their share
   of the bf16 matrix-product rate measured in the same run (the card's usable peak).
5. ``--parts e2e``: ``avfuse train`` from a generated store against the model alone at the same
   batch, per epoch, with the share of time spent waiting for data.

    .venv/bin/python -m benchmarks.bench_train            # ~2 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.bench_train --device cuda --parts sweep,e2e --models cnn14
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
    window = store.frontend.window_frames
    ds = WindowDataset(store, ids, np.zeros(len(ids), np.int64), norm, window)
    sampler = TrainWindowSampler(ds.frames, windows_per_video=64, window=window, seed=0)
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


def matmul_rate(device: torch.device, n: int, repeats: int) -> float:
    """The card's (or CPU's) bf16 matrix-product rate in FLOP/s: ``repeats`` n x n products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2.0 * n**3 * repeats / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops_per_sample(name: str, device: torch.device, frames: int = 96) -> float:
    """FLOPs of one training step (forward + backward) per window, counted by torch's
    FlopCounterMode (convolutions and matrix products) at batch 4."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, num_classes=400, frames=frames).to(device)
    x = torch.randn(4, 1, frames, 64, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().logsumexp(1).sum().backward()
    return counter.get_total_flops() / 4


def sweep_rate(
    name: str, device: torch.device, batch: int, steps: int, bf16: bool, compile_model: bool
) -> float:
    """Training samples/s at ``batch`` (channels-last, fused AdamW on CUDA, optional bf16 and
    torch.compile): the model alone, on batches already on the device."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=400).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    net = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    x = torch.randn(batch, 1, 96, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 400, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=bf16):
            out = net(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # compilation, autotuning, allocator growth
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def sweep_section(args: argparse.Namespace, device: torch.device) -> dict[int, float]:
    """Samples/s, achieved TFLOP/s and share of the measured bf16 matrix rate per batch size."""
    n = 8192 if device.type == "cuda" else 1024
    peak = matmul_rate(device, n, 50 if device.type == "cuda" else 5)
    print(f"bf16 matrix products ({n} x {n}): {peak / 1e12:.1f} TFLOP/s measured")
    bf16 = device.type == "cuda" or D.cpu_supports_bf16()
    rates: dict[int, float] = {}
    for name in args.models.split(","):
        per_sample = train_flops_per_sample(name, device)
        mode = ("bf16" if bf16 else "fp32") + "/cl" + (" compiled" if args.compile else "")
        print(
            f"{name} training, {mode}: {per_sample / 1e9:.2f} GFLOP per 96x64 window "
            "(forward + backward, counted)"
        )
        print(f"  {'batch':>6} {'samples/s':>10} {'TFLOP/s':>9} {'of bf16 matmul':>15}")
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                r = sweep_rate(name, device, batch, args.steps, bf16, args.compile)
            except torch.OutOfMemoryError:
                print(f"  {batch:6d}  out of memory")
                break
            rates[batch] = r
            achieved = r * per_sample
            print(f"  {batch:6d} {r:10.0f} {achieved / 1e12:9.1f} {achieved / peak:14.1%}")
        best = max(rates, key=lambda b: rates[b])
        print(f"  best batch {best}: {rates[best] / rates[min(rates)]:.2f}x batch {min(rates)}\n")
    return rates


def e2e_section(args: argparse.Namespace, device: torch.device) -> None:
    """``avfuse train`` from a generated store against the model alone at the same batch."""
    name, batch = args.models.split(",")[0], args.e2e_batch
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_synthetic_work(
            work, n_classes=10, videos_per_class=args.e2e_videos, frames_range=(300, 1000)
        )
        t0 = time.perf_counter()
        res = train(
            TrainConfig(
                work,
                name="e2e",
                model=name,  # type: ignore[arg-type]
                epochs=args.e2e_epochs,
                batch_size=batch,
                windows_per_video=16,
                num_workers=args.workers,
                device=args.device,  # type: ignore[arg-type]
                progress=False,
                val_split="",
                eval_every=0,
                checkpoint_every=0,
                min_steps=0,
                compile="on" if args.compile else "off",
            )
        )
        wall = time.perf_counter() - t0
        assert res is not None
        lines = (work / "runs" / "e2e" / "metrics.jsonl").read_text().splitlines()
    import json

    epochs = [json.loads(x) for x in lines]
    pure = sweep_rate(name, device, batch, args.steps, True, args.compile)
    print(f"avfuse train {name} batch {batch}, {args.workers} workers ({wall:.0f} s in all):")
    for m in epochs:
        print(
            f"  epoch {m['epoch']}: {m['samples_per_s']:8.0f} samples/s "
            f"({m['samples_per_s'] / pure:5.1%} of the model alone, {pure:.0f}/s), "
            f"{m['data_wait_share']:5.1%} waiting for data"
        )
    print()


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
    ap.add_argument(
        "--parts",
        default="",
        help="sections: loader, models, accuracy, sweep (batch sizes, TFLOP/s), e2e (avfuse "
        "train vs the model alone); default loader,models,accuracy (+ sweep,e2e on CUDA)",
    )
    ap.add_argument("--batches", default="", help="sweep batch sizes (default 64..1024 on CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile in sweep and e2e")
    ap.add_argument("--e2e-batch", type=int, default=256)
    ap.add_argument("--e2e-videos", type=int, default=200, help="videos per class (10 classes)")
    ap.add_argument("--e2e-epochs", type=int, default=3)
    ap.add_argument("--ast-batch", type=int, default=2, help="batch of the ast model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = D.resolve_device(args.device)
    cuda = device.type == "cuda"
    args.parts = args.parts or ("loader,models,accuracy" + (",sweep,e2e" if cuda else ""))
    args.batches = args.batches or ("64,128,256,512,1024" if cuda else "16,32,64")
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
    if "sweep" in parts:
        sweep_section(args, device)
    if "e2e" in parts:
        e2e_section(args, device)


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
