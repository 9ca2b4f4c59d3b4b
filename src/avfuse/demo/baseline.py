"""The stand-in video model of the demo: frame features and a logistic regression.

A user brings scores from their own video network (TSN, SlowFast, VideoMAE, ...). The demo
has none, so it trains the simplest honest substitute: hand-made appearance and motion
features from a few decoded frames and a multinomial logistic regression. It is deliberately
weak on classes that differ only by sound, as a real video model would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avfuse.io import atomic_write, write_json
from avfuse.parallel import batched, executor_context, map_batches
from avfuse.workdir import VideoModelLayout

FEATURE_SIZE = 48  # frames are resized to this square before features are taken
GRID = 4  # regions per side for colour and motion statistics
HIST_BINS = 8


def video_features(path: str | Path, max_frames: int = 16) -> np.ndarray:
    """Appearance and motion features of one video. ``-> (D,)`` float32, D = 88.

    Per region of a 4x4 grid: mean colour (48) and mean absolute frame difference (16);
    for the whole clip: an 8-bin histogram per colour channel (24). Raises on an unreadable file.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [
            f.to_ndarray(format="rgb24", width=FEATURE_SIZE, height=FEATURE_SIZE)
            for f in container.decode(stream)
        ]
    if not frames:
        raise ValueError("no decodable video frames")
    if len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    x = np.stack(frames).astype(np.float32) / 255.0  # (T, S, S, 3)
    t, s = x.shape[0], FEATURE_SIZE
    cell = s // GRID
    blocks = x[:, : cell * GRID, : cell * GRID].reshape(t, GRID, cell, GRID, cell, 3)
    colour = blocks.mean(axis=(0, 2, 4)).reshape(-1)
    gray = x.mean(axis=3)
    diff = np.abs(np.diff(gray, axis=0)) if t > 1 else np.zeros((1, s, s), np.float32)
    motion = (
        diff[:, : cell * GRID, : cell * GRID]
        .reshape(-1, GRID, cell, GRID, cell)
        .mean(axis=(0, 2, 4))
    ).reshape(-1) * 10.0
    hist = np.concatenate(
        [
            np.histogram(x[..., c], bins=HIST_BINS, range=(0, 1))[0] / x[..., c].size
            for c in range(3)
        ]
    )
    return np.concatenate([colour, motion, hist]).astype(np.float32)


