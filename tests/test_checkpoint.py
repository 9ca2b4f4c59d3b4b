"""The checkpoint record: written and read through avfuse.checkpoint, validated once on load
(naming what is wrong), older layouts read through an explicit migration."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from avfuse.checkpoint import (
    FORMAT,
    REQUIRED,
    VERSION,
    Checkpoint,
    ModelSpec,
    load_checkpoint,
    save_checkpoint,
)
from avfuse.melspec import FrontendConfig
from avfuse.safe_pickle import CorruptCheckpointError, OversizeError
from avfuse.store import EmbeddingSpec
from tests.checkpoints import make_checkpoint


def _complete() -> dict[str, Any]:
    return make_checkpoint().to_state()


def test_a_record_reads_back_equal(tmp_path: Path) -> None:
    spec = ModelSpec("ast", 0.5, 0.1, 128, 100, {"hidden_size": 64, "max_length": 100})
    ck = make_checkpoint(
        model={"fc.weight": torch.arange(6.0).reshape(2, 3)},
        spec=spec,
        optimizer={"state": {}, "param_groups": [{"lr": 0.1}]},
        scheduler={"last_epoch": 3},
        rng=({"python": (3, (1, 2), None), "torch": torch.zeros(4, dtype=torch.uint8)},),
        selector={"rule": "auto", "n": 3},
        selection_split="heldout",
        selection_videos=("v1", "v2"),
        embeddings="cnn10",
        world_size=2,
        epoch=4,
        step_in_epoch=7,
    )
    save_checkpoint(tmp_path / "c.pt", ck)
    got = load_checkpoint(tmp_path / "c.pt")
    assert got.format == VERSION and torch.load(tmp_path / "c.pt")["format"] == FORMAT
    assert got.model_spec == spec and got.classes == ("a", "b")
    assert torch.equal(got.model["fc.weight"], torch.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(got.norm.mean, np.zeros(128, np.float32))
    assert (got.epoch, got.step_in_epoch, got.world_size) == (4, 7, 2)
    assert got.selection_videos == ("v1", "v2") and got.embeddings == "cnn10"
    assert got.optimizer["param_groups"] == [{"lr": 0.1}] and got.selector == {
        "rule": "auto",
        "n": 3,
    }
    assert got.rng[0]["python"] == (3, (1, 2), None) and got.resumable


# A front end as train copied it from store.json before either was typed.
V1_FRONTEND = {
    "sample_rate": 16000,
    "win_length": 400,
    "hop_length": 160,
    "n_fft": 512,
    "n_mels": 4,
    "fmin": 125.0,
    "fmax": 7500.0,
    "log_offset": 0.01,
    "window": "periodic_hann",
    "spectrum": "magnitude",
    "mel_scale": "htk",
    "example_frames": 8,
}


def _v1_layout() -> dict[str, Any]:
    """A checkpoint as train wrote it before the record was typed: a dict, format 1, every
    entry spelled here as it was written (not through the code under test)."""
    return {
        "format": "avfuse-checkpoint/1",
        "model": {"fc.weight": torch.full((2, 3), 0.5)},
        "model_spec": {"name": "resnet", "width": 0.25, "dropout": 0.3, "n_mels": 4, "frames": 8},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "scheduler": {"last_epoch": 12, "base_lrs": [0.01]},
        "scaler": {},
        "rng": [
            {"python": (3, tuple(range(625)), None), "torch": torch.zeros(8, dtype=torch.uint8)}
        ],
        "epoch": 2,
        "step_in_epoch": 5,
        "global_step": 17,
        "best_top1": 0.75,
        "selector": {"rule": "top1", "n": 4, "n_classes": 2, "kept_epoch": 2},
        "config": {"epochs": 3, "short_clips": "zeros", "channels_last": "off"},
        "classes": ["cat", "dog"],
        "norm": {"mean": torch.full((4,), -2.0), "std": torch.full((4,), 3.0)},
        "frontend_hash": "f00d",
        "frontend": V1_FRONTEND,
        "window": 8,
        "embeddings": "",
        "world_size": 1,
        "effective_batch_size": 32,
        "batch_size_used": 32,
        "windows_per_video_used": 4,
        "selection_split": "val",
        "selection_videos": ["v1", "v7"],
        "metrics": {"val_top1": 0.75},
    }


def test_the_v1_dict_layout_is_migrated(tmp_path: Path) -> None:
    torch.save(_v1_layout(), tmp_path / "v1.pt")
    ck = load_checkpoint(tmp_path / "v1.pt")
    assert ck.format == 1
    assert ck.model_spec == ModelSpec("resnet", 0.25, 0.3, 4, 8)
    assert ck.classes == ("cat", "dog") and ck.window == 8 and ck.short_clips == "zeros"
    np.testing.assert_array_equal(ck.norm.std, np.full(4, 3.0, np.float32))
    assert (ck.epoch, ck.step_in_epoch, ck.global_step, ck.best_top1) == (2, 5, 17, 0.75)
    assert ck.scheduler == {"last_epoch": 12, "base_lrs": [0.01]} and ck.resumable
    assert ck.selector is not None and ck.selector["kept_epoch"] == 2
    assert ck.selection_split == "val" and ck.selection_videos == ("v1", "v7")
    assert ck.frontend == FrontendConfig(n_mels=4, example_frames=8)
    assert ck.metrics == {"val_top1": 0.75}
    assert torch.equal(ck.model["fc.weight"], torch.full((2, 3), 0.5))
    # Saved again, it is written in the current layout and reads back the same.
    save_checkpoint(tmp_path / "v2.pt", ck)
    again = load_checkpoint(tmp_path / "v2.pt")
    assert again.format == VERSION
    assert dataclasses.replace(again, format=1, norm=ck.norm, model=ck.model, rng=ck.rng) == ck


def test_the_oldest_v1_files_get_what_those_runs_did(tmp_path: Path) -> None:
    """Before the window, the model's input size, the short-clip policy, the selector and the
    tri-state channels_last were recorded: 96-frame windows of 64 bands, repeat padding,
    best.pt by top-1, channels_last a boolean."""
    kept = ("format", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "classes")
    kept += ("step_in_epoch", "global_step", "best_top1", "frontend_hash")
    old = {k: v for k, v in _v1_layout().items() if k in kept}
    old |= {
        "model_spec": {"name": "cnn10"},
        "config": {"epochs": 3, "channels_last": True},
        "norm": {"mean": torch.zeros(64), "std": torch.ones(64)},
        "embeddings": None,
    }
    torch.save(old, tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt")
    assert ck.window == 96 and ck.model_spec == ModelSpec("cnn10", 1.0, 0.0, 64, 96)
    assert ck.short_clips == "repeat" and ck.config["channels_last"] == "on"
    assert ck.selector is None and ck.best_top1 == 0.75 and ck.embeddings == ""
    assert ck.selection_videos == () and ck.metrics == {}


def test_a_file_without_training_state_is_not_resumable(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    assert not load_checkpoint(tmp_path / "c.pt").resumable


def test_a_newer_layout_is_refused_naming_it(tmp_path: Path) -> None:
    torch.save(_complete() | {"format": f"avfuse-checkpoint/{VERSION + 1}"}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=f"layout {VERSION + 1} is newer") as err:
        load_checkpoint(tmp_path / "c.pt")
    assert str(tmp_path / "c.pt") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"classes": None}, "classes (a NoneType)"),
        ({"classes": ["a", 3]}, "classes (not all names)"),
        ({"model": [1, 2]}, "model (a list)"),
        ({"model": {"fc.weight": [1.0]}}, "model (not all named tensors)"),
        ({"window": 0}, "window (0;"),
        ({"epoch": True}, "epoch (a bool)"),
        ({"global_step": "7"}, "global_step (a str)"),
        ({"selector": [1]}, "selector (a list)"),
        ({"rng": [3]}, "rng (not all per-rank states)"),
        ({"selection_videos": [None]}, "selection_videos (not all names)"),
        ({"config": {"short_clips": "loop"}}, "config.short_clips ('loop')"),
    ],
)
def test_a_damaged_checkpoint_names_the_entry(
    tmp_path: Path, change: dict[str, Any], needle: str
) -> None:
    torch.save(_complete() | change, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="damaged avfuse checkpoint") as err:
        load_checkpoint(tmp_path / "c.pt")
    assert needle in str(err.value) and str(tmp_path / "c.pt") in str(err.value)


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_every_required_entry_is_checked(tmp_path: Path, key: str, layout: int) -> None:
    ck = _complete() | {"format": f"avfuse-checkpoint/{layout}"}
    del ck[key]
    torch.save(ck, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=rf"{key} \(missing\)"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("key", sorted(f.name for f in dataclasses.fields(Checkpoint)))
def test_layout_2_has_no_defaults(tmp_path: Path, key: str) -> None:
    """Every entry of the current layout must be there: defaults belong to the migration."""
    ck = _complete()
    if key == "format":
        del ck[key]
        torch.save(ck, tmp_path / "c.pt")
        with pytest.raises(ValueError, match="not an avfuse training checkpoint"):
            load_checkpoint(tmp_path / "c.pt")
        return
    del ck[key]
    torch.save(ck, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=rf"{key} \(missing\)"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("fmt", [None, "avfuse-checkpoint/x", "avfuse-checkpoint/0", 2])
def test_a_foreign_file_is_not_a_checkpoint(tmp_path: Path, fmt: object) -> None:
    torch.save({"state_dict": {}, "format": fmt}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not an avfuse training checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


SPEC = EmbeddingSpec(
    model="cnn10",
    dim=4,
    init_sha256="ab" * 32,
    window=96,
    hop=48,
    per_window=True,
    source_frontend_hash="0123456789abcdef",
    width=0.125,
)


def test_a_head_on_embeddings_keeps_its_embedding_spec(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", make_checkpoint(frontend=SPEC, embeddings="cnn10"))
    state = torch.load(tmp_path / "c.pt")
    assert state["frontend"]["dim"] == 4 and "n_mels" not in state["frontend"]
    assert load_checkpoint(tmp_path / "c.pt").frontend == SPEC
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(frontend=FrontendConfig.panns()))
    assert load_checkpoint(tmp_path / "m.pt").frontend == FrontendConfig.panns()


def test_an_embedding_head_of_layout_2_gets_its_spec(tmp_path: Path) -> None:
    """Layout 2 copied the store's made-up front end: named embedding, n_mels = its size."""
    state = make_checkpoint(embeddings="cnn10").to_state()
    state["format"] = "avfuse-checkpoint/2"
    state["frontend"] = {
        "name": "embedding",
        "model": "cnn10",
        "width": 0.125,
        "init_sha256": "ab" * 32,
        "window": 96,
        "hop": 48,
        "per_window": True,
        "features_frontend_hash": "0123456789abcdef",
        "n_mels": 4,
        "example_frames": 1,
    }
    torch.save(state, tmp_path / "v2.pt")
    ck = load_checkpoint(tmp_path / "v2.pt")
    assert ck.format == 2 and ck.frontend == SPEC


