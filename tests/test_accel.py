"""The one inference placement (device, autocast, memory format) of train, scoring and embed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from avfuse.accel import Placement

SRC = Path(__file__).resolve().parents[1] / "src" / "avfuse"


class _Seen(nn.Module):
    """Records the input it gets; returns a linear map of it (autocast applies to ``linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.fc(x.flatten(2).mean(2).expand(-1, 5))


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_is_one_channel_float32_in_the_models_format(channels_last: bool) -> None:
    x = torch.arange(2 * 4 * 3, dtype=torch.float16).reshape(2, 4, 3)
    place = Placement(torch.device("cpu"), None, channels_last)
    got = place.model_input(x)
    assert got.shape == (2, 1, 4, 3) and got.dtype == torch.float32
    assert torch.equal(got[:, 0], x.float())
    assert got.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


@pytest.mark.parametrize(("amp", "out"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_forward_runs_the_model_under_the_placements_autocast(
    amp: torch.dtype | None, out: torch.dtype
) -> None:
    model = _Seen()
    place = Placement(torch.device("cpu"), amp, channels_last=True)
    y = place.forward(model, place.to_device(torch.ones(2, 4, 3)))
    assert y.dtype == out and y.shape == (2, 3)
    assert model.seen is not None and model.seen.shape == (2, 1, 4, 3)
    assert model.seen.is_contiguous(memory_format=torch.channels_last)
    # Outside forward no autocast is left on.
    assert model(torch.ones(2, 1, 4, 3)).dtype == torch.float32


def test_autocast_and_memory_format_are_spelled_only_in_accel() -> None:
    """Train's step, scoring and embedding run the network through :class:`Placement`: no other
    module opens an autocast region or converts an input's memory format itself."""
    bad = []
    for path in SRC.rglob("*.py"):
        if path.name == "accel.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "autocast":
                bad.append(f"{path.name}:{node.lineno} autocast")
            if isinstance(node, ast.keyword) and node.arg == "memory_format":
                bad.append(f"{path.name}:{node.lineno} memory_format")
    assert not bad, bad
