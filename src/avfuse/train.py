"""Train the audio classifier on the feature store.

``avfuse train WORK --model resnet --epochs 30`` writes ``WORK/runs/NAME/``::

    config.toml     the full resolved TrainConfig (device and AMP as actually used)
    metrics.jsonl   one line per epoch: loss, train accuracy, video-level val top-1/top-5, lr, samples/s
    tb/             TensorBoard event files
    last.pt         checkpoint after the latest epoch (and every ``checkpoint_every`` steps)
    best.pt         checkpoint with the best video-level top-1 on the selection split

Model selection. ``best.pt`` is chosen on ``val_split``. Its default, ``auto``, never looks at
the split that is evaluated afterwards: it takes the manifest's ``heldout`` split if there is
one, else it carves a seeded, class-stratified ``carve_fraction`` of the training split
(excluded from training, ``carve``). Naming ``val`` there selects on the evaluated split; the
console, ``metrics.jsonl`` (``selection_split``) and the saved config say which split chose.

Small datasets. Every epoch draws ``windows_per_video`` windows per video; when that would give
fewer than ``min_steps`` optimizer steps over the run, more windows per video are drawn (the
number of epochs, hence of validations, stays), and a batch larger than an epoch's windows is
clamped to them. Both adjustments are logged and recorded in the checkpoint.

A checkpoint holds weights, optimizer, scheduler, grad-scaler and RNG states, epoch and step
(including the position inside the epoch), the config, class list, per-band normalisation
statistics and the feature front end (dict + hash). ``--resume`` continues from ``last.pt``
exactly: the sampler skips the windows already used and every RNG is restored, so a resumed
run ends with the same weights as an uninterrupted one (CPU, ``--deterministic``).

Recipe: AdamW (no decay on biases and norm weights), per-step cosine schedule with linear
warm-up, label smoothing, SpecAugment time/frequency masks, mixup, gradient clipping, AMP
(bf16 where native, fp16 + GradScaler on older GPUs).

Under ``torchrun --nproc_per_node=N -m avfuse train ...`` the same loop runs with
DistributedDataParallel: every rank draws a distinct shard of the epoch's windows, rank 0 alone
logs and writes files (:mod:`avfuse.distributed`). ``batch_size`` is per process; the effective
batch is ``batch_size * world_size`` and the learning rate is scaled from ``base_batch_size``
per ``lr_scaling``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from avfuse import distributed as D
from avfuse.checkpoint import FORMAT as CHECKPOINT_FORMAT
from avfuse.checkpoint import load_checkpoint
from avfuse.config import save_config, to_dict
from avfuse.data import (
    WINDOW,
    NormStats,
    TrainWindowSampler,
    WindowDataset,
    compute_norm_stats,
    store_window,
)
from avfuse.io import atomic_write
from avfuse.manifest import load_classes, load_manifest
from avfuse.metrics import metrics as score_metrics
from avfuse.model_config import CARVE, HELDOUT, TrainConfig
from avfuse.models import (
    MODELS,
    PRETRAINED_INPUT,
    build_model,
    head_prefixes,
    is_head,
    load_init,
)
from avfuse.scoring import checkpoint_store, score_videos_distributed, video_status
from avfuse.store import FeatureStore

log = D.get_logger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_top1: float
    last_metrics: dict[str, Any]
    best_path: Path
    last_path: Path
    selection_split: str = "val"  # the split whose top-1 chose best.pt ("" = none)

    def summary(self) -> str:
        m = self.last_metrics
        name = self.selection_split or "val"
        val = (
            f", {name} top-1 {m['val_top1']:.2%} top-5 {m['val_top5']:.2%}"
            if m.get("val_top1") is not None
            else ""
        )
        best = (
            f"; best {name} top-1 {self.best_top1:.2%} (model chosen on {name})"
            if self.best_top1 >= 0
            else "; no selection split: best.pt = last epoch"
        )
        return (
            f"trained {self.epochs} epochs: loss {m.get('loss', float('nan')):.4f}, "
            f"train acc {m.get('train_acc', float('nan')):.2%}{val}{best} -> {self.run_dir}"
        )


class StopTraining(Exception):
    """Raised by an ``on_step`` hook to abort (tests use it to simulate a kill)."""


# --------------------------------------------------------------------------- recipe pieces


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def spec_augment(
    x: torch.Tensor, rng: np.random.Generator, time_mask: int, freq_mask: int, num_masks: int
) -> torch.Tensor:
    """Zero random time and frequency stripes: (B, T, F) -> (B, T, F).

    Zero is the band mean after normalisation, so a mask removes information without adding
    an out-of-distribution value. Mask positions come from ``rng`` (saved in checkpoints).
    """
    b, t, f = x.shape
    keep = torch.ones(b, t, f, dtype=torch.bool)
    ar_t, ar_f = torch.arange(t), torch.arange(f)
    for _ in range(num_masks):
        if time_mask > 0:
            w = torch.from_numpy(rng.integers(0, time_mask + 1, b))
            s = torch.from_numpy(rng.integers(0, np.maximum(t - w.numpy(), 0) + 1))
            keep &= ~((ar_t[None] >= s[:, None]) & (ar_t[None] < (s + w)[:, None]))[:, :, None]
        if freq_mask > 0:
            w = torch.from_numpy(rng.integers(0, freq_mask + 1, b))
            s = torch.from_numpy(rng.integers(0, np.maximum(f - w.numpy(), 0) + 1))
            keep &= ~((ar_f[None] >= s[:, None]) & (ar_f[None] < (s + w)[:, None]))[:, None, :]
    return x * keep.to(x.device, x.dtype)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, backbone_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only (not biases, norm scales).

    With ``lr`` given, backbone parameters (outside the model's head) get ``lr *
    backbone_lr_mult`` and head parameters ``lr``; empty groups are dropped.
    """
    if lr is None:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim > 1 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_head(model, name), p.ndim > 1), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr if head else lr * backbone_lr_mult,
        }
        for (head, decays), ps in sorted(groups.items())
    ]


