"""Name tables (models, fusion methods, score formats): each is the one list of its names.

The config fields, the CLI choices and the run config's documentation read the names from the
table when they are used, so an entry added at run time is accepted everywhere and a name
outside the table is refused with the table's names.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
import torch
from torch import nn

from avfuse import models
from avfuse.cli import build_parser, main
from avfuse.config import (
    Config,
    add_arguments,
    allowed_values,
    field_types,
    from_arguments,
    from_dict,
)
from avfuse.demo import DemoConfig
from avfuse.fuse import FuseConfig, fuse
from avfuse.fusion import METHODS, FusionMethod, Stacker, fuse_log_probs, weight_curves
from avfuse.model_config import HEADS, MODELS, EmbedConfig, ModelEntry, TrainConfig
from avfuse.registry import OneOf, Registry
from avfuse.runconfig import render_config_toml
from avfuse.scores import ScoreFile
from avfuse.video_scores import (
    READERS,
    ScoreBounds,
    ScoreReader,
    VideoScoreError,
    VideoScores,
    read_one,
)
from tests.test_fuse import cfg_for, make_work


def _choices(command: str, option: str) -> list[str]:
    """The ``choices`` argparse offers for ``option`` of ``command``."""
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return list(action.choices or ())


# (config class, field, command, option, registry, fixed values first, entry filter)
FIELDS: list[tuple[type, str, str, str, Registry[Any], tuple[str, ...], Any]] = [
    (TrainConfig, "model", "train", "--model", MODELS, (), None),
    (TrainConfig, "head", "train", "--head", HEADS, (), None),
    (EmbedConfig, "model", "embed", "--model", MODELS, (), lambda e: e.pretrained),
    (DemoConfig, "model", "demo", "--model", MODELS, (), None),
    (FuseConfig, "method", "fuse", "--method", METHODS, (), None),
    (FuseConfig, "video_format", "fuse", "--video-format", READERS, ("auto",), None),
]


@pytest.mark.parametrize(("cls", "name", "command", "option", "table", "extra", "keep"), FIELDS)
def test_config_values_and_cli_choices_are_the_table(
    cls: type, name: str, command: str, option: str, table: Registry[Any], extra: Any, keep: Any
) -> None:
    want = [*extra, *(k for k, e in table.items() if keep is None or keep(e))]
    assert list(allowed_values(field_types(cls)[name])) == want
    assert _choices(command, option) == want


def test_the_tables_hold_what_the_hand_lists_held() -> None:
    # The names the configs spelled out before the tables became their source.
    assert list(MODELS) == ["vggish", "resnet", "panns", "cnn14", "cnn10", "ast"]
    assert {k for k, e in MODELS.items() if e.pretrained} == {"cnn14", "cnn10", "vggish", "ast"}
    assert dict(HEADS) == {"linear": 0, "mlp": 512}
    assert list(METHODS) == ["mean", "logprob", "stack"]
    assert list(READERS) == ["npz", "npy", "csv", "pkl"]
    # Every model entry names a real model class; every method is either weighted or learned
    # and draws the curves of a weighted one.
    for name in MODELS:
        assert issubclass(models.model_class(name), nn.Module)
    for m in METHODS.values():
        assert (m.fuse is not None and m.outcomes is not None) == m.weighted
        assert METHODS[m.curves].weighted


def test_run_config_documents_the_table_names() -> None:
    text = " ".join(render_config_toml().split("#"))
    for table in (MODELS, METHODS):
        assert "(one of: " + ", ".join(table) + ")" in " ".join(text.split())


def test_an_unknown_name_is_refused_with_the_table(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.model: 'tiny' is not one of") as exc:
        TrainConfig(tmp_path, model="tiny")
    assert all(repr(n) in str(exc.value) for n in MODELS)
    with pytest.raises(ValueError, match="model: 'tiny' is not one of 'vggish', 'resnet'"):
        from_dict(TrainConfig, {"work": str(tmp_path), "model": "tiny"})
    with pytest.raises(ValueError, match="unknown fusion method 'nope'; one of 'mean', 'logprob'"):
        METHODS.entry("nope")
    with pytest.raises(ValueError, match="video_format: 'txt' is not one of 'auto', 'npz'"):
        FuseConfig(tmp_path, audio_scores=tmp_path, video_format="txt")


def test_cli_refuses_an_unknown_model_listing_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "x", "--model", "tiny"])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "invalid choice: 'tiny'" in err
    assert "(choose from " + ", ".join(repr(n) for n in MODELS) + ")" in err.replace("\n", "")


class TinyNet(nn.Module):
    """A model added by one table entry: global mean of the window, then a linear layer."""

    def __init__(self, num_classes: int, width: float, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x: Any) -> Any:
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))


class SizedNet(nn.Module):
    """A model whose layer depends on the window: one linear layer over all its cells."""

    def __init__(self, num_classes: int, cells: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cells, num_classes)

    @classmethod
    def build(cls, num_classes: int, *, n_mels: int, frames: int, **_: Any) -> SizedNet:
        return cls(num_classes, n_mels * frames)


def test_a_model_added_at_run_time_is_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="'tiny' is not one of"):
        TrainConfig(tmp_path, model="tiny")
    monkeypatch.setattr(models, "TinyNet", TinyNet, raising=False)
    monkeypatch.setitem(MODELS, "tiny", ModelEntry("TinyNet"))
    assert TrainConfig(tmp_path, model="tiny").model == "tiny"
    assert from_dict(TrainConfig, {"work": str(tmp_path), "model": "tiny"}).model == "tiny"
    assert "tiny" in _choices("train", "--model") and "tiny" in _choices("demo", "--model")
    # Without released weights it is no embedding network.
    assert "tiny" not in _choices("embed", "--model")
    with pytest.raises(ValueError, match=r"EmbedConfig\.model: 'tiny' is not one of"):
        EmbedConfig(tmp_path, model="tiny")
    # The command line builds the config with it, and the model is built from the entry.
    parser = build_parser("train")
    ns = parser.parse_args(["train", str(tmp_path), "--model", "tiny"])
    cfg = from_arguments(TrainConfig, ns)
    assert cfg.model == "tiny"
    net = models.build_model(cfg.model, num_classes=3, n_mels=8, frames=4)
    assert isinstance(net, TinyNet)
    assert net(torch.ones(2, 1, 4, 8)).shape == (2, 3)
    # A model sized by the window says so with a ``build`` classmethod: still one entry.
    monkeypatch.setattr(models, "SizedNet", SizedNet, raising=False)
    monkeypatch.setitem(MODELS, "sized", ModelEntry("SizedNet"))
    sized = models.build_model("sized", num_classes=5, width=0.5, n_mels=8, frames=4)
    assert isinstance(sized, SizedNet) and sized.fc.in_features == 32 and sized.fc.out_features == 5
    monkeypatch.undo()
    # Gone from the table, gone from the config: nothing kept a copy of the names.
    with pytest.raises(ValueError, match="'tiny' is not one of"):
        TrainConfig(tmp_path, model="tiny")
    assert "tiny" not in _choices("train", "--model")


def test_a_fusion_method_added_at_run_time_is_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def video_only(lv: np.ndarray, la: np.ndarray, wv: Any, wa: Any) -> np.ndarray:
        return np.exp(lv)

    monkeypatch.setitem(
        METHODS, "video", FusionMethod("video only", "mean", video_only, METHODS["mean"].outcomes)
    )
    assert FuseConfig(tmp_path, audio_scores=tmp_path, method="video").method == "video"
    assert "video" in _choices("fuse", "--method")
    lv = np.log(np.full((2, 3), 1 / 3, np.float32))
    la = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]], np.float32))
    np.testing.assert_array_equal(fuse_log_probs(lv, la, 0.5, "video"), np.exp(lv))


def _fused(d: dict[str, Any], method: str) -> tuple[np.ndarray, dict[str, Any]]:
    res = fuse(cfg_for(d, method=method, folds=3, output=d["work"] / f"fusion_{method}"))
    sf = ScoreFile.load(res.fused_path)
    return sf.select(d["val"]["ids"]).scores, res.figures


def test_fuse_runs_any_entry_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of ``stack`` and of ``mean`` under new names fuse exactly as the originals:
    the fusion stage asks the table what a method is, never its name."""
    d = make_work(tmp_path, n=240, c=6, seed=3)
    monkeypatch.setitem(METHODS, "learned_copy", dataclasses.replace(METHODS["stack"]))
    monkeypatch.setitem(METHODS, "mean_copy", dataclasses.replace(METHODS["mean"]))
    for original, copy in (("stack", "learned_copy"), ("mean", "mean_copy")):
        want, want_fig = _fused(d, original)
        got, got_fig = _fused(d, copy)
        np.testing.assert_array_equal(got, want)
        assert got_fig["chosen"] == want_fig["chosen"]
        assert got_fig["curve"] == want_fig["curve"]
        assert got_fig["metrics"] == want_fig["metrics"]
    # The learned method fitted a model per fold and draws the product-of-experts curves.
    _, fig = _fused(d, "learned_copy")
    assert all(set(f) == {"t_video", "t_audio", "alpha", "beta"} for f in fig["chosen"]["folds"])
    assert "weight_median" not in fig["chosen"] and fig["curve"]["method"] == "logprob"
    # ... and a learned method built on another fit is used as such: the stacker's fit with a
    # huge L2 stays a global product of experts (no per-class terms).
    calls: list[int] = []

    def fit(lv: np.ndarray, la: np.ndarray, labels: np.ndarray, l2: float) -> Stacker:
        calls.append(len(labels))
        return Stacker.fit(lv, la, labels, 1e6)

    monkeypatch.setitem(METHODS, "stiff", FusionMethod("stiff", "mean", fit=fit))
    _, fig = _fused(d, "stiff")
    assert len(calls) == 3 and fig["curve"]["method"] == "mean"


