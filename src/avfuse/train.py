"""Train the audio classifier on the feature store.

``avfuse train WORK --model resnet --epochs 30`` writes ``WORK/runs/NAME/``::

    config.toml     the full resolved TrainConfig (device and AMP as actually used)
    metrics.jsonl   one line per epoch: loss, train accuracy, video-level val top-1/top-5, lr,
                    samples/s and ``data_wait_share`` (share of the epoch spent waiting for data);
                    the selection record: ``val_loglik``, ``selection_n``,
                    ``selection_saturated``, ``best_epoch``, ``best_reason``
    tb/             TensorBoard event files
    last.pt         checkpoint after the latest epoch (and every ``checkpoint_every`` steps)
    best.pt         checkpoint of the validated epoch ``selection`` keeps (see below)

Model selection. ``best.pt`` is chosen on ``val_split``. Its default, ``auto``, never looks at
the split that is evaluated afterwards: it takes the manifest's ``heldout`` split if there is
one, else it carves a seeded, class-stratified ``carve_fraction`` of the training split
(excluded from training, ``carve``). Naming ``val`` there selects on the evaluated split; the
console, ``metrics.jsonl`` (``selection_split``) and the saved config say which split chose.

Which validated epoch ``best.pt`` keeps (``selection``, :class:`EpochSelector`): a selection
split of n videos measures top-1 in steps of 1/n, so the first epoch to reach the maximum is
often an early one that merely tied, and a small split saturates at 100 % long before training
ends. ``auto`` keeps the latest epoch whose top-1 is within one binomial standard error of the
best so far (at least one video) and whose mean log-likelihood of the true class is within one
standard error of the best so far; once the split saturates (top-1 100 %), or from the start
when it has fewer than ``MIN_SELECTION_PER_CLASS`` videos per class, it keeps the last validated
epoch. ``top1`` is the first epoch with the highest top-1; ``last`` the last validated epoch.
The selector's state is in every checkpoint, so a resumed run keeps the same epoch.

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
import errno
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from avfuse import distributed as D
from avfuse.accel import (
    Placement,
    default_batch_size,
    on_for_cuda,
    resolve_channels_last,
    resolve_compile,
    set_memory_format,
)
from avfuse.ast_model import frontend_mismatch
from avfuse.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from avfuse.config import save_config, to_dict
from avfuse.data import (
    NormStats,
    TrainWindowSampler,
    WindowDataset,
    compute_norm_stats,
)
from avfuse.io import DiskFullError, atomic_write, check_inside_work, is_disk_full
from avfuse.manifest import SCORED_STATUSES, load_classes, load_manifest
from avfuse.metrics import metrics as score_metrics
from avfuse.model_config import CARVE, HELDOUT, MODELS, TrainConfig
from avfuse.models import (
    build_model,
    enable_gradient_checkpointing,
    head_prefixes,
    is_head,
    layer_scale,
    load_init,
    model_arch,
)
from avfuse.scoring import input_store, score_videos_distributed, video_status
from avfuse.store import FeatureStore
from avfuse.workdir import WorkDir

log = D.get_logger(__name__)


# Settings a head on embeddings does not use: the embeddings fixed the network and its windows.
_NOT_FOR_EMBEDDINGS = ("model", "window")


def _refuse_ignored(cfg: TrainConfig) -> None:
    """Refuse ``--from-embeddings`` with a setting it would silently ignore."""
    given = [
        f"--{k} {getattr(cfg, k)}"
        for k in _NOT_FOR_EMBEDDINGS
        if getattr(cfg, k) != TrainConfig.__dataclass_fields__[k].default
    ]
    if given:
        raise ValueError(
            f"--from-embeddings {cfg.from_embeddings} trains a --head on "
            f"{WorkDir(cfg.work).embeddings(cfg.from_embeddings)}, whose network and windows "
            f"`avfuse embed` chose: {' and '.join(given)} would be ignored; leave them out"
        )


def recorded_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run's config as ``config.toml`` records it: a head on embeddings without the network
    and window it did not use."""
    data = to_dict(cfg)
    if cfg.from_embeddings:
        for k in _NOT_FOR_EMBEDDINGS:
            data.pop(k, None)
    return data


