"""Scoring videos with a trained checkpoint: the library under ``predict``, ``train`` and ``embed``.

The checkpoint's reading and validation (:func:`load_checkpoint`), the model and normalisation
it holds (:func:`model_from_checkpoint`), the window scoring and per-video aggregation
(:func:`score_videos`, split over ranks by :func:`score_videos_distributed`) and the status a
video's row gets (:func:`video_status`). Training validates with the same functions the
``predict`` stage scores with, so the two can never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from avfuse import distributed as D
from avfuse.accel import Placement
from avfuse.audio import USABLE
from avfuse.checkpoint import Checkpoint
from avfuse.data import (
    EvalWindows,
    NormStats,
    WholeClips,
    WindowDataset,
)
from avfuse.manifest import SCORED_STATUSES
from avfuse.model_config import Aggregation, ShortClips
from avfuse.models import VGGish, build_model
from avfuse.store import FeatureStore
from avfuse.workdir import WorkDir

log = D.get_logger(__name__)


def resolve_checkpoint(work: Path, run: str, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        path = WorkDir(work).checkpoint(run, checkpoint)
    else:
        path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (train first, or pass --checkpoint)")
    return path


_EMBEDDING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def valid_embedding_name(name: str) -> bool:
    """A name of ``WORK/embeddings/NAME``: one plain path component (no separators, no ``..``)."""
    return bool(_EMBEDDING_NAME.fullmatch(name)) and ".." not in name


def input_store(work: Path, embeddings: str) -> FeatureStore:
    """The store a model reads: ``WORK/features`` or, for a head on embeddings (a
    checkpoint's ``embeddings``), ``WORK/embeddings/NAME`` (the name is checked: it never
    leaves WORK)."""
    if not embeddings:
        return FeatureStore(WorkDir(work).store)
    if not valid_embedding_name(embeddings):
        raise ValueError(f"checkpoint names an invalid embedding store {embeddings!r}")
    return FeatureStore(WorkDir(work).embeddings(embeddings))


def model_from_checkpoint(ckpt: Checkpoint) -> tuple[nn.Module, NormStats, list[str]]:
    """(model with the checkpoint's weights, normalisation statistics, class list).

    The network the checkpoint's ``model_spec`` describes is first built on the ``meta``
    device (no memory): one needing more bytes than the checkpoint's weights hold is refused
    before it is allocated (a spec of absurd sizes is a memory bomb, whatever its fields).
    """
    spec = ckpt.model_spec

    def build() -> nn.Module:
        return build_model(
            spec.name,
            len(ckpt.classes),
            spec.width,
            spec.dropout,
            n_mels=spec.n_mels,
            frames=spec.frames,
            arch=spec.arch,
        )

    _check_model_size(build, ckpt.model)
    model = build()
    model.load_state_dict(ckpt.model)
    return model, ckpt.norm, list(ckpt.classes)


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _check_model_size(build: Any, state: Any) -> None:
    """Refuse a network that needs more memory than ``state`` (its weights) could fill."""
    try:
        with torch.device("meta"):
            probe = build()
    except Exception:  # a model that cannot be built on meta: the real build reports it
        return
    need = _tensor_bytes([*probe.parameters(), *probe.buffers()])
    have = _tensor_bytes(state.values())
    if need > 2 * have + (1 << 20):
        raise ValueError(
            f"the checkpoint's model_spec describes a network of {need} bytes, its weights "
            f"hold {have}: a damaged or hostile spec"
        )


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_videos(
    model: nn.Module,
    store: FeatureStore,
    ids: Sequence[str],
    norm: NormStats,
    *,
    hop: int,
    window: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    aggregation: Aggregation = "mean_softmax",
    num_workers: int = 0,
    channels_last: bool = False,
    progress: bool = True,
    short_clips: ShortClips = "repeat",
    min_frames: int = 1,
) -> dict[str, tuple[np.ndarray, int]]:
    """Score ``ids`` (all present in ``store``) window by window: windows of ``window`` frames
    (the model's), starting every ``hop`` frames.

    A video shorter than one window is scored from one window padded per ``short_clips``;
    with ``window < 0`` each whole clip is one window, padded to at least ``min_frames``.

    Returns ``{video_id: (probabilities (C,), n_windows)}`` aggregated per ``aggregation``.
    Windows of a video are combined by video position, whatever order batches come in.
    """
    device = torch.device(device)
    ids = list(ids)
    if not ids:
        return {}
    base = WindowDataset(
        store, ids, np.full(len(ids), -1), norm, window=max(window, 1), short_clips=short_clips
    )
    whole = window < 0
    if whole and isinstance(model, VGGish):
        raise ValueError("VGGish takes fixed-size windows: whole-clip scoring needs global pooling")
    ds: Dataset[Any] = (
        WholeClips(base, min_frames=min_frames) if whole else EvalWindows(base, hop=hop)
    )
    loader = DataLoader(
        ds,
        batch_size=1 if whole else batch_size,
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
    place = Placement(device, amp_dtype, channels_last)
    for x, _, pos in bar:
        logits = place.forward(model, place.to_device(x)).float().cpu().double()
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


def video_status(
    manifest_rows: Any,
    store: FeatureStore,
    window: int,
    short_clips: str = "repeat",
) -> dict[str, str]:
    """``{video_id: status}`` for manifest rows: ``ok``, ``padded`` (shorter than one window,
    scored from a padded window) or why the video cannot be scored (``silent``, ``no_audio``,
    ``too_short`` with ``short_clips="drop"``, ...)."""
    out: dict[str, str] = {}
    for rec in manifest_rows.itertuples(index=False):
        vid = str(rec.video_id)
        # The stage columns exist once extraction / feature computation have run.
        ext = getattr(rec, "status", None)
        feat = getattr(rec, "feature_status", None)
        if isinstance(ext, str) and ext not in USABLE:
            out[vid] = ext
        elif isinstance(feat, str) and feat not in SCORED_STATUSES:
            out[vid] = feat
        elif vid not in store:
            out[vid] = "not_in_store"
        elif store.frames(vid) < 1:
            out[vid] = "too_short"
        elif store.frames(vid) < window:
            out[vid] = "too_short" if short_clips == "drop" else "padded"
        else:
            out[vid] = "ok"
    return out
