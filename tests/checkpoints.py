"""Checkpoint records for tests that need one without training a network."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from avfuse.checkpoint import Checkpoint, ModelSpec
from avfuse.data import NormStats


def make_checkpoint(
    model: dict[str, torch.Tensor] | None = None,
    spec: ModelSpec | None = None,
    classes: tuple[str, ...] = ("a", "b"),
    norm: NormStats | None = None,
    **change: Any,
) -> Checkpoint:
    """A complete record of a predict-only checkpoint (no optimizer state): a two-class
    ``resnet`` over 8-frame windows of 4 bands unless told otherwise."""
    spec = spec or ModelSpec("resnet", 1.0, 0.3, 4, 8)
    fields: dict[str, Any] = {
        "model": model if model is not None else {"fc.weight": torch.ones(2, 3)},
        "model_spec": spec,
        "classes": classes,
        "norm": norm
        or NormStats(np.zeros(spec.n_mels, np.float32), np.ones(spec.n_mels, np.float32)),
        "frontend_hash": "abc",
        "frontend": None,
        "window": spec.frames,
        "embeddings": "",
        "epoch": 1,
        "step_in_epoch": 0,
        "global_step": 0,
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "rng": (),
        "best_top1": -1.0,
        "selector": None,
        "metrics": {},
        "config": {"epochs": 1, "short_clips": "repeat"},
        "world_size": 1,
        "effective_batch_size": 0,
        "batch_size_used": 0,
        "windows_per_video_used": 0,
        "selection_split": "",
        "selection_videos": (),
    }
    return Checkpoint(**(fields | change))