def _save_error(path: Path, exc: BaseException) -> OSError:
    """One line for a checkpoint that could not be written; torch's zip writer says only
    "enforce fail at inline_container.cc" when the device is full."""
    if isinstance(exc, DiskFullError):
        return exc
    reason = " ".join(str(exc).split())[:200]
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    if is_disk_full(exc) or 0 <= free < 1 << 30:
        return DiskFullError(path.parent, f"writing {path.name}: {reason}")
    return OSError(
        errno.EIO,
        f"{path}: the checkpoint could not be written ({reason}); check the device holding "
        f"{path.parent}, then rerun with --resume",
    )


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: training stops (exit 2) instead of saving NaN weights."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_top1: float
    last_metrics: dict[str, Any]
    best_path: Path
    last_path: Path
    selection_split: str = "val"  # the split whose top-1 chose best.pt ("" = none)
    best_epoch: int = 0  # the epoch best.pt holds
    best_reason: str = ""  # why (EpochSelector)
    selection_n: int = 0  # videos in the selection split
    saturated_at: int = 0  # first epoch with selection top-1 100 % (0: never)

    def selection_summary(self) -> str:
        """One sentence: the selection split, whether it saturated, the epoch kept and why."""
        if not self.selection_split or self.best_top1 < 0:
            return "no selection split: best.pt = last epoch"
        sat = (
            f"saturated (top-1 100 %) at epoch {self.saturated_at}"
            if self.saturated_at
            else f"best top-1 {self.best_top1:.2%}, not saturated"
        )
        return (
            f"model chosen on {self.selection_split} ({self.selection_n} videos; {sat}): "
            f"best.pt = epoch {self.best_epoch}, {self.best_reason}"
        )

    def summary(self) -> str:
        m = self.last_metrics
        name = self.selection_split or "val"
        val = (
            f", {name} top-1 {m['val_top1']:.2%} top-5 {m['val_top5']:.2%}"
            if m.get("val_top1") is not None
            else ""
        )
        best = f"; {self.selection_summary()}"
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
    dev = x.device
    keep = torch.ones(b, t, f, dtype=torch.bool, device=dev)
    ar_t, ar_f = torch.arange(t, device=dev), torch.arange(f, device=dev)

    def draw(width: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn on the host (the RNG state is checkpointed), masks built where x lives.
        w = rng.integers(0, width + 1, b)
        s = rng.integers(0, np.maximum(size - w, 0) + 1)
        return torch.from_numpy(s).to(dev), torch.from_numpy(s + w).to(dev)

    for _ in range(num_masks):
        if time_mask > 0:
            s, e = draw(time_mask, t)
            keep &= ~((ar_t[None] >= s[:, None]) & (ar_t[None] < e[:, None]))[:, :, None]
        if freq_mask > 0:
            s, e = draw(freq_mask, f)
            keep &= ~((ar_f[None] >= s[:, None]) & (ar_f[None] < e[:, None]))[:, None, :]
    return x * keep.to(x.dtype)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    backbone_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only (not biases, norm scales).

    With ``lr`` given, backbone parameters (outside the model's head) get ``lr *
    backbone_lr_mult`` and head parameters ``lr``; empty groups are dropped. ``layer_decay`` < 1
    further scales each backbone layer's rate by ``layer_decay ** (layers above it)`` (models
    with layers: ast).
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
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (is_head(model, name), p.ndim > 1, layer_scale(model, name, layer_decay))
            groups.setdefault(key, []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr if head else lr * backbone_lr_mult * scale,
        }
        for (head, decays, scale), ps in sorted(groups.items())
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
    pretrained = cfg.init and MODELS.entry(cfg.model).pretrained and not cfg.from_embeddings
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
    window: int,
    short_clips: str = "repeat",
) -> tuple[list[str], np.ndarray]:
    have = sorted(set(man["split"].astype(str)))
    if split not in have:
        raise ValueError(f"no split {split!r} in the manifest; its splits: {', '.join(have)}")
    rows = man[(man["split"] == split) & (man["label_index"] >= 0)]
    status = video_status(rows, store, window, short_clips=short_clips)
    # A boolean mask, not a list: an empty list would select columns instead of rows.
    keep = np.fromiter(
        (status[str(v)] in SCORED_STATUSES for v in rows["video_id"]), bool, len(rows)
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
    with D.process_group(D.resolve_device(cfg.device)):
        return _train(cfg, executor, on_step, sampler)


# Fewer selection videos per class than this: top-1 moves in steps too coarse to rank epochs
# (an 18-class carve-out of 2 videos a class reached 100 % at epoch 5 of 30 and froze best.pt
# there, 8 points under the last epoch on the evaluated split).
MIN_SELECTION_PER_CLASS = 3


@dataclass
class EpochSelector:
    """Decides after each validation whether ``best.pt`` takes this epoch (``selection``).

    ``n`` selection videos over ``n_classes`` classes. The fields are the state a checkpoint
    holds (:meth:`state`), so a resumed run decides as an uninterrupted one.
    """

    rule: str
    n: int
    n_classes: int
    best_top1: float = -1.0  # the highest top-1 so far (whichever epoch best.pt holds)
    best_loglik: float = -math.inf
    best_loglik_se: float = 0.0
    saturated_at: int = 0  # first epoch with top-1 100 % (0: not saturated)
    kept_epoch: int = 0  # the epoch best.pt holds (0: none yet)
    reason: str = ""  # why best.pt holds it

    @property
    def too_small(self) -> bool:
        return self.n < MIN_SELECTION_PER_CLASS * max(self.n_classes, 1)

    def top1_tolerance(self) -> float:
        """One binomial standard error of the best top-1, at least one video."""
        p = min(max(self.best_top1, 0.0), 1.0)
        return max(math.sqrt(p * (1.0 - p) / max(self.n, 1)), 1.0 / max(self.n, 1))

    def update(self, epoch: int, top1: float, loglik: float, loglik_se: float) -> bool:
        """Record the validation of ``epoch`` (1-based); True when ``best.pt`` takes it."""
        # Plain floats: the state goes into checkpoints loaded with weights_only=True.
        top1, loglik, loglik_se = float(top1), float(loglik), float(loglik_se)
        previous = self.best_top1
        self.best_top1 = max(self.best_top1, top1)
        if loglik > self.best_loglik:
            self.best_loglik, self.best_loglik_se = loglik, loglik_se
        if top1 >= 1.0 and not self.saturated_at:
            self.saturated_at = epoch
        if self.rule == "top1":
            keep, reason = top1 > previous, "the first epoch with the highest top-1"
        elif self.rule == "last":
            keep, reason = True, "the last validated epoch (selection = last)"
        elif self.too_small:
            keep = True
            reason = (
                f"the last validated epoch: {self.n} selection videos, "
                f"{self.n / max(self.n_classes, 1):.1f} per class, are too few to rank epochs "
                f"(under {MIN_SELECTION_PER_CLASS} per class)"
            )
        elif self.saturated_at:
            keep = True
            reason = (
                f"the last validated epoch: the selection split saturated (top-1 100 %) at "
                f"epoch {self.saturated_at}, so it no longer ranks epochs"
            )
        else:
            tol = self.top1_tolerance()
            keep = top1 >= self.best_top1 - tol and loglik >= self.best_loglik - self.best_loglik_se
            reason = (
                f"the latest epoch within one standard error of the best top-1 "
                f"({self.best_top1:.1%} - {tol:.1%}) and of the best mean log-likelihood "
                f"({self.best_loglik:.3f} - {self.best_loglik_se:.3f})"
            )
        if keep:
            self.kept_epoch, self.reason = epoch, reason
        return keep

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochSelector:
        return cls(**state)


@dataclass
class _Selection:
    """The training videos and the ones that choose ``best.pt`` (maybe none)."""

    train_ids: list[str]
    train_labels: np.ndarray
    val_ids: list[str]
    val_labels: np.ndarray
    name: str  # for the log: what chooses best.pt
    label: str  # for metrics and curves: the selection split's name ("" = none)


def _select(
    cfg: TrainConfig, man: Any, store: FeatureStore, window: int
) -> tuple[TrainConfig, _Selection]:
    """The usable training videos and the selection split; ``cfg.val_split`` resolved."""
    train_ids, train_labels = _usable_ids(man, cfg.train_split, store, window, cfg.short_clips)
    if not train_ids:
        raise ValueError(f"no usable videos in split {cfg.train_split!r}")
    selection = resolve_selection_split(cfg.val_split, man["split"].unique())
    cfg = dataclasses.replace(cfg, val_split=selection)
    if selection == CARVE:
        held, name = carve_selection(train_ids, train_labels, cfg.carve_fraction, cfg.seed)
        val_ids = [v for v, h in zip(train_ids, held) if h]
        if not val_ids:
            name = "none: no class has two training videos to carve from"
        sel = _Selection(
            [v for v, h in zip(train_ids, held) if not h],
            train_labels[~held],
            val_ids,
            train_labels[held],
            name,
            f"{cfg.train_split} carve-out" if val_ids else "",
        )
    elif selection:
        if selection == cfg.train_split:
            raise ValueError(f"val_split={selection!r} is the training split")
        val_ids, val_labels = _usable_ids(man, selection, store, window, cfg.short_clips)
        name = f"split {selection!r} ({len(val_ids)} videos)"
        sel = _Selection(train_ids, train_labels, val_ids, val_labels, name, selection)
    else:
        empty = np.zeros(0, np.int64)
        sel = _Selection(train_ids, train_labels, [], empty, "none (best.pt = last epoch)", "")
    return cfg, sel


def _build(
    cfg: TrainConfig,
    store: FeatureStore,
    n_classes: int,
    window: int,
    ckpt: Checkpoint | None,
    last_path: Path,
) -> tuple[nn.Module, ModelSpec]:
    """The model and its spec: new, ``--init`` weights, or the resumed checkpoint's."""
    model_name = cfg.head if cfg.from_embeddings else cfg.model
    # Models configured by their checkpoint (ast) record the architecture for predict/resume.
    arch = None if cfg.from_embeddings else model_arch(model_name, cfg.init, window)
    spec = ModelSpec(model_name, cfg.width, cfg.dropout, store.feature_dim, window, arch)
    model = build_model(
        model_name,
        n_classes,
        cfg.width,
        cfg.dropout,
        n_mels=store.feature_dim,
        frames=window,
        arch=arch,
    )
    if cfg.init and ckpt is None:
        ignored = load_init(model, cfg.init, partial=cfg.init_partial)
        log.info(
            "initialised from %s%s", cfg.init, f" (ignored {len(ignored)} keys)" if ignored else ""
        )
    if cfg.freeze_backbone:
        log.info("linear probe: %d backbone tensors frozen", freeze_backbone(model))
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    if ckpt is not None:
        if ckpt.model_spec != spec:
            raise ValueError(
                f"--resume: {last_path} holds model {ckpt.model_spec.to_state()}, the config "
                f"asks for {spec.to_state()}; use the run's settings or a new --name"
            )
        model.load_state_dict(ckpt.model)
        _check_resume_settings(ckpt.config, cfg, last_path)
    return model, spec


def _make_sampler(
    cfg: TrainConfig,
    dataset: WindowDataset,
    sel: _Selection,
    store: FeatureStore,
    window: int,
    e: D.DistEnv,
    sampler: TrainWindowSampler | None,
) -> tuple[TrainWindowSampler, int, int, int]:
    """(sampler, batch size, windows per video, steps per epoch) fitted to the data size."""
    n_train = len(sel.train_ids)
    wpv, batch_size = fit_schedule(
        cfg.windows_per_video, n_train, cfg.batch_size, cfg.epochs, cfg.min_steps, e.world_size
    )
    if wpv != cfg.windows_per_video and e.is_main:
        log.info(
            "%d training videos: %d windows per video per epoch instead of %d, for at least "
            "%d steps (min_steps)",
            n_train,
            wpv,
            cfg.windows_per_video,
            cfg.min_steps,
        )
    if batch_size != cfg.batch_size and e.is_main:
        log.warning(
            "batch size clamped from %d to %d: an epoch has only %d windows per process",
            cfg.batch_size,
            batch_size,
            n_train // e.world_size * wpv,
        )
    if sampler is None:
        sampler = TrainWindowSampler(
            dataset.frames,
            sel.train_labels,
            windows_per_video=wpv,
            window=window,
            balanced=cfg.balanced,
            seed=cfg.seed,
            rank=e.rank,
            world_size=e.world_size,
            # Reads a store larger than memory from the page cache (see the sampler).
            blocks=store.blocks(sel.train_ids),
        )
    sampler.set_epoch(0)
    batch_size = max(1, min(batch_size, len(sampler)))
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(sampler)} windows per epoch and process: nothing to train on "
            f"({n_train} videos in {cfg.train_split!r} for {e.world_size} process(es))"
        )
    return sampler, batch_size, wpv, steps_per_epoch


