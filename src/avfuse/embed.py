"""Frozen embeddings of every video from a pretrained network (``avfuse embed``).

``avfuse embed WORK --model cnn14 --init Cnn14_mAP=0.431.pth`` runs the network's embedding
layer (Cnn14 2048-d, Cnn10 512-d, VGGish 128-d) over every window of every usable video of the
feature store and writes ``WORK/embeddings/NAME/`` in the feature store's own open format
(``store.json``, ``index.parquet``, ``shards/*.npy``; :mod:`avfuse.store`): a video's rows are
its per-window embeddings, ``(windows, D)`` (or one row, their mean, with ``per_window``
off). ``avfuse train WORK --from-embeddings NAME`` then trains a linear or small-MLP head on
them in minutes, and ``predict``/``evaluate``/``fuse`` work on its scores unchanged.

Inputs reach the network as in its AudioSet training: the store's log-mel, no per-band
standardisation. The run is resumable: videos are embedded in chunks and the index is
committed after each, so a rerun skips what is done (and removes shards of a killed chunk);
videos in a truncated shard are embedded again, and ``--force`` starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from avfuse import distributed as D
from avfuse.accel import Placement, resolve_channels_last, set_memory_format
from avfuse.ast_model import frontend_mismatch
from avfuse.config import save_config, to_dict
from avfuse.data import EvalWindows, NormStats, WindowDataset
from avfuse.io import read_table
from avfuse.manifest import SCORED_STATUSES, load_classes, load_manifest
from avfuse.model_config import EmbedConfig
from avfuse.models import build_model, embed_dim, fuse_for_inference, load_init, model_arch
from avfuse.scoring import valid_embedding_name, video_status
from avfuse.store import (
    CorruptStoreError,
    EmbeddingSpec,
    FeatureStore,
    ShardWriter,
    check_shards,
    commit_index,
    needed_rows,
    read_meta,
    remove_unreferenced_shards,
    write_meta,
)
from avfuse.workdir import StoreLayout, WorkDir

log = D.get_logger(__name__)


@dataclass
class EmbedResult:
    root: Path
    embedded: int
    skipped: int
    dim: int
    status: dict[str, str]

    def summary(self) -> str:
        bad = sum(s not in SCORED_STATUSES for s in self.status.values())
        return (
            f"embedded {self.embedded} videos ({self.skipped} already done, {bad} unusable), "
            f"{self.dim}-d -> {self.root}"
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        # A model folder: its config and weight files, by name, in a fixed order.
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors"):
                h.update(f.name.encode() + b"\0" + _file_sha256(f).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def embed_windows(
    model: torch.nn.Module,
    store: FeatureStore,
    ids: list[str],
    *,
    window: int,
    hop: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, np.ndarray]:
    """``{video_id: (windows, D) float32}``: ``model.embed`` of every window of ``ids``.

    Windows are the store's log-mel as is (no band standardisation), ``window`` frames every
    ``hop`` frames, collected back by video position.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    # raw: the store's own dtype crosses to the device (half the bytes of float32 for a
    # float16 store); the identity standardisation is then a cast there.
    base = WindowDataset(
        store, ids, np.full(len(ids), -1), NormStats.identity(store.feature_dim), window, raw=True
    )
    ds = EvalWindows(base, hop=hop)
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, generator=torch.Generator(), pin_memory=cuda
    )
    out: list[torch.Tensor] = []
    where: list[torch.Tensor] = []
    model.eval()
    place = Placement(device, amp_dtype, channels_last)
    for x, _, pos in loader:
        z = place.forward(model.embed, place.to_device(x))  # type: ignore[arg-type]
        # Kept on the device: one copy back per chunk, not a wait for the GPU per batch.
        out.append(z.float())
        where.append(pos)
    parts: list[list[np.ndarray]] = [[] for _ in ids]
    if out:
        z_all = torch.cat(out).cpu().numpy()
        for p, row in zip(torch.cat(where).tolist(), z_all, strict=True):
            parts[p].append(row)
    return {vid: np.stack(parts[i]).astype(np.float32) for i, vid in enumerate(ids)}


