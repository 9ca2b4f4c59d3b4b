"""Per-video audio scores from a trained checkpoint.

``avfuse predict WORK --split val`` writes ``WORK/scores/audio_val.npz`` (a
:class:`avfuse.scores.ScoreFile`, one row per video of the split in the manifest) and the same
table as ``audio_val.csv``. A video is scored from every 96-frame window (hop ``--hop``):

* ``mean_softmax`` (default): mean over windows of the class probabilities;
* ``mean_logits``: softmax of the mean logits;
* ``max``: per class, the largest window probability (rows do not sum to one).

Videos without usable audio keep a row with NaN scores, ``n_windows`` 0 and their status
(``no_audio``, ``too_short``, ``not_in_store`` ...). Under ``torchrun`` the videos are split
between ranks (each video exactly once) and rank 0 writes the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from avfuse import distributed as D
from avfuse.config import Config, save_config
from avfuse.data import WINDOW, EvalWindows, NormStats, WindowDataset
from avfuse.extract import USABLE
from avfuse.manifest import load_classes, load_manifest
from avfuse.models import build_model
from avfuse.scores import ScoreFile
from avfuse.store import FeatureStore

Aggregation = Literal["mean_softmax", "mean_logits", "max"]

log = D.get_logger(__name__)


@dataclass(frozen=True)
class PredictConfig(Config):
    """Which checkpoint scores which split, and how windows are combined."""

    work: Path = field(metadata={"help": "work folder", "positional": True})
    run: str = field(
        default="audio",
        # --run-name: under torchrun, --run is an ambiguous prefix of torchrun's --run-path.
        metadata={"help": "run name under WORK/runs", "flags": ("--run-name",)},
    )
    checkpoint: str = field(
        default="best", metadata={"help": "best, last, or a path to a .pt checkpoint"}
    )
    split: str = field(default="val", metadata={"help": "split of the manifest to score"})
    aggregation: Aggregation = field(
        default="mean_softmax", metadata={"help": "how window scores become a video score"}
    )
    hop: int = field(
        default=WINDOW, metadata={"help": "frames between window starts (96 = no overlap)"}
    )
    batch_size: int = field(default=256, metadata={"help": "windows per forward pass", "min": 1})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    output: Path | None = field(
        default=None, metadata={"help": "score file (default WORK/scores/audio_SPLIT.npz)"}
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "device"})
    amp: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "mixed precision (auto: bf16 where native)"}
    )


@dataclass
class PredictResult:
    path: Path
    csv_path: Path
    scores: ScoreFile

    def summary(self) -> str:
        st = self.scores.status
        vals, counts = np.unique(st, return_counts=True)
        by = ", ".join(f"{v} {c}" for v, c in zip(vals, counts))
        return (
            f"scored {int((st == 'ok').sum())}/{len(st)} videos "
            f"({int(self.scores.n_windows.sum())} windows; {by}) -> {self.path}"
        )


# --------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(work: Path, run: str, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        path = Path(work) / "runs" / run / f"{checkpoint}.pt"
    else:
        path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (train first, or pass --checkpoint)")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors, numbers, strings only: ``weights_only`` loading)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "avfuse-checkpoint/1":
        raise ValueError(f"{path} is not an avfuse training checkpoint")
    return ckpt  # type: ignore[no-any-return]


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, NormStats, list[str]]:
    """(model with the checkpoint's weights, normalisation statistics, class list)."""
    spec = ckpt["model_spec"]
    model = build_model(spec["name"], len(ckpt["classes"]), spec["width"], spec["dropout"])
    model.load_state_dict(ckpt["model"])
    return model, NormStats.from_state(ckpt["norm"]), list(ckpt["classes"])


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_videos(
    model: nn.Module,
    store: FeatureStore,
    ids: Sequence[str],
    norm: NormStats,
    *,
    hop: int = WINDOW,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    aggregation: Aggregation = "mean_softmax",
    num_workers: int = 0,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, tuple[np.ndarray, int]]:
    """Score ``ids`` (all present in ``store``) window by window.

    Returns ``{video_id: (probabilities (C,), n_windows)}`` aggregated per ``aggregation``.
    Windows of a video are combined by video position, whatever order batches come in.
    """
    device = torch.device(device)
    ids = list(ids)
    if not ids:
        return {}
    ds = EvalWindows(WindowDataset(store, ids, np.full(len(ids), -1), norm), hop=hop)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leaves the global RNG (training's dropout stream) alone
    )
    was_training = model.training
    model.eval()
    n = len(ids)
    acc: torch.Tensor | None = None
    count = torch.zeros(n, dtype=torch.float64)
    bar = tqdm(loader, desc="predict", unit="batch", leave=False, disable=not progress)
    for x, _, pos in bar:
        x = x.to(device, non_blocking=True).unsqueeze(1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(x)
        logits = logits.float().cpu().double()
        if acc is None:
            fill = float("-inf") if aggregation == "max" else 0.0
            acc = torch.full((n, logits.shape[1]), fill, dtype=torch.float64)
        if aggregation == "mean_softmax":
            acc.index_add_(0, pos, torch.softmax(logits, dim=1))
        elif aggregation == "mean_logits":
            acc.index_add_(0, pos, logits)
        elif aggregation == "max":
            probs = torch.softmax(logits, dim=1)
            idx = pos[:, None].expand_as(probs)
            acc.scatter_reduce_(0, idx, probs, "amax", include_self=True)
        else:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        count.index_add_(0, pos, torch.ones(len(pos), dtype=torch.float64))
    model.train(was_training)
    assert acc is not None
    if aggregation == "mean_softmax":
        out = acc / count[:, None]
    elif aggregation == "mean_logits":
        out = torch.softmax(acc / count[:, None], dim=1)
    else:
        out = acc
    arr = out.numpy().astype(np.float32)
    return {vid: (arr[i], int(count[i])) for i, vid in enumerate(ids)}


def score_videos_distributed(
    model: nn.Module, store: FeatureStore, ids: Sequence[str], norm: NormStats, **kw: Any
) -> dict[str, tuple[np.ndarray, int]]:
    """:func:`score_videos` with the videos split between ranks; every rank gets all results.

    Videos (not windows) are sharded, ``ids[rank::world]``, so no padding duplicates a video and
    each video's windows are aggregated on one rank.
    """
    e = D.env()
    mine = list(ids)[e.rank :: e.world_size]
    part = score_videos(
        model, store, mine, norm, progress=kw.pop("progress", True) and e.is_main, **kw
    )
    merged: dict[str, tuple[np.ndarray, int]] = {}
    for p in D.all_gather_object(part):
        merged.update(p)
    return merged


def video_status(manifest_rows: Any, store: FeatureStore, window: int = WINDOW) -> dict[str, str]:
    """``{video_id: status}`` for manifest rows: ``ok`` or why the video cannot be scored."""
    out: dict[str, str] = {}
    for rec in manifest_rows.itertuples(index=False):
        vid = str(rec.video_id)
        # The stage columns exist once extraction / feature computation have run.
        ext = getattr(rec, "status", None)
        feat = getattr(rec, "feature_status", None)
        if isinstance(ext, str) and ext not in USABLE:
            out[vid] = ext
        elif isinstance(feat, str) and feat != "ok":
            out[vid] = feat
        elif vid not in store:
            out[vid] = "not_in_store"
        elif store.frames(vid) < window:
            out[vid] = "too_short"
        else:
            out[vid] = "ok"
    return out


def predict(cfg: PredictConfig) -> PredictResult | None:
    """Score every video of ``cfg.split``; rank 0 writes the score file and its CSV export.

    Raises :class:`avfuse.store.FrontendMismatchError` if the store's front end differs from
    the checkpoint's. Returns ``None`` on ranks other than 0.
    """
    with D.process_group(D.resolve_device(cfg.device).type):
        return _predict(cfg)


def _predict(cfg: PredictConfig) -> PredictResult | None:
    work = Path(cfg.work)
    device = D.resolve_device(cfg.device)
    e = D.init(device.type)
    ckpt_path = resolve_checkpoint(work, cfg.run, cfg.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    store = FeatureStore(work / "features")
    store.check_frontend(ckpt["frontend_hash"], what=f"checkpoint {ckpt_path}")
    model, norm, classes = model_from_checkpoint(ckpt)
    if classes != load_classes(work):
        raise ValueError(f"{ckpt_path} was trained on a different class list than {work}")
    model.to(device)
    amp_dtype = D.resolve_amp(cfg.amp, device)

    man = load_manifest(work)
    rows = man[man["split"] == cfg.split]
    if rows.empty:
        raise ValueError(f"no videos of split {cfg.split!r} in the manifest")
    status = video_status(rows, store)
    ok_ids = sorted(v for v, s in status.items() if s == "ok")
    scored = score_videos_distributed(
        model,
        store,
        ok_ids,
        norm,
        hop=cfg.hop,
        batch_size=cfg.batch_size,
        device=device,
        amp_dtype=amp_dtype,
        aggregation=cfg.aggregation,
        num_workers=cfg.num_workers,
    )
    if not e.is_main:
        D.barrier()
        return None
    table: dict[str, tuple[np.ndarray | None, int, str]] = {}
    for vid, st in status.items():
        if st == "ok":
            s, n = scored[vid]
            table[vid] = (s, n, "ok")
        else:
            table[vid] = (None, 0, st)
    meta = {
        "producer": "avfuse.predict",
        "checkpoint": str(ckpt_path),
        "run": cfg.run,
        "model": ckpt["model_spec"]["name"],
        "epoch": int(ckpt["epoch"]),
        "aggregation": cfg.aggregation,
        "hop": cfg.hop,
        "split": cfg.split,
        "frontend_hash": ckpt["frontend_hash"],
        "amp": D.amp_name(amp_dtype),
    }
    sf = ScoreFile.from_rows(classes, table, meta)
    out = Path(cfg.output) if cfg.output else work / "scores" / f"audio_{cfg.split}.npz"
    sf.save(out)
    csv_path = sf.to_csv(out.with_suffix(".csv"))
    save_config(cfg, out.with_name(out.name.removesuffix(".npz") + ".predict.toml"))
    D.barrier()
    log.info("wrote %s", out)
    return PredictResult(out, csv_path, sf)