def _train(
    cfg: TrainConfig,
    executor: Any,
    on_step: Callable[[int], None] | None,
    sampler: TrainWindowSampler | None,
) -> TrainResult | None:
    del executor
    work = Path(cfg.work)
    device = D.resolve_device(cfg.device)
    e = D.init(device)
    amp_dtype = D.resolve_amp(cfg.amp, device)
    # The saved config records what actually ran, not "auto".
    cfg = dataclasses.replace(
        cfg,
        device=device.type,  # type: ignore[arg-type]
        amp=D.amp_name(amp_dtype),  # type: ignore[arg-type]
        batch_size=default_batch_size(cfg.batch_size, device),
    )
    run_dir = WorkDir(work).run(cfg.name)
    last_path = WorkDir(work).checkpoint(cfg.name, "last")
    seed_everything(cfg.seed + e.rank, cfg.deterministic)
    aug_rng = np.random.default_rng([cfg.seed, e.rank, 1])

    if cfg.from_embeddings:
        _refuse_ignored(cfg)
        # A head over one embedding per window: 1-"frame" windows of D "bands".
        store = input_store(work, cfg.from_embeddings)
        cfg = dataclasses.replace(cfg, specaugment=False, window=1)
    else:
        store = FeatureStore(WorkDir(work).store)
    arch = None if cfg.from_embeddings else model_arch(cfg.model, cfg.init, cfg.window)
    # A checkpoint-configured model (ast) fixes the window: its position embeddings' length.
    window = int(arch["max_length"]) if arch else cfg.window or store.frontend.window_frames
    if arch and cfg.init and (why := frontend_mismatch(store.frontend_hash, cfg.init)):
        log.warning("%s", why)
    classes = load_classes(work)
    if store.classes != classes:
        raise ValueError(f"feature store {store.root} has a different class list than {work}")
    cfg, sel = _select(cfg, load_manifest(work), store, window)

    ckpt: Checkpoint | None = None
    if cfg.resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if not ckpt.resumable:
            raise ValueError(f"--resume: {last_path} holds no optimizer, schedule or RNG state")
        store.check_frontend(ckpt.frontend_hash, what=f"checkpoint {last_path}")
        norm = ckpt.norm
    else:
        if cfg.resume:
            log.warning("--resume: %s not found, starting a new run", last_path)
        if resolve_normalize(cfg) == "none":
            norm = NormStats.identity(store.feature_dim)
        else:
            norm = compute_norm_stats(store, sel.train_ids, cfg.norm_videos, cfg.seed)
    model, spec = _build(cfg, store, len(classes), window, ckpt, last_path)
    channels_last = resolve_channels_last(cfg.channels_last, device, model)
    cfg = dataclasses.replace(cfg, channels_last="on" if channels_last else "off")
    guarded = set_memory_format(model, device, channels_last)
    if guarded:
        log.info("channels-last on CPU: %s kept contiguous (oneDNN defect)", ", ".join(guarded))
    dataset = WindowDataset(
        store,
        sel.train_ids,
        sel.train_labels,
        norm,
        window=window,
        short_clips=cfg.short_clips,
        raw=on_for_cuda(cfg.device_normalize, device),
    )
    sampler, batch_size, wpv, steps_per_epoch = _make_sampler(
        cfg, dataset, sel, store, window, e, sampler
    )
    run = _Run(cfg, e, device, amp_dtype, model, spec, store, classes, norm, window, sel)
    run.prepare(aug_rng, run_dir, batch_size, wpv, steps_per_epoch)
    if ckpt is not None:
        run.restore(ckpt)
    run.open_logs(ckpt is None)
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
    for epoch in range(run.start_epoch, cfg.epochs):
        skip = run.skip_steps if epoch == run.start_epoch else 0
        sampler.set_epoch(epoch, skip * batch_size)
        run.epoch(epoch, skip, loader, on_step)
    if run.writer is not None:
        run.writer.close()
    D.barrier()
    if not e.is_main:
        return None
    log.info("best.pt = epoch %d: %s", run.selector.kept_epoch, run.selector.reason)
    return TrainResult(
        run_dir,
        cfg.epochs,
        run.selector.best_top1,
        run.last_metrics,
        WorkDir(work).checkpoint(cfg.name, "best"),
        last_path,
        sel.label,
        run.selector.kept_epoch,
        run.selector.reason,
        run.selector.n,
        run.selector.saturated_at,
    )


