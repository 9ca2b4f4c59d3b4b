"""The checkpoint format is validated once, on load, naming what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from avfuse.checkpoint import FORMAT, REQUIRED, load_checkpoint


def _complete() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": {"fc.weight": torch.zeros(2, 3)},
        "model_spec": {"name": "resnet", "num_classes": 2},
        "config": {"epochs": 1},
        "classes": ["a", "b"],
        "norm": {"mean": torch.zeros(64), "std": torch.ones(64)},
        "frontend_hash": "abc",
        "window": 96,
        "epoch": 1,
    }


def test_a_complete_checkpoint_loads(tmp_path: Path) -> None:
    torch.save(_complete(), tmp_path / "c.pt")
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck["classes"] == ["a", "b"] and torch.equal(ck["model"]["fc.weight"], torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"classes": None}, "classes (a NoneType)"),
        ({"classes": ["a", 3]}, "classes (not all names)"),
        ({"model": [1, 2]}, "model (a list)"),
        ({"window": 0}, "window (0;"),
        ({"epoch": True}, "epoch (a bool)"),
    ],
)
def test_a_damaged_checkpoint_names_the_entry(
    tmp_path: Path, change: dict[str, Any], needle: str
) -> None:
    ck = _complete() | change
    torch.save(ck, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="damaged avfuse checkpoint") as err:
        load_checkpoint(tmp_path / "c.pt")
    assert needle in str(err.value)


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_every_required_entry_is_checked(tmp_path: Path, key: str) -> None:
    ck = _complete()
    del ck[key]
    torch.save(ck, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=rf"{key} \(missing\)"):
        load_checkpoint(tmp_path / "c.pt")


def test_a_foreign_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not an avfuse training checkpoint"):
        load_checkpoint(tmp_path / "c.pt")
