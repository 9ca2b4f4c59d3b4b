"""The training checkpoint: one format, written by ``train`` and validated here for every reader.

A checkpoint is a ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts (so
:func:`avfuse.safe_pickle.load_torch` reads it with ``weights_only``). What predict, embed, a
resumed run and ``--init`` need from it is checked once, on load, with an error naming the
file and the entry, instead of a ``KeyError`` deep inside a stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a training checkpoint (``weights_only`` loading).

    Raises :class:`avfuse.safe_pickle.CorruptCheckpointError` for a truncated or damaged file
    and ``ValueError`` for a file that is not an avfuse checkpoint or lacks an entry readers
    need (naming it).
    """
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an avfuse training checkpoint")
    problems = [
        f"{key} (missing)" if key not in ckpt else f"{key} (a {type(ckpt[key]).__name__})"
        for key, kind in REQUIRED.items()
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool)
    ]
    if "window" in ckpt and (not isinstance(ckpt["window"], int) or ckpt["window"] < 1):
        problems.append(f"window ({ckpt['window']!r})")  # absent in older checkpoints: 96
    classes = ckpt.get("classes")
    if isinstance(classes, list) and not all(isinstance(c, str) for c in classes):
        problems.append("classes (not all names)")
    if problems:
        raise ValueError(f"{path}: damaged avfuse checkpoint, bad entries: {', '.join(problems)}")
    return ckpt