def test_weight_curves_of_a_learned_method_are_its_curve_methods() -> None:
    rng = np.random.default_rng(0)
    lv = np.log(rng.dirichlet(np.ones(4), 50)).astype(np.float32)
    la = np.log(rng.dirichlet(np.ones(4), 50)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    w = np.linspace(0, 1, 5)
    for a, b in zip(weight_curves(lv, la, y, w, "stack"), weight_curves(lv, la, y, w, "logprob")):
        np.testing.assert_array_equal(a, b)


def test_a_score_format_added_at_run_time_is_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_txt(path: Path, bounds: ScoreBounds) -> VideoScores:
        rows = [line.split() for line in path.read_text().splitlines()]
        return VideoScores(
            [r[0] for r in rows],
            np.array([[float(x) for x in r[1:]] for r in rows]),
            None,
            str(path),
        )

    path = tmp_path / "scores.txt"
    path.write_text("a 0.25 0.75\nb 1.0 0.0\n")
    with pytest.raises(ValueError, match="not one of 'auto', 'npz'"):
        FuseConfig(tmp_path, audio_scores=tmp_path, video_format="txt")
    with pytest.raises(VideoScoreError, match=r"type \.txt \(known: \.npz, \.npy, \.csv, \.tsv"):
        read_one(path)
    monkeypatch.setitem(READERS, "txt", ScoreReader(("txt",), read_txt))
    assert FuseConfig(tmp_path, audio_scores=tmp_path, video_format="txt").video_format == "txt"
    assert _choices("fuse", "--video-format")[-1] == "txt"
    for fmt in ("auto", "txt"):
        vs = read_one(path, fmt)
        assert vs.ids == ["a", "b"]
        np.testing.assert_array_equal(vs.scores, [[0.25, 0.75], [1.0, 0.0]])


def test_registry_and_one_of() -> None:
    table: Registry[int] = Registry("thing", {"b": 2, "a": 1})
    assert list(table) == ["b", "a"] and table.entry("a") == 1
    with pytest.raises(ValueError, match="unknown thing 'c'; one of 'b', 'a'"):
        table.entry("c")
    with pytest.raises(ValueError, match="unknown thing"):
        table.entry(["a"])  # type: ignore[arg-type]
    odd = OneOf(table, extra=("auto",), keep=lambda v: v % 2 == 0)
    assert list(odd) == ["auto", "b"]
    table["d"] = 4
    assert list(odd) == ["auto", "b", "d"] and "d" in odd and "a" not in odd
    assert ["b"] not in odd and 2 not in odd
    # Made alike, equal (an annotation resolved twice); another table or filter is not.
    assert OneOf(table) == OneOf(table) and hash(OneOf(table)) == hash(OneOf(table))
    assert OneOf(table) != OneOf(Registry("thing", {"b": 2, "a": 1}))
    assert OneOf(table) != OneOf(table, extra=("auto",))


_TABLE: Registry[int] = Registry("colour", {"red": 1, "blue": 2})


@dataclasses.dataclass(frozen=True)
class _Paint(Config):
    colour: Annotated[str, OneOf(_TABLE)] = "red"
    accent: Annotated[str, OneOf(_TABLE)] | None = None
    mix: tuple[Annotated[str, OneOf(_TABLE)], ...] = ()


def test_optional_and_tuple_fields_of_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_dict(_Paint, {"accent": "blue", "mix": ["red", "blue"]}).mix == ("red", "blue")
    assert from_dict(_Paint, {"mix": "blue,red"}).mix == ("blue", "red")
    with pytest.raises(ValueError, match=r"_Paint\.accent: 'green' is not one of 'red', 'blue'"):
        _Paint(accent="green")
    with pytest.raises(ValueError, match=r"mix: 'green' is not one of 'red', 'blue'"):
        from_dict(_Paint, {"mix": ["red", "green"]})
    monkeypatch.setitem(_TABLE, "green", 3)
    assert _Paint(accent="green", mix=("green",)).mix == ("green",)
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Paint)
    assert parser.parse_args(["--accent", "green"]).accent == "green"
    with pytest.raises(SystemExit):
        parser.parse_args(["--colour", "grey"])