def freeze_backbone(model: nn.Module) -> int:
    """Stop gradients into every parameter outside the head; returns how many were frozen."""
    n = 0
    for name, p in model.named_parameters():
        if not is_head(model, name):
            p.requires_grad_(False)
            n += 1
    return n


def backbone_eval(model: nn.Module) -> None:
    """Put backbone modules in eval mode: a linear probe keeps the pretrained batch-norm
    statistics and sees features without dropout."""
    heads = tuple(h.rstrip(".") for h in head_prefixes(model))
    for name, m in model.named_modules():
        if name and not name.startswith(heads):
            m.eval()


def resolve_normalize(cfg: TrainConfig) -> str:
    """``band`` or ``none`` for ``cfg.normalize`` (see the field's help)."""
    if cfg.normalize != "auto":
        return cfg.normalize
    pretrained = cfg.init and cfg.model in PRETRAINED_INPUT and not cfg.from_embeddings
    return "none" if pretrained else "band"


def effective_lr(cfg: TrainConfig, world_size: int) -> tuple[int, float]:
    eff = cfg.batch_size * world_size
    ratio = eff / cfg.base_batch_size
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    return eff, cfg.lr * scale


def _np_state_to_torch(state: Any) -> dict[str, Any]:
    # The MT19937 key is an ndarray; as a tensor the checkpoint loads with weights_only=True.
    out = dict(state)
    out["state"] = {
        k: (torch.from_numpy(v.astype(np.int64)) if isinstance(v, np.ndarray) else v)
        for k, v in state["state"].items()
    }
    return out


