"""Config values checked at construction, model selection and resume rules of training,
process-group teardown, and the run summary without fusion."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

import avfuse
from avfuse.config import Config, _literal_values, apply_overrides, check_fields, from_dict
from tests.test_train import TINY as TRAIN_TINY

# ------------------------------------------------------------------------- config checks


def _config_classes() -> list[type]:
    """Every config dataclass avfuse defines (frozen dataclasses named *Config or *Section)."""
    found: dict[str, type] = {}
    for mod in pkgutil.walk_packages(avfuse.__path__, "avfuse."):
        if mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__.startswith("avfuse")
                and obj.__name__.endswith(("Config", "Section"))
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def _instance(cls: type) -> Any:
    """A default instance: required fields (paths) get a placeholder."""
    hints = typing.get_type_hints(cls)
    required = {
        f.name: Path("w") if hints[f.name] is Path else "x"
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return cls(**required)


CLASSES = _config_classes()


def test_every_config_class_checks_on_construction() -> None:
    names = {c.__name__ for c in CLASSES}
    # The discovery finds the stage configs (and the test below would be vacuous otherwise).
    assert {"FrontendConfig", "TrainConfig", "FuseConfig", "RunConfig", "DemoConfig"} <= names
    for cls in CLASSES:
        assert issubclass(cls, Config), cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_literal_fields_refuse_other_values(cls: type) -> None:
    base = _instance(cls)
    hints = typing.get_type_hints(cls)
    checked = 0
    for f in dataclasses.fields(cls):
        allowed, per_item = _literal_values(hints[f.name])
        if not allowed:
            continue
        bad: Any = ("bogus-value",) if per_item else "bogus-value"
        with pytest.raises(ValueError) as err:
            dataclasses.replace(base, **{f.name: bad})
        msg = str(err.value)
        assert f"{cls.__name__}.{f.name}" in msg and "bogus-value" in msg
        assert all(repr(a) in msg for a in allowed), msg
        for good in allowed:  # every allowed value still constructs
            dataclasses.replace(base, **{f.name: (good,) if per_item else good})
        checked += 1
    if cls.__name__ in ("FrontendConfig", "TrainConfig", "PredictConfig", "FuseConfig"):
        assert checked >= 2


def test_mel_scale_outside_the_literal_is_refused() -> None:
    from avfuse.melspec import FrontendConfig

    allowed = get_args(typing.get_type_hints(FrontendConfig)["mel_scale"])
    with pytest.raises(ValueError, match=r"FrontendConfig\.mel_scale: 'bark'"):
        FrontendConfig(mel_scale="bark")  # type: ignore[arg-type]
    # Through a run config's nested table too (TOML files and --set come this way).
    from avfuse.runconfig import RunConfig

    with pytest.raises(ValueError, match="mel_scale"):
        apply_overrides(RunConfig(), ["features.frontend.mel_scale='bark'"])
    assert "bark" not in allowed


def test_bounded_numbers_are_refused_by_name() -> None:
    from avfuse.predict import PredictConfig
    from avfuse.runconfig import RunConfig
    from avfuse.train import TrainConfig

    work = Path("w")
    cases: list[tuple[Any, str]] = [
        (lambda: TrainConfig(work, epochs=0), "TrainConfig.epochs: 0"),
        (lambda: TrainConfig(work, batch_size=-4), "TrainConfig.batch_size: -4"),
        (lambda: TrainConfig(work, eval_every=-1), "TrainConfig.eval_every: -1"),
        (lambda: PredictConfig(work, batch_size=0), "PredictConfig.batch_size: 0"),
        (
            lambda: dataclasses.replace(RunConfig().fuse, tolerance=-0.01),
            "FuseSection.tolerance: -0.01",
        ),
        (lambda: dataclasses.replace(RunConfig().fuse, tolerance=1.5), "tolerance: 1.5"),
        (lambda: dataclasses.replace(RunConfig().fuse, folds=1), "folds: 1"),
        (
            lambda: dataclasses.replace(RunConfig().fuse, label_tolerance=-1.0),
            "FuseSection.label_tolerance: -1.0",
        ),
        (lambda: apply_overrides(RunConfig(), ["train.epochs=-3"]), "TrainSection.epochs: -3"),
    ]
    for make, text in cases:
        with pytest.raises(ValueError, match="out of range") as err:
            make()
        assert text in str(err.value)
    # The edges themselves are allowed.
    assert TrainConfig(work, epochs=1, eval_every=0).epochs == 1
    assert dataclasses.replace(RunConfig().fuse, tolerance=0.0).tolerance == 0.0


@dataclass(frozen=True)
class _Probe(Config):
    kind: Literal["a", "b"] | None = None
    stages: tuple[Literal["x", "y"], ...] = ()
    rate: float = field(default=0.5, metadata={"min": 0, "max": 1})
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Runs after the field check: it never sees an invalid value.
        self.seen.append(f"{self.kind}")


def test_generic_check_handles_optional_tuples_bounds_and_own_post_init() -> None:
    assert _Probe().kind is None and _Probe(kind="b").seen == ["b"]
    assert _Probe(stages=("y", "x")).stages == ("y", "x")
    with pytest.raises(ValueError, match=r"_Probe\.kind: 'c' is not one of 'a', 'b'"):
        _Probe(kind="c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"_Probe\.stages: 'z' is not one of 'x', 'y'"):
        _Probe(stages=("x", "z"))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"_Probe\.rate: 1\.5 is out of range; must be >= 0 and <= 1"
    ):
        _Probe(rate=1.5)
    with pytest.raises(ValueError, match="kind"):
        from_dict(_Probe, {"kind": "c"})
    check_fields(_Probe(rate=0.0))  # the bounds are inclusive
    assert get_origin(typing.get_type_hints(_Probe)["kind"]) is not Literal  # an Optional


# ------------------------------------------------------------------------- training


# The shared tiny settings (tests.test_train), with the schedule these tests count steps of.
TINY = {k: v for k, v in TRAIN_TINY.items() if k != "deterministic"} | dict(
    model="resnet", windows_per_video=2, checkpoint_every=0, specaugment=False
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synthetic import make_synthetic_work

    w = tmp_path_factory.mktemp("floor")
    # 12 train videos x 2 windows = 24 windows -> 3 steps of 8 per epoch
    make_synthetic_work(w, n_classes=3, videos_per_class=4, frames_range=(100, 200), seed=2)
    return w


def _epoch(path: Path) -> int:
    from avfuse.checkpoint import load_checkpoint

    return int(load_checkpoint(path).epoch)


def test_best_checkpoint_only_from_validated_epochs(work: Path) -> None:
    from avfuse.train import TrainConfig, train

    cfg = TrainConfig(
        work, name="every2", epochs=4, eval_every=2, val_split="val", selection="top1", **TINY
    )  # type: ignore[arg-type]
    best = work / "runs" / "every2" / "best.pt"
    seen: dict[int, int | None] = {}

    def look(step: int) -> None:
        # First step of each epoch: what best.pt holds after the epochs before it.
        if step % 3 == 1:
            seen[step // 3 + 1] = _epoch(best) if best.exists() else None

    res = train(cfg, on_step=look)
    assert res is not None
    # Epoch 1 is not validated: no best.pt yet. Epoch 2 is; epoch 3 is not and must not
    # replace it.
    assert seen == {1: None, 2: None, 3: 2, 4: 2}
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    top1 = {m["epoch"]: m["val_top1"] for m in lines if m["val_top1"] is not None}
    assert sorted(top1) == [2, 4]
    expect = 4 if top1[4] > top1[2] else 2
    assert _epoch(best) == expect
    assert res.best_top1 == pytest.approx(max(top1.values()))


def test_best_checkpoint_without_validation_is_the_final_one(work: Path) -> None:
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import TrainConfig, train

    cfg = TrainConfig(work, name="noval", epochs=2, val_split="", **TINY)  # type: ignore[arg-type]
    best = work / "runs" / "noval" / "best.pt"
    existed: list[bool] = []
    train(cfg, on_step=lambda step: existed.append(best.exists()))
    assert existed == [False] * 6  # never written mid-run
    a, b = load_checkpoint(best), load_checkpoint(best.with_name("last.pt"))
    assert a.epoch == b.epoch == 2
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k


def test_resume_refuses_changed_schedule(work: Path) -> None:
    from avfuse.train import StopTraining, TrainConfig, train

    cfg = TrainConfig(work, name="sched", epochs=3, val_split="", **TINY)  # type: ignore[arg-type]

    def stop(step: int) -> None:
        if step == 4:  # after epoch 1's checkpoint
            raise StopTraining

    with pytest.raises(StopTraining):
        train(cfg, on_step=stop)
    last = work / "runs" / "sched" / "last.pt"
    assert _epoch(last) == 1
    before = last.read_bytes()
    for changes, expect in (
        ({"epochs": 5}, ["epochs: 3 -> 5"]),
        ({"batch_size": 4}, ["batch_size: 8 -> 4"]),
        ({"windows_per_video": 3, "epochs": 4}, ["epochs: 3 -> 4", "windows_per_video: 2 -> 3"]),
    ):
        changed = dataclasses.replace(cfg, resume=True, **changes)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="--resume") as err:
            train(changed)
        for text in expect:
            assert text in str(err.value)
        assert last.read_bytes() == before  # the refused run wrote nothing
    # The same settings resume and finish the run.
    res = train(dataclasses.replace(cfg, resume=True))
    assert res is not None and _epoch(last) == 3


# ------------------------------------------------------------------------- process group


def test_stage_functions_leave_no_process_group(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (world size > 1) stages join the group once; it is left at exit."""
    import torch.distributed as dist

    from avfuse import distributed as D
    from avfuse.predict import PredictConfig, predict
    from avfuse.train import StopTraining, TrainConfig, train

    calls: list[str] = []
    state = {"on": False}

    def fake_init(backend: str) -> None:
        calls.append(f"init {backend}")
        state["on"] = True

    def fake_destroy() -> None:
        calls.append("destroy")
        state["on"] = False

    # One process posing as rank 0 of 1: the collectives degrade to local ones.
    monkeypatch.setattr(D, "_initialized", lambda: state["on"])
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr(dist, "destroy_process_group", fake_destroy)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(D, "all_gather_object", lambda obj: [obj])
    monkeypatch.setattr(D, "all_reduce_sum", lambda values, device="cpu": list(values))
    monkeypatch.setattr(D, "broadcast_buffers", lambda module, src=0: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    at_exit: list[Any] = []
    monkeypatch.setattr(D.atexit, "register", at_exit.append)

    cfg = TrainConfig(work, name="pg", epochs=1, val_split="", **TINY)  # type: ignore[arg-type]
    train(cfg)
    # Joined once, and left at process exit: re-joining under torchrun would block.
    assert calls == ["init gloo"] and D.destroy in at_exit
    predict(PredictConfig(work, run="pg", checkpoint="last", amp="off", device="cpu"))
    assert calls == ["init gloo"]  # the next stage reuses the group

    # A failing stage keeps the group for what the script does next.
    def stop(step: int) -> None:
        raise StopTraining

    with pytest.raises(StopTraining):
        train(dataclasses.replace(cfg, name="pg2"), on_step=stop)
    assert calls == ["init gloo"] and state["on"]
    D.destroy()  # what the interpreter runs at exit
    assert calls == ["init gloo", "destroy"] and not state["on"]


# ------------------------------------------------------------------------- run summary


def test_run_summary_without_fusion_names_no_none() -> None:
    from avfuse.run_report import RunResult, StageOutcome

    empty: dict[str, Any] = {"status_counts": {}, "accuracy": {}, "gain": {}}
    report = Path("w/report.md")
    skipped = [StageOutcome("fuse", "not configured")]
    text = RunResult(Path("w"), skipped, report=report, fusion_report=None, **empty).summary()
    assert "None" not in text
    assert "report: w/report.md; fusion: not configured (set fuse.video_scores)" in text
    # Configured but not run this time (e.g. stop_after): nothing said about fusion.
    stopped = [StageOutcome("fuse", "not run")]
    text = RunResult(Path("w"), stopped, report=report, fusion_report=None, **empty).summary()
    assert "None" not in text and "fusion" not in text
    fused = Path("w/fusion/report.md")
    text = RunResult(Path("w"), [], report=report, fusion_report=fused, **empty).summary()
    assert "report: w/report.md (fusion details: w/fusion/report.md)" in text