def _open_output(root: Path, spec: EmbeddingSpec, force: bool) -> list[dict[str, Any]]:
    """Index rows already committed in ``root`` (a resumed run), after checking it holds
    embeddings of the same network, weights and windows. Rows in a truncated or damaged shard
    are dropped (their videos are embedded again), as is an unreadable index (every video
    is); unreferenced shards are removed. ``force`` starts afresh."""
    layout = StoreLayout(root)
    if force:
        for path in (layout.meta, layout.index):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        remove_unreferenced_shards(root, set())
    if not layout.meta.exists():
        return []
    try:
        old = read_meta(root)
    except CorruptStoreError as exc:
        log.warning("%s: embedding every video again", exc)
        with contextlib.suppress(FileNotFoundError):
            layout.index.unlink()
    else:
        if old.frontend_hash != spec.hash():
            raise ValueError(
                f"{root} holds embeddings of other settings ({old.frontend}); "
                "pass --force to replace them, or choose another --name"
            )
    rows: list[dict[str, Any]] = []
    if layout.index.exists():
        try:
            rows = [
                {str(k): v for k, v in r.items()}
                for r in read_table(layout.index).to_dict("records")
            ]
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            log.warning("%s unreadable (%s): embedding every video again", layout.index, exc)
    if rows:
        index = pd.DataFrame(rows)
        bad = check_shards(root, needed_rows(index), spec.dim, "float32")
        for name, why in sorted(bad.items()):
            log.warning("shard %s: %s; embedding its videos again", layout.shard(name), why)
        rows = [r for r in rows if str(r["shard"]) not in bad]
    removed = remove_unreferenced_shards(root, {str(r["shard"]) for r in rows})
    if removed:
        log.info("removed %d shard(s) of an unfinished chunk or damaged", removed)
    return rows


def embed(cfg: EmbedConfig) -> EmbedResult:
    """Embed every usable video of ``cfg.work`` into ``WORK/embeddings/NAME`` (resumable)."""
    work = Path(cfg.work)
    if cfg.init is None:
        raise ValueError("embed needs --init: a pretrained checkpoint (see README)")
    name = cfg.name or cfg.model
    if not valid_embedding_name(name):
        raise ValueError(f"invalid embedding name {name!r} (letters, digits, _ . -)")
    device = D.resolve_device(cfg.device)
    amp_dtype = D.resolve_amp(cfg.amp, device)
    store = FeatureStore(WorkDir(work).store)
    classes = load_classes(work)
    arch = model_arch(cfg.model, cfg.init, cfg.window)
    # A checkpoint-configured model (ast) takes windows of its own length only.
    window = int(arch["max_length"]) if arch else cfg.window or store.frontend.window_frames
    hop = cfg.hop or window
    if arch and (why := frontend_mismatch(store.frontend_hash, cfg.init)):
        log.warning("%s", why)
    model = build_model(
        cfg.model, 2, cfg.width, 0.0, n_mels=store.feature_dim, frames=window, arch=arch
    )
    load_init(model, cfg.init)
    dim = embed_dim(model)
    # Inference only: batch norms folded into the convolutions (~1.3x on CPU).
    model = fuse_for_inference(model)
    channels_last = resolve_channels_last(cfg.channels_last, device, model)
    set_memory_format(model, device, channels_last)

    spec = EmbeddingSpec(
        model=cfg.model,
        dim=dim,
        init_sha256=_file_sha256(Path(cfg.init)),
        window=window,
        hop=hop,
        per_window=cfg.per_window,
        source_frontend_hash=store.frontend_hash,
        width=cfg.width,
    )
    root = WorkDir(work).embeddings(name)
    rows = _open_output(root, spec, cfg.force)
    write_meta(root, frontend=spec, classes=classes, dtype="float32")

    man = load_manifest(work)
    if cfg.splits:
        man = man[man["split"].isin(list(cfg.splits))]
    status = video_status(man, store, window)
    done = {str(r["video_id"]) for r in rows}
    # A clip shorter than one window is embedded from its window padded by repetition (as
    # predict scores it): leaving it out would drop every 10 s clip from a model of 10.24 s
    # windows (AST).
    todo = sorted(v for v, s in status.items() if s in SCORED_STATUSES and v not in done)
    skipped = sum(1 for v, s in status.items() if s in SCORED_STATUSES and v in done)
    writer = ShardWriter(root, n_mels=dim, dtype="float32", max_mb=256)
    bar = tqdm(total=len(todo), desc="embed", unit="video", disable=not cfg.progress)
    for i in range(0, len(todo), max(1, cfg.chunk_videos)):
        chunk = todo[i : i + cfg.chunk_videos]
        z = embed_windows(
            model,
            store,
            chunk,
            window=window,
            hop=hop,
            batch_size=cfg.batch_size or (512 if device.type == "cuda" else 64),
            device=device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )
        for vid in chunk:
            writer.add(vid, z[vid] if cfg.per_window else z[vid].mean(0, keepdims=True))
        writer.flush()
        # Committing after every chunk is what makes a killed run resumable.
        commit_index(root, rows + writer.index_rows)
        bar.update(len(chunk))
    bar.close()
    commit_index(root, rows + writer.close())
    save_config(cfg, StoreLayout(root).embed_config)
    log.info("embedding config %s", to_dict(cfg))
    return EmbedResult(root, len(todo), skipped, dim, status)
