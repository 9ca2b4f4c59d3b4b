"""Pretrained networks in their released checkpoint layouts (random values, so nothing is
downloaded), and a small work folder to fine-tune them on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from avfuse.models import Cnn10
from tests.synthetic import make_synthetic_work


def cnn10_weights(seed: int, path: Path) -> Path:
    return save_released(randomise(Cnn10(3, width=0.125), seed), path)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and random batch-norm statistics (a checkpoint, not an initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith(("bn0.weight", "bn1.weight", "bn2.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "extractor" in name:
                continue  # the fixed STFT / mel matrices of the waveform front end
            else:
                fan_in = t[0].numel() if t.dim() > 1 else t.numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model


def save_released(model: nn.Module, path: Path) -> Path:
    """The layout of the audioset_tagging_cnn release: model, sampler (numpy RandomState)."""
    rs = np.random.RandomState(1234)
    sampler = {"indexes_per_class": [np.arange(5), np.arange(3)], "random_state": rs}
    torch.save({"model": model.state_dict(), "sampler": sampler, "iteration": 600000}, path)
    return path


def finetune_work(tmp: Path, n_mels: int, example_frames: int, frames: tuple[int, int]) -> Path:
    make_synthetic_work(
        tmp,
        n_classes=3,
        videos_per_class=3,
        n_mels=n_mels,
        example_frames=example_frames,
        frames_range=frames,
    )
    return tmp