def _rng_state(aug_rng: np.random.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_state_to_torch(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
        "aug": aug_rng.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], aug_rng: np.random.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        k: (v.numpy().astype(np.uint32) if isinstance(v, torch.Tensor) else v)
        for k, v in np_state["state"].items()
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    aug_rng.bit_generator.state = state["aug"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Set both ways: the flag is process-global and a previous run may have set it.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = not deterministic


# --------------------------------------------------------------------------- the loop


def _usable_ids(
    man: Any,
    split: str,
    store: FeatureStore,
    window: int = WINDOW,
    short_clips: str = "repeat",
) -> tuple[list[str], np.ndarray]:
    have = sorted(set(man["split"].astype(str)))
    if split not in have:
        raise ValueError(f"no split {split!r} in the manifest; its splits: {', '.join(have)}")
    rows = man[(man["split"] == split) & (man["label_index"] >= 0)]
    status = video_status(rows, store, window, short_clips=short_clips)
    # A boolean mask, not a list: an empty list would select columns instead of rows.
    keep = np.fromiter(
        (status[str(v)] in ("ok", "padded") for v in rows["video_id"]), bool, len(rows)
    )
    rows = rows[keep].sort_values("video_id")
    return rows["video_id"].astype(str).tolist(), rows["label_index"].to_numpy(np.int64)


def resolve_selection_split(val_split: str, splits: Any) -> str:
    """``auto`` -> ``heldout`` when the manifest has that split, else ``carve``."""
    if val_split == "auto":
        return HELDOUT if HELDOUT in set(map(str, splits)) else CARVE
    return val_split


def carve_selection(
    ids: list[str], labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, str]:
    """Boolean mask over ``ids``: the videos set aside from training to choose the epoch.

    Class-stratified and seeded: per class (in label order), ``round(fraction * n)`` videos,
    at least one where the class has two or more and never all of a class, drawn by a
    generator seeded with ``(seed, label)``; independent of the other classes' sizes.
    Returns (mask, a description for logs and reports).
    """
    labels = np.asarray(labels, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    for label in np.unique(labels):
        members = order[labels[order] == label]
        n = len(members)
        k = min(n - 1, max(1 if n >= 2 else 0, round(fraction * n)))
        if k <= 0:
            continue
        rng = np.random.default_rng([seed, int(label), 7])
        mask[members[rng.permutation(n)[:k]]] = True
    return mask, f"{int(mask.sum())} of {len(ids)} train videos carved out (seed {seed})"


def fit_schedule(
    n_items_per_video: int, n_videos: int, batch_size: int, epochs: int, min_steps: int, world: int
) -> tuple[int, int]:
    """(windows per video, batch size) so that the run has ``>= min_steps`` steps and a batch
    never exceeds an epoch's windows per process (at least one window each)."""
    wpv = max(1, n_items_per_video)
    per_rank = max(1, n_videos // max(world, 1))
    if min_steps > 0 and epochs > 0:
        need = math.ceil(min_steps * batch_size / (epochs * per_rank))
        wpv = max(wpv, need)
    batch = max(1, min(batch_size, (per_rank * wpv)))
    return wpv, batch


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


def train(
    cfg: TrainConfig,
    executor: Any = None,
    *,
    on_step: Callable[[int], None] | None = None,
    sampler: TrainWindowSampler | None = None,
) -> TrainResult | None:
    """Train per ``cfg``; returns the result on rank 0 (``None`` on other ranks).

    ``on_step(global_step)`` is called after every optimizer step (and after any checkpoint of
    that step). ``sampler`` replaces the default :class:`TrainWindowSampler` (it must provide
    ``set_epoch(epoch, skip)`` and yield ``(video_pos, start)`` over the training ids sorted by
    video_id). ``executor`` is unused (training parallelism is DataLoader workers and DDP).
    """
    with D.process_group(D.resolve_device(cfg.device).type):
        return _train(cfg, executor, on_step, sampler)


def _train(
    cfg: TrainConfig,
    executor: Any,
    on_step: Callable[[int], None] | None,
    sampler: TrainWindowSampler | None,
) -> TrainResult | None:
    del executor
    work = Path(cfg.work)
    device = D.resolve_device(cfg.device)
    e = D.init(device.type)
    amp_dtype = D.resolve_amp(cfg.amp, device)
    # The saved config records what actually ran, not "auto".
    cfg = dataclasses.replace(cfg, device=device.type, amp=D.amp_name(amp_dtype))  # type: ignore[arg-type]
    run_dir = work / "runs" / cfg.name
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    seed_everything(cfg.seed + e.rank, cfg.deterministic)
    aug_rng = np.random.default_rng([cfg.seed, e.rank, 1])

    if cfg.from_embeddings:
        # A head over one embedding per window: 1-"frame" windows of D "bands".
        store = checkpoint_store(work, {"embeddings": cfg.from_embeddings})
        cfg = dataclasses.replace(cfg, specaugment=False, window=1)
    else:
        store = FeatureStore(work / "features")
    window = cfg.window or store_window(store)
    val_hop = cfg.val_hop or window
    classes = load_classes(work)
    if store.classes != classes:
        raise ValueError(f"feature store {store.root} has a different class list than {work}")
    man = load_manifest(work)
    train_ids, train_labels = _usable_ids(man, cfg.train_split, store, window, cfg.short_clips)
    if not train_ids:
        raise ValueError(f"no usable videos in split {cfg.train_split!r}")
    selection = resolve_selection_split(cfg.val_split, man["split"].unique())
    cfg = dataclasses.replace(cfg, val_split=selection)
    if selection == CARVE:
        held, selection_name = carve_selection(
            train_ids, train_labels, cfg.carve_fraction, cfg.seed
        )
        val_ids = [v for v, h in zip(train_ids, held) if h]
        val_labels = train_labels[held]
        train_ids = [v for v, h in zip(train_ids, held) if not h]
        train_labels = train_labels[~held]
        selection_label = f"{cfg.train_split} carve-out" if val_ids else ""
        if not val_ids:
            selection_name = "none: no class has two training videos to carve from"
    elif selection:
        if selection == cfg.train_split:
            raise ValueError(f"val_split={selection!r} is the training split")
        val_ids, val_labels = _usable_ids(man, selection, store, window, cfg.short_clips)
        selection_name = f"split {selection!r} ({len(val_ids)} videos)"
        selection_label = selection
    else:
        val_ids, val_labels = [], np.zeros(0, np.int64)
        selection_name, selection_label = "none (best.pt = last epoch)", ""

    ckpt: dict[str, Any] | None = None
    if cfg.resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        store.check_frontend(ckpt["frontend_hash"], what=f"checkpoint {last_path}")
        norm = NormStats.from_state(ckpt["norm"])
    else:
        if cfg.resume:
            log.warning("--resume: %s not found, starting a new run", last_path)
        if resolve_normalize(cfg) == "none":
            norm = NormStats.identity(store.n_mels)
        else:
            norm = compute_norm_stats(store, train_ids, cfg.norm_videos, cfg.seed)

    model_name = cfg.head if cfg.from_embeddings else cfg.model
    spec = {
        "name": model_name,
        "width": cfg.width,
        "dropout": cfg.dropout,
        "n_mels": store.n_mels,
        "frames": window,
    }
    model = build_model(
        model_name, len(classes), cfg.width, cfg.dropout, n_mels=store.n_mels, frames=window
    )
    if cfg.init and ckpt is None:
        ignored = load_init(model, cfg.init, partial=cfg.init_partial)
        log.info(
            "initialised from %s%s", cfg.init, f" (ignored {len(ignored)} keys)" if ignored else ""
        )
    if cfg.freeze_backbone:
        log.info("linear probe: %d backbone tensors frozen", freeze_backbone(model))
    if ckpt is not None:
        if ckpt["model_spec"] != spec:
            raise ValueError(
                f"--resume: {last_path} holds model {ckpt['model_spec']}, the config asks for "
                f"{spec}; use the run's settings or a new --name"
            )
        model.load_state_dict(ckpt["model"])
        _check_resume_settings(ckpt.get("config") or {}, cfg, last_path)
    mem = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=mem)  # type: ignore[call-overload]
    net: nn.Module = model
    if e.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    dataset = WindowDataset(
        store, train_ids, train_labels, norm, window=window, short_clips=cfg.short_clips
    )
    raw_inputs = bool(np.all(norm.mean == 0) and np.all(norm.std == 1))
    wpv, batch_size = fit_schedule(
        cfg.windows_per_video,
        len(train_ids),
        cfg.batch_size,
        cfg.epochs,
        cfg.min_steps,
        e.world_size,
    )
    if wpv != cfg.windows_per_video and e.is_main:
        log.info(
            "%d training videos: %d windows per video per epoch instead of %d, for at least "
            "%d steps (min_steps)",
            len(train_ids),
            wpv,
            cfg.windows_per_video,
            cfg.min_steps,
        )
    if batch_size != cfg.batch_size and e.is_main:
        log.warning(
            "batch size clamped from %d to %d: an epoch has only %d windows per process",
            cfg.batch_size,
            batch_size,
            len(train_ids) // e.world_size * wpv,
        )
    if sampler is None:
        sampler = TrainWindowSampler(
            dataset.frames,
            train_labels,
            windows_per_video=wpv,
            window=window,
            balanced=cfg.balanced,
            seed=cfg.seed,
            rank=e.rank,
            world_size=e.world_size,
            # Reads a store larger than memory from the page cache (see the sampler).
            blocks=store.blocks(train_ids),
        )
    sampler.set_epoch(0)
    batch_size = max(1, min(batch_size, len(sampler)))
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(sampler)} windows per epoch and process: nothing to train on "
            f"({len(train_ids)} videos in {cfg.train_split!r} for {e.world_size} process(es))"
        )
    total_steps = steps_per_epoch * cfg.epochs
    eff_batch, lr = effective_lr(dataclasses.replace(cfg, batch_size=batch_size), e.world_size)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, lr, cfg.backbone_lr_mult), lr=lr
    )
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, skip_steps, global_step, best_top1 = 0, 0, 0, -1.0
    last_metrics: dict[str, Any] = {}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, skip_steps = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        global_step, best_top1 = int(ckpt["global_step"]), float(ckpt["best_top1"])
        last_metrics = dict(ckpt.get("metrics") or {})
        rngs = ckpt["rng"]
        if len(rngs) == e.world_size:
            _set_rng_state(rngs[e.rank], aug_rng)
        else:
            log.warning(
                "resuming with %d processes instead of %d: RNG streams reseeded",
                e.world_size,
                len(rngs),
            )
        if skip_steps >= steps_per_epoch:
            start_epoch, skip_steps = start_epoch + 1, 0
        log.info("resuming %s at epoch %d step %d", last_path, start_epoch + 1, skip_steps)

    writer = None
    if e.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.toml")
        if ckpt is None and (run_dir / "tb").exists():
            shutil.rmtree(run_dir / "tb")  # a fresh run must not mix curves with an old one
        _trim_metrics(run_dir / "metrics.jsonl", start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=global_step or None)
        log.info("model selection (best.pt) on %s", selection_name)
        log.info(
            "%s: %d train / %d selection videos, %d classes, %d steps/epoch, effective batch "
            "%d, lr %.3g, device %s, amp %s, %d process(es)",
            model_name,
            len(train_ids),
            len(val_ids),
            len(classes),
            steps_per_epoch,
            eff_batch,
            lr,
            device,
            D.amp_name(amp_dtype),
            e.world_size,
        )

    def checkpoint(
        epoch: int, step_in_epoch: int, path_list: list[Path], last: dict[str, Any]
    ) -> None:
        rngs = D.all_gather_object(_rng_state(aug_rng))
        if not e.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "model_spec": spec,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "best_top1": best_top1,
            "config": to_dict(cfg),
            "classes": list(classes),
            "norm": norm.to_state(),
            "frontend_hash": store.frontend_hash,
            "frontend": store.frontend,
            "window": window,
            "embeddings": cfg.from_embeddings,
            "world_size": e.world_size,
            "effective_batch_size": eff_batch,
            "batch_size_used": batch_size,
            "windows_per_video_used": wpv,
            "selection_split": selection_label,
            "selection_videos": list(val_ids),
            "metrics": dict(last),
        }
        for p in path_list:
            D.save_on_main(state, p)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # One loader for the whole run: the sampler is iterated in this process, so persistent
    # workers only ever see (video_pos, start) pairs and need no per-epoch restart.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,  # type: ignore[arg-type]
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG, or a
        # resumed run's dropout stream would shift.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    for epoch in range(start_epoch, cfg.epochs):
        skip = skip_steps if epoch == start_epoch else 0
        sampler.set_epoch(epoch, skip * batch_size)
        net.train()
        if cfg.freeze_backbone:
            backbone_eval(model)
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        t0 = time.perf_counter()
        bar = tqdm(
            loader,
            total=steps_per_epoch - skip,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not (cfg.progress and e.is_main),
            leave=False,
        )
        step_in_epoch = skip
        for x, y, _ in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.specaugment and raw_inputs:
                # Unstandardised log-mel: masks take each band's window mean, as zero does
                # after standardisation (PANNs mask after bn0), not an out-of-range 0.
                m = x.mean(dim=1, keepdim=True)
                x = spec_augment(x - m, aug_rng, cfg.time_mask, cfg.freq_mask, cfg.num_masks) + m
            elif cfg.specaugment:
                x = spec_augment(x, aug_rng, cfg.time_mask, cfg.freq_mask, cfg.num_masks)
            x = x.unsqueeze(1)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lam, perm = 1.0, None
            if cfg.mixup_alpha > 0:
                lam = float(aug_rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                perm = torch.from_numpy(aug_rng.permutation(len(y))).to(device)
                x = lam * x + (1.0 - lam) * x[perm]
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                logits = net(x)
            logits = logits.float()
            loss = criterion(logits, y)
            if perm is not None:
                loss = lam * loss + (1.0 - lam) * criterion(logits, y[perm])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            n = len(y)
            lv = float(loss.detach())
            sums[0] += lv * n
            sums[1] += float((logits.detach().argmax(1) == y).sum())
            sums[2] += n
            dt = time.perf_counter() - t0
            if e.is_main:
                bar.set_postfix(
                    loss=f"{lv:.3f}", sps=f"{sums[2] * e.world_size / max(dt, 1e-9):.0f}"
                )
                if writer is not None and global_step % 10 == 0:
                    writer.add_scalar("train/loss_step", lv, global_step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
            if (
                cfg.checkpoint_every > 0
                and global_step % cfg.checkpoint_every == 0
                and step_in_epoch < steps_per_epoch
            ):
                checkpoint(epoch, step_in_epoch, [last_path], last_metrics)
            if on_step is not None:
                on_step(global_step)
        bar.close()
        elapsed = time.perf_counter() - t0
        loss_sum, correct, count = D.all_reduce_sum(sums)
        sps = count / max(elapsed, 1e-9)
        last_metrics = {
            "epoch": epoch + 1,
            "step": global_step,
            "loss": loss_sum / max(count, 1),
            "train_acc": correct / max(count, 1),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": sps,
            "val_top1": None,
            "val_top5": None,
            "selection_split": selection_label,
        }
        validate = (
            bool(val_ids)
            and cfg.eval_every > 0
            and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        )
        if validate:
            D.broadcast_buffers(model)
            scored = score_videos_distributed(
                model,
                store,
                val_ids,
                norm,
                hop=val_hop,
                window=window,
                batch_size=batch_size * 4,
                device=device,
                amp_dtype=amp_dtype,
                channels_last=cfg.channels_last,
                progress=cfg.progress,
                short_clips=cfg.short_clips,
            )
            vm = score_metrics(np.stack([scored[v][0] for v in val_ids]), val_labels)
            last_metrics.update(val_top1=vm["top1"], val_top5=vm["top5"], val_mAP=vm["mAP"])
        improved = validate and last_metrics["val_top1"] > best_top1
        if improved:
            best_top1 = float(last_metrics["val_top1"])
        if e.is_main:
            _append_metrics(run_dir / "metrics.jsonl", last_metrics)
            if writer is not None:
                for k, v in last_metrics.items():
                    if isinstance(v, int | float) and k not in ("epoch", "step"):
                        writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                writer.flush()
            val = (
                f" {selection_label} top-1 {last_metrics['val_top1']:.2%} "
                f"top-5 {last_metrics['val_top5']:.2%}"
                if validate
                else ""
            )
            log.info(
                "epoch %d/%d: loss %.4f train acc %.2f%%%s lr %.2e %.0f samples/s%s",
                epoch + 1,
                cfg.epochs,
                last_metrics["loss"],
                100 * last_metrics["train_acc"],
                val,
                last_metrics["lr"],
                sps,
                " *" if improved else "",
            )
        # best.pt holds the best validated epoch; only a run that never validates keeps its
        # final weights there (an unvalidated epoch must not replace a validated best).
        never_validates = not val_ids or cfg.eval_every == 0
        final = never_validates and epoch + 1 == cfg.epochs
        paths = [last_path] + ([best_path] if improved or final else [])
        checkpoint(epoch + 1, 0, paths, last_metrics)
    if writer is not None:
        writer.close()
    D.barrier()
    if not e.is_main:
        return None
    return TrainResult(
        run_dir, cfg.epochs, best_top1, last_metrics, best_path, last_path, selection_label
    )


# Settings that fix the sampler's position and the learning-rate schedule (or are restored from
# the optimizer state): a resumed run with other values would silently be another run.
RESUME_FIXED = (
    "epochs",
    "batch_size",
    "windows_per_video",
    "balanced",
    "seed",
    "train_split",
    "warmup_epochs",
    "lr",
    "base_batch_size",
    "lr_scaling",
    "weight_decay",
)


def _check_resume_settings(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume ``path`` (whose config is ``saved``) with other schedule settings."""
    now = to_dict(cfg)
    changed = [
        f"{k}: {saved[k]!r} -> {now[k]!r}"
        for k in RESUME_FIXED
        if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise ValueError(
            f"--resume: {path} was trained with other settings ({'; '.join(changed)}); they fix "
            "the sampler position and the schedule, so resume with the run's values or start "
            "a new --name"
        )


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    lines = path.read_text("utf-8").splitlines() if path.exists() else []
    lines.append(json.dumps(record, default=float))
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", "utf-8")


def _trim_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop lines of epochs that will be run again (written before the kill)."""
    if not path.exists():
        return
    keep = [
        ln
        for ln in path.read_text("utf-8").splitlines()
        if ln.strip() and json.loads(ln)["epoch"] <= start_epoch
    ]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep), "utf-8")


__all__ = [
    "MODELS",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "carve_selection",
    "fit_schedule",
    "resolve_selection_split",
    "train",
]
