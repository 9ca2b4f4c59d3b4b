"""The training checkpoint: one typed record, written and read only here.

:class:`Checkpoint` is what ``train`` hands ``predict``, a resumed run and ``--init``: the
network (:class:`ModelSpec` plus its weights), the training state a resumed run continues from
(optimizer, schedule, gradient scaler, RNG streams, position, epoch selector), the class list,
the input it was trained on (normalisation, front end, window, embedding store) and the run's
settings. :func:`save_checkpoint` writes it, :func:`load_checkpoint` reads it back.

On disk a checkpoint is a ``torch.save`` of a plain dict of tensors, numbers, strings, lists and
dicts, so :func:`avfuse.safe_pickle.load_torch` reads it with ``weights_only`` (a dataclass
would need its class trusted). Its ``format`` entry, ``avfuse-checkpoint/N``, names the layout:

* 3 (:data:`VERSION`, written now): every entry of :class:`Checkpoint` present, ``frontend``
  the fields of the store's typed record (:class:`~avfuse.melspec.FrontendConfig`, or for a
  head on embeddings :class:`~avfuse.store.EmbeddingSpec`; ``{}``: not recorded);
* 2: the same, but a head on embeddings kept its store's settings as a made-up front end
  named ``embedding`` whose ``n_mels`` was the embedding size; :func:`migrate_v2` rewrites
  them as an embedding spec;
* 1: the same entries, but files written before some of them existed lack them, and a
  ``config.channels_last`` may be a boolean; :func:`migrate_v1` fills them in with what those
  older runs did, the one place such defaults live.

A checkpoint is as untrusted as any input: every entry is type-checked on load, with one error
naming the file and the entries, instead of a ``KeyError`` deep inside a stage. The sizes it
declares (window, width, bands) decide what a reader allocates, so each must lie within what a
data set can need (:data:`avfuse.model_config.MAX_WINDOW` frames ...); its tensors must be
finite and its band standard deviations positive, or every score computed from it would be NaN.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from avfuse.data import NormStats
from avfuse.io import atomic_write
from avfuse.model_config import (
    BOOL_TO_TRI_STATE,
    MAX_WIDTH,
    MAX_WINDOW,
    SHORT_CLIPS,
    ShortClips,
)
from avfuse.safe_pickle import load_torch
from avfuse.store import StoreFrontend, frontend_from_dict, frontend_from_v1

__all__ = [
    "FORMAT",
    "REQUIRED",
    "VERSION",
    "Checkpoint",
    "ModelSpec",
    "load_checkpoint",
    "migrate_v1",
    "migrate_v2",
    "save_checkpoint",
]

VERSION = 3
_FORMAT_NAME = "avfuse-checkpoint"
FORMAT = f"{_FORMAT_NAME}/{VERSION}"
_FORMAT_RE = re.compile(rf"{_FORMAT_NAME}/([0-9]{{1,6}})")

# Embedding heads read embeddings as bands: CNN14's are 2048 wide.
MAX_BANDS = 1 << 16
MAX_CLASSES = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """The network a checkpoint's weights belong to, as :func:`avfuse.models.build_model`
    takes it (the class count is the checkpoint's class list)."""

    name: str  # a model of avfuse.models.MODELS
    width: float  # channel multiplier, > 0
    dropout: float  # in [0, 1)
    n_mels: int  # input bands (an embedding head: the embedding size)
    frames: int  # frames per input window
    arch: Mapping[str, Any] | None = None  # models configured by their checkpoint (ast)

    def to_state(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        if self.arch is None:
            del state["arch"]
        else:
            state["arch"] = dict(self.arch)
        return state


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint (``best.pt`` / ``last.pt``); field names are the file's entries.

    Tensors stay on the CPU; ``model`` maps parameter names to tensors of the shapes
    ``model_spec`` builds, ``norm`` is per band, shape ``(model_spec.n_mels,)`` each.
    """

    # The network and what it reads.
    model: Mapping[str, torch.Tensor]  # state dict of the network model_spec builds
    model_spec: ModelSpec
    classes: tuple[str, ...]  # output order of the network's logits
    norm: NormStats  # per-band standardisation applied to every window
    frontend_hash: str  # the feature store's front-end hash: a reader's store must match
    # What made the store's rows: a FrontendConfig, an EmbeddingSpec for a head on
    # embeddings, None in files from before it was recorded.
    frontend: StoreFrontend | None
    window: int  # frames per training window (1 for a head on embeddings)
    embeddings: str  # "" (log-mel features) or NAME of WORK/embeddings/NAME
    # Where training stopped: epochs finished, and steps into the next one.
    epoch: int
    step_in_epoch: int
    global_step: int
    # The training state a resumed run continues from (empty in checkpoints lacking it).
    optimizer: Mapping[str, Any]  # torch.optim state dict
    scheduler: Mapping[str, Any]  # LR scheduler state dict
    scaler: Mapping[str, Any]  # GradScaler state dict (empty when disabled)
    rng: tuple[Mapping[str, Any], ...]  # per rank: python, numpy, torch, aug (and cuda) states
    best_top1: float  # best selection top-1 so far
    # The epoch selector's fields (train.EpochSelector); None in files written before it.
    selector: Mapping[str, Any] | None
    metrics: Mapping[str, Any]  # the last validation's figures
    # The run's settings as config.toml records them (train.TrainConfig, to_dict).
    config: Mapping[str, Any]
    # How the run was laid out (0: not recorded).
    world_size: int
    effective_batch_size: int
    batch_size_used: int
    windows_per_video_used: int
    # The videos that chose best.pt: split name ("" = none) and ids.
    selection_split: str
    selection_videos: tuple[str, ...]
    format: int = VERSION  # the layout version this record was read from or is written in

    @property
    def short_clips(self) -> ShortClips:
        """The short-clip policy the run trained with (checked on load: repeat, zeros, drop)."""
        return cast(ShortClips, self.config["short_clips"])

    @property
    def train_split(self) -> str:
        return str(self.config.get("train_split", "train"))

    @property
    def resumable(self) -> bool:
        """Whether it holds the training state a resumed run needs."""
        return bool(self.optimizer) and bool(self.scheduler) and bool(self.rng)

    def to_state(self) -> dict[str, Any]:
        """The dict :func:`save_checkpoint` writes (layout :data:`VERSION`)."""
        state: dict[str, Any] = {"format": FORMAT}
        for f in dataclasses.fields(self):
            if f.name != "format":
                state[f.name] = getattr(self, f.name)
        state.update(
            model=dict(self.model),
            model_spec=self.model_spec.to_state(),
            classes=list(self.classes),
            norm=self.norm.to_state(),
            frontend={} if self.frontend is None else self.frontend.to_dict(),
            rng=list(self.rng),
            selector=None if self.selector is None else dict(self.selector),
            metrics=dict(self.metrics),
            config=dict(self.config),
            selection_videos=list(self.selection_videos),
        )
        return state


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (a reader sees the old file or the new one)."""
    with atomic_write(path) as tmp:
        torch.save(ckpt.to_state(), tmp)


# --------------------------------------------------------------------------- reading

# Entries readers need even from the oldest checkpoint: predict, --init and a resumed run.
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "model": Mapping,
    "model_spec": Mapping,
    "config": Mapping,
    "classes": list,
    "norm": Mapping,
    "frontend_hash": str,
    "epoch": int,
}
# Every other entry of layouts 2 and 3 (checked after migration) -> its type.
_OTHER: dict[str, type | tuple[type, ...]] = {
    "frontend": Mapping,
    "window": int,
    "embeddings": str,
    "step_in_epoch": int,
    "global_step": int,
    "optimizer": Mapping,
    "scheduler": Mapping,
    "scaler": Mapping,
    "rng": list,
    "best_top1": (int, float),
    "selector": (Mapping, type(None)),
    "metrics": Mapping,
    "world_size": int,
    "effective_batch_size": int,
    "batch_size_used": int,
    "windows_per_video_used": int,
    "selection_split": str,
    "selection_videos": list,
}

# What runs before an entry was recorded did; see migrate_v1.
V1_WINDOW = 96  # the one window size there was
V1_N_MELS = 64  # the one band count there was
V1_DEFAULTS: dict[str, Any] = {
    "frontend": {},
    "embeddings": "",
    "step_in_epoch": 0,
    "global_step": 0,
    "optimizer": {},
    "scheduler": {},
    "scaler": {},
    "rng": [],
    "best_top1": -1.0,
    "selector": None,  # chose best.pt by top-1 alone
    "metrics": {},
    "world_size": 0,
    "effective_batch_size": 0,
    "batch_size_used": 0,
    "windows_per_video_used": 0,
    "selection_split": "",
    "selection_videos": [],
}


def migrate_v1(state: Mapping[str, Any]) -> dict[str, Any]:
    """A layout-1 checkpoint dict as layout 2: what older runs did, filled in explicitly.

    Layout 1 is the dict of ``avfuse-checkpoint/1``, written before the record was typed; the
    earliest of those files lack entries added later: the window (96 frames), the model's
    bands and frames (64 x the window), width and dropout (1.0, 0.0), the short-clip policy
    (``repeat``), the embedding store (``None`` or absent: log-mel features) and the training
    state; ``config.channels_last`` was a boolean before it had ``auto``. Entries present keep
    their value, whatever its type: the checks after migration judge them. The seven entries
    of :data:`REQUIRED` get no default.
    """
    out = dict(state)
    out["format"] = f"{_FORMAT_NAME}/2"
    for key, value in V1_DEFAULTS.items():
        if key not in out or (key == "embeddings" and out[key] is None):
            out[key] = value
    out.setdefault("window", V1_WINDOW)
    spec = out.get("model_spec")
    if isinstance(spec, Mapping):
        spec = dict(spec)
        spec.setdefault("width", 1.0)
        spec.setdefault("dropout", 0.0)
        spec.setdefault("n_mels", V1_N_MELS)
        spec.setdefault("frames", out["window"])
        out["model_spec"] = spec
    config = out.get("config")
    if isinstance(config, Mapping):
        config = dict(config)
        config.setdefault("short_clips", "repeat")
        cl = config.get("channels_last")
        if isinstance(cl, bool):
            config["channels_last"] = BOOL_TO_TRI_STATE[cl]
        out["config"] = config
    return out


def migrate_v2(state: Mapping[str, Any]) -> dict[str, Any]:
    """A layout-2 checkpoint dict as layout 3: a head on embeddings' ``frontend``, spelled as
    a front end named ``embedding`` (``n_mels`` the embedding size, ``features_frontend_hash``
    the source store's), becomes the fields of its :class:`~avfuse.store.EmbeddingSpec`."""
    out = dict(state)
    out["format"] = f"{_FORMAT_NAME}/3"
    fe = out.get("frontend")
    if isinstance(fe, Mapping) and fe.get("name") == "embedding":
        out["frontend"] = frontend_from_v1(fe)["frontend"]
    return out


# Layout version -> the function bringing it to the next one.
_MIGRATIONS = {1: migrate_v1, 2: migrate_v2}


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _number_in(value: Any, lo: float, hi: float, *, lo_open: bool) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return (lo < value if lo_open else lo <= value) and value <= hi


def _spec_problems(spec: Mapping[str, Any]) -> list[str]:
    """Entries of ``model_spec`` a model cannot be built from without absurd allocations."""
    out = []
    if not isinstance(spec.get("name"), str):
        out.append(f"model_spec.name ({spec.get('name')!r})")
    width = spec.get("width")
    if not _number_in(width, 0, MAX_WIDTH, lo_open=True):
        out.append(f"model_spec.width ({width!r}; must be > 0 and <= {MAX_WIDTH})")
    dropout = spec.get("dropout")
    if not _number_in(dropout, 0, 1, lo_open=False) or dropout == 1:
        out.append(f"model_spec.dropout ({dropout!r}; must be >= 0 and < 1)")
    for key, hi in (("n_mels", MAX_BANDS), ("frames", MAX_WINDOW)):
        if not _int_in(spec.get(key), 1, hi):
            out.append(f"model_spec.{key} ({spec.get(key)!r}; must be 1 to {hi})")
    if not isinstance(spec.get("arch"), Mapping | None):
        out.append(f"model_spec.arch (a {type(spec['arch']).__name__})")
    return out


def _norm_problems(norm: Mapping[str, Any]) -> list[str]:
    mean, std = norm.get("mean"), norm.get("std")
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        return ["norm (mean and std must be tensors)"]
    if mean.shape != std.shape or mean.ndim != 1:
        return [f"norm (mean {tuple(mean.shape)} and std {tuple(std.shape)} differ)"]
    if not bool((std > 0).all()):
        return ["norm.std (a band with standard deviation <= 0 divides by zero)"]
    return []


def _type_problems(state: Mapping[str, Any]) -> list[str]:
    out = []
    for key, kind in (REQUIRED | _OTHER).items():
        if key not in state:
            out.append(f"{key} (missing)")
        elif not isinstance(state[key], kind) or (
            isinstance(state[key], bool) and bool not in (kind if isinstance(kind, tuple) else ())
        ):
            out.append(f"{key} (a {type(state[key]).__name__})")
    return out


def _value_problems(state: Mapping[str, Any]) -> list[str]:
    """Entries of the right type whose values no reader can use."""
    out = []
    if isinstance(state.get("window"), int) and not _int_in(state["window"], 1, MAX_WINDOW):
        out.append(f"window ({state['window']!r}; must be 1 to {MAX_WINDOW})")
    for key, limit in (("classes", MAX_CLASSES), ("selection_videos", None)):
        names = state.get(key)
        if not isinstance(names, list):
            continue
        if limit is not None and not 0 < len(names) <= limit:
            out.append(f"{key} ({len(names)} of them)")
        elif not all(isinstance(c, str) for c in names):
            out.append(f"{key} (not all names)")
    model = state.get("model")
    if isinstance(model, Mapping) and not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        out.append("model (not all named tensors)")
    if isinstance(state.get("model_spec"), Mapping):
        out += _spec_problems(state["model_spec"])
    if isinstance(state.get("norm"), Mapping):
        out += _norm_problems(state["norm"])
    config = state.get("config")
    if isinstance(config, Mapping) and config.get("short_clips") not in SHORT_CLIPS:
        out.append(f"config.short_clips ({config.get('short_clips')!r})")
    rng = state.get("rng")
    if isinstance(rng, list) and not all(isinstance(r, Mapping) for r in rng):
        out.append("rng (not all per-rank states)")
    if isinstance(state.get("frontend"), Mapping) and isinstance(state.get("embeddings"), str):
        try:
            _frontend(state)
        except (KeyError, TypeError, ValueError) as exc:
            out.append(f"frontend ({' '.join(str(exc).split())[:160]})")
    return out


def _frontend(state: Mapping[str, Any]) -> StoreFrontend | None:
    """The typed record of a layout-3 ``frontend`` entry (``None`` when empty)."""
    fe = state["frontend"]
    if not fe:
        return None
    return frontend_from_dict("embedding" if state["embeddings"] else "logmel", fe)


def _version(state: Any) -> int | None:
    """The layout version of a loaded file, or ``None`` for a file that is not a checkpoint."""
    fmt = state.get("format") if isinstance(state, dict) else None
    match = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    return int(match.group(1)) if match else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read, migrate and validate a training checkpoint (``weights_only`` loading).

    Raises :class:`avfuse.safe_pickle.CorruptCheckpointError` for a truncated or damaged file
    or one with a non-finite tensor, :class:`avfuse.safe_pickle.OversizeError` for a file
    declaring more data than it holds, and ``ValueError`` for a file that is not an avfuse
    checkpoint, one of a newer layout, or one lacking an entry or holding a wrong type or an
    absurd size (naming every such entry).
    """
    state = load_torch(path)
    version = _version(state)
    if version is None or version < 1:
        raise ValueError(f"{path} is not an avfuse training checkpoint")
    if version > VERSION:
        raise ValueError(
            f"{path}: checkpoint layout {version} is newer than this avfuse reads (up to "
            f"{VERSION}); use the avfuse that wrote it"
        )
    for v in range(version, VERSION):
        state = _MIGRATIONS[v](state)
    problems = _type_problems(state)
    problems += _value_problems(state)
    if problems:
        raise ValueError(f"{path}: damaged avfuse checkpoint, bad entries: {', '.join(problems)}")
    return _record(state, version)


def _record(state: Mapping[str, Any], version: int) -> Checkpoint:
    """The record of a validated dict, migrated to layout :data:`VERSION`."""
    spec = state["model_spec"]
    return Checkpoint(
        model=dict(state["model"]),
        model_spec=ModelSpec(
            name=spec["name"],
            width=float(spec["width"]),
            dropout=float(spec["dropout"]),
            n_mels=spec["n_mels"],
            frames=spec["frames"],
            arch=None if spec.get("arch") is None else dict(spec["arch"]),
        ),
        classes=tuple(state["classes"]),
        norm=NormStats.from_state(state["norm"]),
        frontend_hash=state["frontend_hash"],
        frontend=_frontend(state),
        window=state["window"],
        embeddings=state["embeddings"],
        epoch=state["epoch"],
        step_in_epoch=state["step_in_epoch"],
        global_step=state["global_step"],
        optimizer=state["optimizer"],
        scheduler=state["scheduler"],
        scaler=state["scaler"],
        rng=tuple(state["rng"]),
        best_top1=float(state["best_top1"]),
        selector=state["selector"],
        metrics=dict(state["metrics"]),
        config=dict(state["config"]),
        world_size=state["world_size"],
        effective_batch_size=state["effective_batch_size"],
        batch_size_used=state["batch_size_used"],
        windows_per_video_used=state["windows_per_video_used"],
        selection_split=state["selection_split"],
        selection_videos=tuple(state["selection_videos"]),
        format=version,
    )