class _Run:
    """The state of one training run between optimizer steps: what a checkpoint holds."""

    def __init__(
        self,
        cfg: TrainConfig,
        e: D.DistEnv,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        model: nn.Module,
        spec: ModelSpec,
        store: FeatureStore,
        classes: list[str],
        norm: NormStats,
        window: int,
        sel: _Selection,
    ) -> None:
        self.cfg, self.e, self.device, self.amp_dtype = cfg, e, device, amp_dtype
        self.model, self.spec, self.store, self.classes = model, spec, store, classes
        self.norm, self.window, self.sel = norm, window, sel

    def prepare(
        self,
        aug_rng: np.random.Generator,
        run_dir: Path,
        batch_size: int,
        wpv: int,
        steps_per_epoch: int,
    ) -> None:
        """The optimizer, schedule and loss for ``steps_per_epoch`` steps of ``batch_size``."""
        cfg, e, model, device = self.cfg, self.e, self.model, self.device
        self.aug_rng, self.run_dir, self.batch_size, self.wpv = aug_rng, run_dir, batch_size, wpv
        self.steps_per_epoch = steps_per_epoch
        wd, name = WorkDir(cfg.work), cfg.name
        self.last_path, self.best_path = wd.checkpoint(name, "last"), wd.checkpoint(name, "best")
        self.metrics_path, self.tb_dir = wd.run_metrics(name), wd.run_tensorboard(name)
        self.net: nn.Module = model
        self.place = Placement(device, self.amp_dtype, cfg.channels_last == "on")
        if e.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        # Unstandardised log-mel (pretrained inputs): SpecAugment masks with the band mean.
        self.raw_inputs = bool(np.all(self.norm.mean == 0) and np.all(self.norm.std == 1))
        total_steps = steps_per_epoch * cfg.epochs
        self.eff_batch, self.lr = effective_lr(
            dataclasses.replace(cfg, batch_size=batch_size), e.world_size
        )
        fused = on_for_cuda(cfg.fused_optimizer, device)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay, self.lr, cfg.backbone_lr_mult, cfg.layer_decay),
            lr=self.lr,
            fused=fused or None,
        )
        # Windows arrive unstandardised (the store's dtype) when normalised here, on the device.
        self.norm_t: tuple[torch.Tensor, torch.Tensor] | None = None
        if on_for_cuda(cfg.device_normalize, device):
            self.norm_t = (
                torch.from_numpy(self.norm.mean).to(device),
                torch.from_numpy(self.norm.std).to(device),
            )
        self.compiled = resolve_compile(cfg.compile, device, total_steps)
        if self.compiled:
            self.net = torch.compile(self.net)  # type: ignore[assignment]
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, warmup)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.start_epoch, self.skip_steps, self.global_step = 0, 0, 0
        self.selector = EpochSelector(cfg.selection, len(self.sel.val_ids), len(self.classes))
        self.last_metrics: dict[str, Any] = {}
        self.writer: Any = None

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: optimizer, schedule, RNG streams and position."""
        self.optimizer.load_state_dict(dict(ckpt.optimizer))
        self.scheduler.load_state_dict(dict(ckpt.scheduler))
        self.scaler.load_state_dict(dict(ckpt.scaler))
        self.start_epoch, self.skip_steps = ckpt.epoch, ckpt.step_in_epoch
        self.global_step = ckpt.global_step
        if ckpt.selector is not None:
            self.selector = EpochSelector.from_state(dict(ckpt.selector))
        else:  # written before the selector: it chose by top-1 alone
            self.selector.best_top1 = ckpt.best_top1
        self.last_metrics = dict(ckpt.metrics)
        rngs = ckpt.rng
        if len(rngs) == self.e.world_size:
            _set_rng_state(dict(rngs[self.e.rank]), self.aug_rng)
        else:
            log.warning(
                "resuming with %d processes instead of %d: RNG streams reseeded",
                self.e.world_size,
                len(rngs),
            )
        if self.skip_steps >= self.steps_per_epoch:
            self.start_epoch, self.skip_steps = self.start_epoch + 1, 0
        log.info(
            "resuming %s at epoch %d step %d",
            self.last_path,
            self.start_epoch + 1,
            self.skip_steps,
        )

    def open_logs(self, fresh: bool) -> None:
        """On rank 0: the run folder, its config, the curves (trimmed to the resumed epoch)."""
        if not self.e.is_main:
            return
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(recorded_config(cfg), WorkDir(cfg.work).run_config(cfg.name))
        check_inside_work(self.tb_dir, folder=True)  # the curves are written there directly
        if fresh and self.tb_dir.exists():
            shutil.rmtree(self.tb_dir)  # a fresh run must not mix curves with an old one
        _trim_metrics(self.metrics_path, self.start_epoch)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.tb_dir), purge_step=self.global_step or None)
        log.info("model selection (best.pt) on %s", self.sel.name)
        sl = self.selector
        if self.sel.val_ids:
            log.info(
                "selection split: %d videos, %.1f per class; rule %s%s",
                sl.n,
                sl.n / max(sl.n_classes, 1),
                sl.rule,
                (
                    f": too few to rank epochs (under {MIN_SELECTION_PER_CLASS} per class), "
                    "best.pt = the last validated epoch"
                    if sl.rule == "auto" and sl.too_small
                    else ""
                ),
            )
        log.info(
            "%s: %d train / %d selection videos, %d classes, %d steps/epoch, effective batch "
            "%d, lr %.3g, device %s, amp %s, %d process(es)",
            self.spec.name,
            len(self.sel.train_ids),
            len(self.sel.val_ids),
            len(self.classes),
            self.steps_per_epoch,
            self.eff_batch,
            self.lr,
            self.device,
            D.amp_name(self.amp_dtype),
            self.e.world_size,
        )

    def checkpoint(self, epoch: int, step_in_epoch: int, paths: list[Path]) -> None:
        """Write the run's state to ``paths`` (rank 0; every rank gives its RNG states)."""
        rngs = D.all_gather_object(_rng_state(self.aug_rng))
        if not self.e.is_main:
            return
        cfg, sel = self.cfg, self.sel
        ckpt = Checkpoint(
            model=self.model.state_dict(),
            model_spec=self.spec,
            classes=tuple(self.classes),
            norm=self.norm,
            frontend_hash=self.store.frontend_hash,
            frontend=self.store.frontend,
            window=self.window,
            embeddings=cfg.from_embeddings,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            global_step=self.global_step,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=tuple(rngs),
            best_top1=self.selector.best_top1,
            selector=self.selector.state(),
            metrics=dict(self.last_metrics),
            config=to_dict(cfg),
            world_size=self.e.world_size,
            effective_batch_size=self.eff_batch,
            batch_size_used=self.batch_size,
            windows_per_video_used=self.wpv,
            selection_split=sel.label,
            selection_videos=tuple(sel.val_ids),
        )
        for p in paths:
            try:
                save_checkpoint(p, ckpt)
            except (RuntimeError, OSError) as exc:
                raise _save_error(p, exc) from exc

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; returns (loss, correct) as 0-d tensors on the device
        (reading them waits for the device: the caller does so only where it must)."""
        cfg, rng, place = self.cfg, self.aug_rng, self.place
        x, y = place.to_device(x), place.to_device(y)
        if self.norm_t is not None:
            x = (x.float() - self.norm_t[0]) / self.norm_t[1]
        if cfg.specaugment and self.raw_inputs:
            # Unstandardised log-mel: masks take each band's window mean, as zero does
            # after standardisation (PANNs mask after bn0), not an out-of-range 0.
            m = x.mean(dim=1, keepdim=True)
            x = spec_augment(x - m, rng, cfg.time_mask, cfg.freq_mask, cfg.num_masks) + m
        elif cfg.specaugment:
            x = spec_augment(x, rng, cfg.time_mask, cfg.freq_mask, cfg.num_masks)
        lam, perm = 1.0, None
        if cfg.mixup_alpha > 0:
            lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            perm = torch.from_numpy(rng.permutation(len(y))).to(self.device)
            x = lam * x + (1.0 - lam) * x[perm]
        logits = place.forward(self.net, x).float()
        loss = self.criterion(logits, y)
        if perm is not None:
            loss = lam * loss + (1.0 - lam) * self.criterion(logits, y[perm])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def epoch(
        self, epoch: int, skip: int, loader: DataLoader, on_step: Callable[[int], None] | None
    ) -> None:
        """Train one epoch (from step ``skip``), validate if due, log and checkpoint."""
        cfg, e = self.cfg, self.e
        self.net.train()
        if cfg.freeze_backbone:
            backbone_eval(self.model)
        # loss * n and correct stay on the device: a float() per step would make the host wait
        # for the GPU after every step instead of queueing the next one.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct_sum = torch.zeros((), dtype=torch.int64, device=self.device)
        count, waited = 0, 0.0
        t0 = time.perf_counter()
        bar = tqdm(
            loader,
            total=self.steps_per_epoch - skip,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not (cfg.progress and e.is_main),
            leave=False,
        )
        step_in_epoch = skip
        batches = iter(bar)
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t_wait
            if batch is None:
                break
            x, y, _ = batch
            loss, correct = self.step(x, y)
            step_in_epoch += 1
            due = (
                cfg.checkpoint_every > 0
                and self.global_step % cfg.checkpoint_every == 0
                and step_in_epoch < self.steps_per_epoch
            )
            # Reading the loss waits for the device: on a GPU every 10 steps, before a
            # checkpoint and at the epoch's end, so a NaN still stops the run before it is saved.
            if (
                self.device.type != "cuda"
                or self.global_step % 10 == 0
                or due
                or step_in_epoch == self.steps_per_epoch
            ):
                self._check_finite(float(loss), x, epoch, step_in_epoch)
            n = len(y)
            loss_sum += loss.double() * n
            correct_sum += correct
            count += n
            if e.is_main and self.global_step % 10 == 0:
                lv = float(loss)
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{lv:.3f}", sps=f"{count * e.world_size / max(dt, 1e-9):.0f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss_step", lv, self.global_step)
                    lr = self.scheduler.get_last_lr()[0]
                    self.writer.add_scalar("train/lr", lr, self.global_step)
            if due:
                self.checkpoint(epoch, step_in_epoch, [self.last_path])
            if on_step is not None:
                on_step(self.global_step)
        bar.close()
        sums = [float(loss_sum), float(correct_sum), float(count)]
        elapsed = time.perf_counter() - t0
        total_loss, n_correct, count_all = D.all_reduce_sum(sums)
        self.last_metrics = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "loss": total_loss / max(count_all, 1),
            "train_acc": n_correct / max(count_all, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": count_all / max(elapsed, 1e-9),
            # Share of the epoch's wall time this process spent waiting for the DataLoader
            # (rank 0's): near 0 when the model is the bottleneck, near 1 when data is.
            "data_wait_share": waited / max(elapsed, 1e-9),
            "val_top1": None,
            "val_top5": None,
            "selection_split": self.sel.label,
        }
        validate = (
            bool(self.sel.val_ids)
            and cfg.eval_every > 0
            and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        )
        # best.pt holds the validated epoch the selector keeps; only a run that never validates
        # keeps its final weights there (an unvalidated epoch must not replace a validated one).
        never_validates = not self.sel.val_ids or cfg.eval_every == 0
        final = never_validates and epoch + 1 == cfg.epochs
        improved = False
        sat_before = self.selector.saturated_at
        if validate:
            vm = self.validate()
            self.last_metrics.update(vm)
            improved = self.selector.update(
                epoch + 1, vm["val_top1"], vm["val_loglik"], vm["val_loglik_se"]
            )
        elif final:
            self.selector.kept_epoch, self.selector.reason = epoch + 1, "no selection split"
        sl = self.selector
        self.last_metrics.update(
            {
                "selection_n": sl.n,
                "selection_saturated": bool(sl.saturated_at),
                "best_epoch": sl.kept_epoch or None,
                "best_reason": sl.reason,
            }
        )
        if e.is_main:
            if sl.saturated_at and not sat_before and sl.rule == "auto" and not sl.too_small:
                log.info(
                    "%s saturated at epoch %d (top-1 100%%): best.pt follows the last "
                    "validated epoch from now on",
                    self.sel.label,
                    sl.saturated_at,
                )
            self.log_epoch(epoch, validate, improved)
        paths = [self.last_path] + ([self.best_path] if improved or final else [])
        self.checkpoint(epoch + 1, 0, paths)

    def _check_finite(self, lv: float, x: torch.Tensor, epoch: int, step_in_epoch: int) -> None:
        if math.isfinite(lv):
            return
        # Every later step would train on NaN weights and save them as the model.
        cause = (
            "the batch holds NaN or infinite features (recompute them with --force)"
            if not bool(torch.isfinite(x).all())
            else "the learning rate may be too high (lower --lr)"
        )
        raise TrainingDivergedError(
            f"{self.run_dir}: training stopped at epoch {epoch + 1} step "
            f"{step_in_epoch}, loss {lv}: {cause}; checkpoints written before are kept"
        )

    def validate(self) -> dict[str, float]:
        """Video-level top-1/top-5/mAP and mean log-likelihood of the true class (with its
        standard error) on the selection split, scored as predict scores."""
        cfg, sel = self.cfg, self.sel
        D.broadcast_buffers(self.model)
        scored = score_videos_distributed(
            self.model,
            self.store,
            sel.val_ids,
            self.norm,
            hop=cfg.val_hop or self.window,
            window=self.window,
            batch_size=self.batch_size * 4,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.place.channels_last,
            progress=cfg.progress,
            short_clips=cfg.short_clips,
        )
        probs = np.stack([scored[v][0] for v in sel.val_ids])
        vm = score_metrics(probs, sel.val_labels)
        # Log-likelihood of the true class per video: finer than top-1 on a small split (it
        # still moves when every video is right). Floored so one zero cannot make it -inf.
        true = probs[np.arange(len(probs)), sel.val_labels]
        ll = np.log(np.clip(true.astype(np.float64), 1e-7, 1.0))
        se = float(ll.std(ddof=1) / math.sqrt(len(ll))) if len(ll) > 1 else 0.0
        return {
            "val_top1": vm["top1"],
            "val_top5": vm["top5"],
            "val_mAP": vm["mAP"],
            "val_loglik": float(ll.mean()),
            "val_loglik_se": se,
        }

    def log_epoch(self, epoch: int, validate: bool, improved: bool) -> None:
        m = self.last_metrics
        _append_metrics(self.metrics_path, m)
        if self.writer is not None:
            for k, v in m.items():
                if isinstance(v, int | float) and k not in ("epoch", "step"):
                    self.writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            self.writer.flush()
        val = (
            f" {self.sel.label} top-1 {m['val_top1']:.2%} top-5 {m['val_top5']:.2%}"
            if validate
            else ""
        )
        log.info(
            "epoch %d/%d: loss %.4f train acc %.2f%%%s lr %.2e %.0f samples/s, %.0f%% of it "
            "waiting for data%s",
            epoch + 1,
            self.cfg.epochs,
            m["loss"],
            100 * m["train_acc"],
            val,
            m["lr"],
            m["samples_per_s"],
            100 * m["data_wait_share"],
            " *" if improved else "",
        )


# Settings that fix the sampler's position and the learning-rate schedule (or are restored from
# the optimizer state): a resumed run with other values would silently be another run.
RESUME_FIXED = (
    "selection",  # the selector's state in the checkpoint follows its rule
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


def _check_resume_settings(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
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
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "carve_selection",
    "fit_schedule",
    "resolve_selection_split",
    "train",
]
