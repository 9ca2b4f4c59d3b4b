"""The training checkpoint: one format, written by ``train`` and validated here for every reader.

A checkpoint is a ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts (so
:func:`avfuse.safe_pickle.load_torch` reads it with ``weights_only``). What predict, embed, a
resumed run and ``--init`` need from it is checked once, on load, with an error naming the
file and the entry, instead of a ``KeyError`` deep inside a stage.

A checkpoint is as untrusted as any input: the sizes it declares (window, width, bands) decide
what a reader allocates, so each must lie within what a data set can need
(:data:`avfuse.model_config.MAX_WINDOW` frames ...); its tensors must be finite and its band
standard deviations positive, or every score computed from it would be NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from avfuse.model_config import MAX_WIDTH, MAX_WINDOW
from avfuse.safe_pickle import load_torch

__all__ = ["FORMAT", "REQUIRED", "load_checkpoint"]

FORMAT = "avfuse-checkpoint/1"

# Entry -> the type every reader relies on.
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "model": Mapping,
    "model_spec": Mapping,
    "config": Mapping,
    "classes": list,
    "norm": Mapping,
    "frontend_hash": str,
    "epoch": int,
}

# Embedding heads read embeddings as bands: CNN14's are 2048 wide.
MAX_BANDS = 1 << 16
MAX_CLASSES = 1 << 20


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _spec_problems(spec: Mapping[str, Any]) -> list[str]:
    """Entries of ``model_spec`` a model cannot be built from without absurd allocations."""
    out = []
    if not isinstance(spec.get("name"), str):
        out.append(f"model_spec.name ({spec.get('name')!r})")
    width = spec.get("width", 1.0)
    if not isinstance(width, int | float) or isinstance(width, bool) or not 0 < width <= MAX_WIDTH:
        out.append(f"model_spec.width ({width!r}; must be > 0 and <= {MAX_WIDTH})")
    dropout = spec.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        out.append(f"model_spec.dropout ({dropout!r}; must be >= 0 and < 1)")
    for key, hi in (("n_mels", MAX_BANDS), ("frames", MAX_WINDOW)):
        if key in spec and not _int_in(spec[key], 1, hi):
            out.append(f"model_spec.{key} ({spec[key]!r}; must be 1 to {hi})")
    return out


def _norm_problems(norm: Mapping[str, Any]) -> list[str]:
    import torch

    mean, std = norm.get("mean"), norm.get("std")
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        return ["norm (mean and std must be tensors)"]
    if mean.shape != std.shape or mean.ndim != 1:
        return [f"norm (mean {tuple(mean.shape)} and std {tuple(std.shape)} differ)"]
    if not bool((std > 0).all()):
        return ["norm.std (a band with standard deviation <= 0 divides by zero)"]
    return []


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a training checkpoint (``weights_only`` loading).

    Raises :class:`avfuse.safe_pickle.CorruptCheckpointError` for a truncated or damaged file
    or one with a non-finite tensor, :class:`avfuse.safe_pickle.OversizeError` for a file
    declaring more data than it holds, and ``ValueError`` for a file that is not an avfuse
    checkpoint or lacks an entry readers need or holds an absurd size (naming it).
    """
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an avfuse training checkpoint")
    problems = [
        f"{key} (missing)" if key not in ckpt else f"{key} (a {type(ckpt[key]).__name__})"
        for key, kind in REQUIRED.items()
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool)
    ]
    if "window" in ckpt and not _int_in(ckpt["window"], 1, MAX_WINDOW):
        # absent in older checkpoints: 96
        problems.append(f"window ({ckpt['window']!r}; must be 1 to {MAX_WINDOW})")
    classes = ckpt.get("classes")
    if isinstance(classes, list) and not 0 < len(classes) <= MAX_CLASSES:
        problems.append(f"classes ({len(classes)} of them)")
    elif isinstance(classes, list) and not all(isinstance(c, str) for c in classes):
        problems.append("classes (not all names)")
    if isinstance(ckpt.get("model_spec"), Mapping):
        problems += _spec_problems(ckpt["model_spec"])
    if isinstance(ckpt.get("norm"), Mapping):
        problems += _norm_problems(ckpt["norm"])
    if problems:
        raise ValueError(f"{path}: damaged avfuse checkpoint, bad entries: {', '.join(problems)}")
    return ckpt
