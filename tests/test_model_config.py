"""The torch-free training, predict and embed configs: bounds and the spellings older configs used."""

from __future__ import annotations

from pathlib import Path

import pytest

from avfuse.config import apply_overrides, from_dict, load_config
from avfuse.model_config import EmbedConfig, TrainConfig


@pytest.mark.parametrize(
    "override", ["batch_size=100000000", "windows_per_video=0", "windows_per_video=100000000"]
)
def test_allocation_sizes_in_settings_are_bounded(override: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        apply_overrides(TrainConfig(work=Path("w")), [override])


def test_boolean_channels_last_of_old_configs_still_loads(tmp_path: Path) -> None:
    assert from_dict(TrainConfig, {"work": "w", "channels_last": True}).channels_last == "on"
    assert from_dict(TrainConfig, {"work": "w", "channels_last": False}).channels_last == "off"
    path = tmp_path / "embed.toml"
    path.write_text('work = "w"\nchannels_last = false\n', "utf-8")
    assert load_config(EmbedConfig, path).channels_last == "off"
    assert TrainConfig(Path("w")).channels_last == "auto"
    with pytest.raises(ValueError, match="channels_last"):
        from_dict(TrainConfig, {"work": "w", "channels_last": "maybe"})


def test_boolean_channels_last_in_code_still_works() -> None:
    assert TrainConfig(Path("w"), channels_last=False).channels_last == "off"  # type: ignore[arg-type]
    assert EmbedConfig(Path("w"), channels_last=True).channels_last == "on"  # type: ignore[arg-type]