def test_a_front_end_no_record_reads_is_named(tmp_path: Path) -> None:
    state = _complete() | {"frontend": {"n_mels": 4, "mel_scale": "bark"}}
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"bad entries: frontend .*bark"):
        load_checkpoint(tmp_path / "c.pt")


def _checkpoint(**change: Any) -> dict[str, Any]:
    """A checkpoint file's dict with entries changed as a damaged or hostile file would."""
    return make_checkpoint(spec=ModelSpec("resnet", 1.0, 0.3, 4, 8)).to_state() | change


def test_checkpoint_zip_with_compressed_records_is_refused_before_loading(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(_checkpoint(), good)
    # Re-pack: the weights record grows to 64 MB of zeros, deflated to ~64 KB.
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/0"):
                data = data + bytes(64 << 20)
            dst.writestr(info.filename, data)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(OversizeError, match="declare") as info:
        load_checkpoint(bomb)
    assert str(bomb) in str(info.value)
    assert load_checkpoint(good).classes == ("a", "b")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"window": 10**9}, "window (1000000000; must be 1 to 65536)"),
        ({"window": True}, "window (True"),
        ({"model_spec": {"name": "resnet", "width": 1e6, "dropout": 0.1}}, "model_spec.width"),
        ({"model_spec": {"name": "resnet", "width": 0.0, "dropout": 0.1}}, "model_spec.width"),
        (
            {"model_spec": {"name": "resnet", "width": 1, "dropout": 0, "n_mels": 10**9}},
            "model_spec.n_mels",
        ),
        ({"norm": {"mean": torch.zeros(4), "std": torch.tensor([1.0, 0.0, 1, 1])}}, "norm.std"),
        ({"norm": {"mean": torch.zeros(4), "std": -torch.ones(4)}}, "norm.std"),
    ],
)
def test_absurd_checkpoint_values_are_refused(
    tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    path = tmp_path / "c.pt"
    torch.save(_checkpoint(**change), path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert says in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["model", "norm"])
def test_non_finite_checkpoint_tensors_are_refused(tmp_path: Path, bad: float, where: str) -> None:
    w = torch.ones(2, 3)
    std = torch.ones(4)
    (w if where == "model" else std)[1, ...] = bad
    path = tmp_path / "c.pt"
    torch.save(_checkpoint(model={"fc.weight": w}, norm={"mean": torch.zeros(4), "std": std}), path)
    with pytest.raises(CorruptCheckpointError, match="NaN or infinite") as info:
        load_checkpoint(path)
    assert ("fc.weight" if where == "model" else "norm.std") in str(info.value)