def _features_batch(batch: list[tuple[str, str]]) -> list[tuple[str, np.ndarray | None, str]]:
    out: list[tuple[str, np.ndarray | None, str]] = []
    for vid, path in batch:
        try:
            out.append((vid, video_features(path), ""))
        except Exception as exc:  # any decoder error: this video gets no video score
            out.append((vid, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    return out


@dataclass
class LinearModel:
    """Multinomial logistic regression on standardised features."""

    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, D) -> (N, C)``."""
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def save(self, path: Path) -> None:
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                classes=np.asarray(self.classes),
                mean=self.mean,
                std=self.std,
                weight=self.weight,
                bias=self.bias,
            )


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: list[str], l2: float = 1e-2) -> LinearModel:
    """Fit softmax regression ``(N, D), (N,) -> LinearModel`` with L-BFGS and an L2 penalty."""
    from scipy.optimize import minimize

    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    z = (x - mean) / std
    n, d = z.shape
    c = len(classes)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * c].reshape(d, c)
        b = theta[d * c :]
        logit = z @ w + b
        logit -= logit.max(axis=1, keepdims=True)
        logp = logit - np.log(np.exp(logit).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        value = -(onehot * logp).sum() / n + 0.5 * l2 * (w * w).sum()
        g = (p - onehot) / n
        grad = np.concatenate([(z.T @ g + l2 * w).ravel(), g.sum(axis=0)])
        return float(value), grad

    res = minimize(loss, np.zeros(d * c + c), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    theta = res.x
    return LinearModel(
        list(classes), mean, std, theta[: d * c].reshape(d, c), theta[d * c :].copy()
    )


@dataclass
class VideoBaselineResult:
    model_path: Path
    score_files: dict[str, Path]
    accuracy: dict[str, float]  # top-1 per scored split, on the videos it could decode
    failed: dict[str, str]  # video_id -> reason, for videos the baseline could not decode

    def summary(self) -> str:
        acc = ", ".join(f"{k} {v:.1%}" for k, v in self.accuracy.items())
        return (
            f"video baseline (stand-in video model): top-1 {acc}; "
            f"{len(self.failed)} undecodable videos; scores in "
            + ", ".join(str(p) for p in self.score_files.values())
        )


def train_video_baseline(
    root: str | Path,
    out: str | Path,
    classes: list[str] | None = None,
    train_split: str = "train",
    score_splits: Sequence[str] = ("val", "heldout"),
    executor: Executor | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> VideoBaselineResult:
    """Train the stand-in video classifier on ``root/train`` and score the other splits.

    Writes ``out/video_model.npz`` and, per split, ``out/video_SPLIT.csv``: a wide CSV with a
    ``filename`` column (``YTID_SSSSSS_EEEEEE.mp4``, no folder, as many tools write it) and one
    column of logits per class name: the same kind of file a user exports from their own model.
    Videos it cannot decode get no row, as with a real video model.
    """
    import pandas as pd

    root, out = Path(root), Path(out)
    items: list[tuple[str, str, str, str]] = []  # split, label, video_id, path
    for split in (train_split, *score_splits):
        folder = root / split
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*/*")):
            if path.is_file() and not path.name.startswith("."):
                rel = path.relative_to(root)
                items.append((split, rel.parts[1], rel.with_suffix("").as_posix(), str(path)))
    if classes is None:
        classes = sorted({lab for sp, lab, _, _ in items if sp == train_split})
    cls_index = {c: i for i, c in enumerate(classes)}
    tasks = [(vid, path) for _, _, vid, path in items]
    feats: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    with executor_context(executor, num_workers) as ex:
        for res in map_batches(
            _features_batch, batched(tasks, 16), ex, desc="video features", progress=progress
        ):
            for vid, f, why in res:
                if f is None:
                    failed[vid] = why
                else:
                    feats[vid] = f
    train = [
        (vid, cls_index[lab]) for sp, lab, vid, _ in items if sp == train_split and vid in feats
    ]
    if not train:
        raise ValueError(f"no decodable training videos under {root / train_split}")
    x = np.stack([feats[v] for v, _ in train])
    y = np.asarray([k for _, k in train])
    model = fit_logistic(x, y, classes)
    out.mkdir(parents=True, exist_ok=True)
    layout = VideoModelLayout(out)
    model_path = layout.model
    model.save(model_path)
    score_files: dict[str, Path] = {}
    accuracy: dict[str, float] = {}
    for split in score_splits:
        rows = [(vid, path, lab) for sp, lab, vid, path in items if sp == split and vid in feats]
        if not rows:
            continue
        logits = model.logits(np.stack([feats[v] for v, _, _ in rows]))
        df = pd.DataFrame(logits.astype(np.float32), columns=classes)
        df.insert(0, "filename", [Path(p).name for _, p, _ in rows])
        path = layout.scores(split)
        # Stands in for another tool's score file, with names the demo made: written plainly.
        with atomic_write(path) as tmp:
            df.to_csv(tmp, index=False, float_format="%.5f")
        score_files[split] = path
        truth = np.asarray([cls_index.get(lab, -1) for _, _, lab in rows])
        accuracy[split] = float(np.mean(logits.argmax(axis=1) == truth))
    write_json(
        layout.stamp,
        {"accuracy": accuracy, "failed": failed, "train_videos": len(train), "classes": classes},
    )
    return VideoBaselineResult(model_path, score_files, accuracy, failed)
