"""Training: the loop learns, checkpoints round-trip, a killed run resumes to identical weights;
epoch selection, the carve-out, fine-tuning options and device settings."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from avfuse import cli
from avfuse.checkpoint import load_checkpoint
from avfuse.config import load_config, to_dict
from avfuse.data import compute_norm_stats
from avfuse.embed import EmbedConfig
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.io import read_json, write_json, write_table
from avfuse.manifest import load_classes
from avfuse.models import Cnn10, VGGish
from avfuse.predict import PredictConfig, predict
from avfuse.scoring import model_from_checkpoint
from avfuse.store import FeatureStore, FrontendMismatchError, ShardWriter, commit_index
from avfuse.train import (
    TrainConfig,
    carve_selection,
    fit_schedule,
    lr_factor,
    param_groups,
    resolve_normalize,
    spec_augment,
    train,
)
from tests.commands import error_line, stderr_line
from tests.released import finetune_work, randomise, save_released
from tests.synthetic import make_synthetic_work
from tests.workfolders import copy_work

TINY = dict(
    model="panns",
    width=0.125,
    batch_size=8,
    windows_per_video=4,
    num_workers=0,
    amp="off",
    device="cpu",
    progress=False,
    deterministic=True,
    min_steps=0,
)


@pytest.fixture(scope="module")
def easy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("easy")
    make_synthetic_work(
        work, n_classes=4, videos_per_class=4, frames_range=(100, 200), structured=False, seed=0
    )
    return work


def test_lr_schedule_warmup_then_cosine() -> None:
    total, warm = 100, 10
    assert [lr_factor(s, total, warm) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    for s in (10, 35, 60, 99):
        expect = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert lr_factor(s, total, warm) == pytest.approx(expect)
    assert lr_factor(100, total, warm) == pytest.approx(0.0)


def test_spec_augment_masks_are_stripes() -> None:
    rng = np.random.default_rng(0)
    x = torch.ones(64, 96, 64)
    y = spec_augment(x, rng, time_mask=16, freq_mask=8, num_masks=1)
    for b in range(64):
        zero = y[b] == 0
        rows = zero.all(dim=1)  # fully masked frames
        cols = zero.all(dim=0)  # fully masked bands
        # every zero lies in a masked frame or band, and each mask is one contiguous stripe
        assert torch.equal(zero, rows[:, None] | cols[None, :])
        for m, limit in ((rows, 16), (cols, 8)):
            idx = torch.nonzero(m).flatten()
            assert len(idx) <= limit
            if len(idx):
                assert idx[-1] - idx[0] + 1 == len(idx)
    assert (y == 0).any()


def test_overfits_tiny_dataset(easy: Path) -> None:
    cfg = TrainConfig(
        easy,
        name="overfit",
        epochs=8,
        lr=3e-3,
        base_batch_size=8,
        specaugment=False,
        label_smoothing=0.0,
        dropout=0.0,
        val_split="",
        warmup_epochs=0.5,
        **TINY,  # type: ignore[arg-type]
    )
    res = train(cfg)
    assert res is not None and res.last_metrics["loss"] < 0.1
    out = predict(
        PredictConfig(
            easy,
            run="overfit",
            checkpoint="last",
            split="train",
            amp="off",
            device="cpu",
            output=easy / "scores" / "overfit_train.npz",
        )
    )
    assert out is not None
    ev = evaluate(EvaluateConfig(easy, scores=out.path))
    assert ev.metrics["top1"] == 1.0 and ev.metrics["n"] == 16


def test_run_folder_and_checkpoint_round_trip(easy: Path) -> None:
    # two persistent DataLoader workers reading the memory-mapped shards
    opts = {**TINY, "num_workers": 2}
    # selection="top1": best.pt is the first epoch with the highest top-1, recomputed below
    cfg = TrainConfig(
        easy, name="rt", epochs=3, lr=3e-3, eval_every=1, val_split="val", selection="top1", **opts
    )  # type: ignore[arg-type]
    res = train(cfg)
    assert res is not None
    run = easy / "runs" / "rt"
    saved = load_config(TrainConfig, run / "config.toml")
    # panns has no convolution the channels-last guard covers: auto = on
    assert saved == dataclasses.replace(cfg, device="cpu", amp="off", channels_last="on")

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert {"loss", "train_acc", "val_top1", "val_top5", "lr", "samples_per_s"} <= set(m)
        assert 0 <= m["val_top1"] <= m["val_top5"] <= 1 and m["samples_per_s"] > 0

    best = load_checkpoint(run / "best.pt")
    last = load_checkpoint(run / "last.pt")
    store = FeatureStore(easy / "features")
    assert list(best.classes) == load_classes(easy) == store.classes
    assert best.frontend_hash == store.frontend_hash and best.frontend == store.frontend
    train_ids = sorted(v for v in store.ids if v.startswith("train/"))
    ref = compute_norm_stats(store, train_ids)
    np.testing.assert_allclose(best.norm.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(best.norm.std, ref.std, rtol=1e-6)
    assert best.config == to_dict(saved)
    assert (
        last.epoch == 3 and last.step_in_epoch == 0 and last.global_step == 3 * 8
    )  # 16 videos x 4 windows / 8
    top = max(lines, key=lambda m: m["val_top1"])  # first epoch reaching the best
    assert best.epoch == top["epoch"] and best.best_top1 == pytest.approx(top["val_top1"])
    assert last.resumable and last.scheduler["last_epoch"] == last.global_step
    assert len(last.optimizer["state"]) == len(list(model_from_checkpoint(last)[0].parameters()))
    assert len(last.rng) == 1 and set(last.rng[0]) >= {"python", "numpy", "torch", "aug"}

    # The reloaded model scores val exactly as training's validation did for that epoch.
    model, _, _ = model_from_checkpoint(best)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.model.items())
    out = predict(
        PredictConfig(
            easy,
            run="rt",
            checkpoint="best",
            amp="off",
            device="cpu",
            output=easy / "scores" / "rt_val.npz",
        )
    )
    assert out is not None
    ev = evaluate(EvaluateConfig(easy, scores=out.path))
    assert ev.metrics["top1"] == pytest.approx(top["val_top1"])
    assert ev.metrics["top5"] == pytest.approx(top["val_top5"])

    # TensorBoard events hold one scalar per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/loss")] == [1, 2, 3]


RESUME = dict(
    epochs=2,
    lr=2e-3,
    mixup_alpha=0.4,
    dropout=0.2,
    label_smoothing=0.1,
    specaugment=True,
    checkpoint_every=5,  # 8 steps/epoch: mid-epoch checkpoints at steps 5 and 10 (epoch 2)
    val_split="val",  # the kill falls between two validations: the selector resumes too
    **TINY,
)

KILLER = """
import os, signal, sys
from pathlib import Path
from avfuse.train import TrainConfig, train
cfg = TrainConfig(Path(sys.argv[1]), name="resume", **{RESUME!r})
def kill(step):
    if step == 13:  # after the step-10 checkpoint, before the epoch ends
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, on_step=kill)
"""


RUNNER = """
import sys
from pathlib import Path
from avfuse.train import TrainConfig, train
train(TrainConfig(Path(sys.argv[1]), name=sys.argv[2], resume=sys.argv[3] == "1", **{RESUME!r}))
"""


def _train_in_fresh_process(work: Path, name: str, resume: bool) -> None:
    # Every run in its own interpreter, as a user resumes: CPU kernels may pick other thread
    # splits (and so other float summation orders) in a process whose thread pools other
    # tests have resized.
    script = textwrap.dedent(RUNNER).replace("{RESUME!r}", repr(RESUME))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(work), name, "1" if resume else "0"],
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_killed_run_resumes_to_identical_weights(easy: Path) -> None:
    _train_in_fresh_process(easy, "straight", resume=False)
    script = textwrap.dedent(KILLER).replace("{RESUME!r}", repr(RESUME))
    proc = subprocess.run([sys.executable, "-c", script, str(easy)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    mid = load_checkpoint(easy / "runs" / "resume" / "last.pt")
    assert (mid.epoch, mid.step_in_epoch, mid.global_step) == (1, 2, 10)

    _train_in_fresh_process(easy, "resume", resume=True)
    a = load_checkpoint(easy / "runs" / "straight" / "last.pt")
    b = load_checkpoint(easy / "runs" / "resume" / "last.pt")
    assert a.global_step == b.global_step == 16
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    lines = (easy / "runs" / "resume" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    # The same epoch kept for the same reason, from the same selection figures.
    assert a.selector == b.selector and a.selector["kept_epoch"] in (1, 2)
    ba = load_checkpoint(easy / "runs" / "straight" / "best.pt")
    bb = load_checkpoint(easy / "runs" / "resume" / "best.pt")
    assert ba.epoch == bb.epoch == a.selector["kept_epoch"]
    assert all(torch.equal(v, bb.model[k]) for k, v in ba.model.items())
    straight = (easy / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()
    keys = ("val_top1", "val_loglik", "best_epoch", "best_reason", "selection_saturated")
    for x, y in zip(straight, lines, strict=True):
        assert [json.loads(x)[k] for k in keys] == [json.loads(y)[k] for k in keys]


def test_resume_refuses_other_model_or_frontend(easy: Path, tmp_path: Path) -> None:
    import shutil

    work = tmp_path / "w"
    shutil.copytree(easy, work, ignore=shutil.ignore_patterns("runs", "scores"))
    train(TrainConfig(work, name="fe", epochs=1, val_split="", **TINY))  # type: ignore[arg-type]
    wider = {**TINY, "width": 0.25}
    with pytest.raises(ValueError, match="holds model"):
        train(TrainConfig(work, name="fe", epochs=2, resume=True, val_split="", **wider))  # type: ignore[arg-type]
    meta = read_json(work / "features" / "store.json")
    meta["frontend_hash"] = "different"
    write_json(work / "features" / "store.json", meta)
    with pytest.raises(FrontendMismatchError, match="different"):
        train(TrainConfig(work, name="fe", epochs=2, resume=True, val_split="", **TINY))  # type: ignore[arg-type]


def test_init_from_vggish_state_dict(easy: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    src = VGGish(num_classes=1, width=0.125)
    path = tmp_path / "vggish.pth"
    torch.save(src.backbone_state_dict(), path)
    # a frozen backbone is never stepped: after one epoch it is exactly the initialisation
    # (lr 0 did this before learning rates had to be positive)
    opts = {**TINY, "model": "vggish", "freeze_backbone": True}
    cfg = TrainConfig(easy, name="init", epochs=1, init=path, val_split="", **opts)  # type: ignore[arg-type]
    train(cfg)
    ck = load_checkpoint(easy / "runs" / "init" / "last.pt")
    for k, v in src.backbone_state_dict().items():
        assert torch.equal(ck.model[k], v), k


# ------------------------------------------------------------------------- model selection


def _kept(rule: str, n: int, classes: int, history: list[tuple[float, float, float]]) -> int:
    from avfuse.train import EpochSelector

    sel = EpochSelector(rule, n, classes)
    for epoch, (top1, ll, se) in enumerate(history, start=1):
        sel.update(epoch, top1, ll, se)
    return sel.kept_epoch


def test_selector_prefers_the_later_epoch_within_noise() -> None:
    # 100 videos: one standard error of 70 % top-1 is sqrt(0.7 * 0.3 / 100) = 4.6 points.
    history = [(0.50, -1.2, 0.05), (0.70, -0.80, 0.05), (0.68, -0.70, 0.05), (0.60, -0.75, 0.05)]
    assert _kept("top1", 100, 4, history) == 2
    assert _kept("auto", 100, 4, history) == 3  # 68 % >= 70 - 4.6 and the best log-likelihood
    assert _kept("last", 100, 4, history) == 4
    # Tied top-1 but a log-likelihood more than one standard error under the best: not kept.
    tied = [(0.70, -0.60, 0.05), (0.70, -0.80, 0.05)]
    assert _kept("auto", 100, 4, tied) == 1
    # 65.3 % is just outside the 4.6-point band: not kept although its log-likelihood is best.
    assert _kept("auto", 150, 4, [(0.70, -0.8, 0.05), (0.653, -0.5, 0.05)]) == 1


def test_selector_falls_back_to_the_last_epoch_when_the_split_cannot_rank() -> None:
    # 40 videos over 4 classes saturate at epoch 2: every later validated epoch is kept, even
    # one that misses a video; top1 stays at the first epoch that reached 100 %.
    saturating = [(0.8, -0.9, 0.1), (1.0, -0.5, 0.05), (0.975, -0.6, 0.05), (1.0, -0.3, 0.02)]
    assert _kept("top1", 40, 4, saturating) == 2
    assert _kept("auto", 40, 4, saturating) == 4
    # 11 videos over 4 classes (under 3 a class): the last epoch from the start.
    early_peak = [(0.9, -0.4, 0.1), (0.6, -0.9, 0.1)]
    assert _kept("auto", 11, 4, early_peak) == 2
    assert _kept("auto", 12, 4, early_peak) == 1


def _val_loglik(scores: Path, work: Path) -> float:
    from avfuse.manifest import load_manifest
    from avfuse.scores import ScoreFile

    sf = ScoreFile.load(scores)
    man = load_manifest(work).set_index("video_id")
    labels = man.loc[[str(v) for v in sf.ids], "label_index"].to_numpy()
    true = sf.scores[np.arange(len(labels)), labels]
    return float(np.log(np.clip(true, 1e-7, 1)).mean())


def test_early_saturated_carve_out_keeps_the_later_better_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "sat"
    make_synthetic_work(
        work, n_classes=2, videos_per_class=10, frames_range=(100, 160), structured=False, seed=4
    )
    # carve 30 %: 3 of each class's 10 train videos, 6 in all (3 a class: not too few to rank)
    cfg = TrainConfig(
        work,
        name="sat",
        epochs=6,
        lr=3e-3,
        base_batch_size=8,
        warmup_epochs=0.5,
        specaugment=False,
        carve_fraction=0.3,
        **TINY,  # type: ignore[arg-type]
    )
    run = work / "runs" / "sat"
    held: dict[int, int] = {}

    def look(step: int) -> None:
        # First step of each epoch: copy best.pt as it stood after the epochs before it.
        if (run / "best.pt").exists() and step % steps == 1:
            epoch = int(load_checkpoint(run / "best.pt").epoch)
            if epoch not in held:
                held[epoch] = step
                (run / f"held{epoch}.pt").write_bytes((run / "best.pt").read_bytes())

    steps = 14 * 4 // 8  # 14 train videos x 4 windows / batch 8
    with caplog.at_level(logging.INFO, logger="avfuse"):
        res = train(cfg, on_step=look)
    assert res is not None
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["selection_n"] for m in lines} == {6} and res.selection_n == 6
    saturated = [m["epoch"] for m in lines if m["val_top1"] == 1.0]
    assert saturated and saturated[0] < 6, [m["val_top1"] for m in lines]  # saturates early
    first = saturated[0]
    assert res.saturated_at == first
    assert [m["selection_saturated"] for m in lines] == [m["epoch"] >= first for m in lines]
    # Kept: the last epoch, and every record says so from the saturation on.
    assert int(load_checkpoint(run / "best.pt").epoch) == res.best_epoch == 6
    assert all(m["best_epoch"] == m["epoch"] for m in lines if m["epoch"] >= first)
    assert "saturated" in res.best_reason and "saturated" in res.summary()
    # The console says it: the split's size, the saturation, the epoch kept and why.
    log = caplog.text
    assert "selection split: 6 videos, 3.0 per class; rule auto" in log
    assert f"train carve-out saturated at epoch {first} (top-1 100%)" in log
    assert f"best.pt = epoch 6: {res.best_reason}" in log
    # And the run report, from metrics.jsonl alone.
    from avfuse.run_report import _selection_details

    text = _selection_details(run / "metrics.jsonl")
    assert f"It has 6 videos and saturated (top-1 100 %) at epoch {first}." in text
    assert f"`best.pt` holds epoch 6: {res.best_reason}." in text
    # The epoch the first-best rule keeps (the saturation epoch, held while later epochs ran)
    # scores the evaluated split worse than the epoch kept.
    assert first in held
    out = {}
    for tag, ck in (("early", run / f"held{first}.pt"), ("kept", run / "best.pt")):
        p = predict(
            PredictConfig(
                work, run="sat", checkpoint=str(ck), amp="off", device="cpu", progress=False,
                output=work / "scores" / f"{tag}.npz",
            )
        )  # fmt: skip
        assert p is not None
        out[tag] = _val_loglik(p.path, work)
    assert -out["kept"] < 0.7 * -out["early"], out  # negative log-likelihoods


def test_training_is_finished_only_when_its_metrics_reach_the_last_epoch(tmp_path: Path) -> None:
    """What ``avfuse run`` asks when ``pipeline.json`` is lost: a run cut short is not done."""
    from avfuse.config import save_config
    from avfuse.model_config import (
        train_finished_settings,
        train_is_done,
        train_outputs,
        train_resumable,
    )
    from avfuse.workdir import WorkDir

    cfg = TrainConfig(work=tmp_path, name="r", epochs=3)
    wd = WorkDir(tmp_path)
    assert train_outputs(cfg) == [tmp_path / "runs" / "r" / "best.pt"]
    assert not train_is_done(cfg) and train_finished_settings(cfg) is None
    wd.checkpoint("r").parent.mkdir(parents=True)
    wd.checkpoint("r").write_bytes(b"a checkpoint")
    save_config(cfg, wd.run_config("r"))
    wd.run_metrics("r").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2)))
    assert train_is_done(cfg) and train_finished_settings(cfg) is None  # stopped at epoch 2
    with wd.run_metrics("r").open("a") as fh:
        fh.write(json.dumps({"epoch": 3}) + "\n")
    assert train_finished_settings(cfg) == cfg
    assert train_finished_settings(dataclasses.replace(cfg, epochs=4)) is None
    assert not train_resumable(cfg)  # best.pt alone: nothing to resume from
    wd.checkpoint("r", "last").write_bytes(b"the last epoch")
    assert train_resumable(cfg)


# ------------------------------------------------------------------------------ non-finite features


def _work_with_a_nan_video(work: Path, split: str) -> str:
    """A generated work folder plus one video of ``split`` whose features hold a NaN."""
    man = make_synthetic_work(work, n_classes=2, videos_per_class=3, frames_range=(100, 200))
    vid = f"{split}/class_01/nan"
    x = np.full((150, 64), -4.0, np.float32)
    x[70, 5] = np.nan
    sw = ShardWriter(work / "features", n_mels=64, prefix="extra")
    sw.add(vid, x)
    index = pd.read_parquet(work / "features" / "index.parquet")
    commit_index(work / "features", index.to_dict("records") + sw.close())
    row = man.iloc[[-1]].assign(video_id=vid, split=split, label="class_01", label_index=1)
    write_table(pd.concat([man, row], ignore_index=True), work / "manifest.parquet")
    return vid


def test_training_on_nan_features_stops_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "w"
    _work_with_a_nan_video(work, "train")
    args = ["train", str(work), "--model", "resnet", "--width", "0.125", "--epochs", "2"]
    args += ["--device", "cpu", "--amp", "off", "--num-workers", "0", "--no-progress"]
    args += ["--set", "min_steps=1", "--set", "batch_size=4"]
    assert cli.main(args) == 2
    line = stderr_line(capsys)
    assert "training stopped" in line and "loss nan" in line and "NaN or infinite features" in line
    assert not (work / "runs" / "audio" / "best.pt").exists()


# ----------------------------------------------------------------- heads on embeddings, a full disk


def test_from_embeddings_refuses_settings_it_would_ignore_and_records_none(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work0, _ = embedded
    work = copy_work(work0, tmp_path)
    for extra in (["--model", "cnn14"], ["--window", "64"]):
        rc = cli.main(["train", str(work), "--from-embeddings", "cnn10", *extra])
        assert rc == 2
        line = error_line(capsys)
        assert f"--{extra[0][2:]} {extra[1]} would be ignored" in line
    opts = {k: v for k, v in TINY.items() if k != "model"}
    out = train(TrainConfig(work, name="head", from_embeddings="cnn10", **{**opts, "epochs": 1}))
    assert out is not None
    saved = tomllib.loads((work / "runs" / "head" / "config.toml").read_text("utf-8"))
    assert saved["from_embeddings"] == "cnn10" and "model" not in saved and "window" not in saved


def test_full_disk_while_saving_a_checkpoint_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = finetune_work(tmp_path / "w", n_mels=64, example_frames=96, frames=(96, 300))

    def full(obj: object, f: object, *a: object, **k: object) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 1536 vs 1472"
        )

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))  # type: ignore[attr-defined]
    args = ["train", str(work), "--model", "resnet", "--width", "0.125", "--epochs", "1"]
    args += ["--device", "cpu", "--amp", "off", "--num-workers", "0", "--no-progress"]
    args += ["--set", "min_steps=1", "--set", "batch_size=4"]
    assert cli.main(args) == 2
    line = error_line(capsys)
    assert "no space left on the device holding" in line and str(work / "runs" / "audio") in line
    assert "inline_container" in line  # what torch said, kept as the detail


# ----------------------------------------------------------------- the carve-out and small datasets


# The shared tiny settings (tests.test_train), at the default windows per video.
TWO_EPOCHS = {
    k: v for k, v in TINY.items() if k not in ("deterministic", "windows_per_video")
} | dict(epochs=2)


def test_carve_out_is_stratified_seeded_and_never_overlaps_val(tmp_path: Path) -> None:
    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=3, videos_per_class=10, frames_range=(100, 150))
    res = train(TrainConfig(work, name="c", **TWO_EPOCHS))  # type: ignore[arg-type]
    assert res is not None and res.selection_split == "train carve-out"
    ck = load_checkpoint(work / "runs" / "c" / "best.pt")
    carved = set(ck.selection_videos)
    train_ids = set(man.loc[man["split"] == "train", "video_id"])
    val_ids = set(man.loc[man["split"] == "val", "video_id"])
    assert carved <= train_ids and not carved & val_ids
    per_class = pd.Series([v.split("/")[1] for v in carved]).value_counts()
    assert per_class.to_dict() == {"class_00": 1, "class_01": 1, "class_02": 1}
    assert ck.config["val_split"] == "carve"
    ids = sorted(train_ids)
    labels = np.array([int(v.split("/")[1][-2:]) for v in ids])
    again, _ = carve_selection(ids, labels, 0.1, 0)
    assert {v for v, h in zip(ids, again) if h} == carved
    lines = [
        json.loads(x) for x in (work / "runs" / "c" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {m["selection_split"] for m in lines} == {"train carve-out"}
    assert 'val_split = "carve"' in (work / "runs" / "c" / "config.toml").read_text()
    # The carved videos were not trained on: the band statistics exclude them.
    store = FeatureStore(work / "features")
    kept = [v for v in ids if v not in carved]
    frames = np.concatenate([np.asarray(store[v], np.float64) for v in kept])
    np.testing.assert_allclose(ck.norm.mean, frames.mean(0), rtol=1e-4, atol=1e-4)


def test_small_dataset_trains_with_a_clamped_batch(tmp_path: Path) -> None:
    # 2 classes x 3 videos, 1 window each: 6 windows per epoch, a batch of 64 must still train.
    work = tmp_path / "w"
    make_synthetic_work(work, n_classes=2, videos_per_class=3, frames_range=(100, 120))
    cfg = {**TWO_EPOCHS, "batch_size": 64, "windows_per_video": 1}
    res = train(TrainConfig(work, name="s", val_split="", **cfg))  # type: ignore[arg-type]
    assert res is not None
    ck = load_checkpoint(work / "runs" / "s" / "last.pt")
    assert ck.batch_size_used == 6 and ck.global_step == 2  # one step per epoch
    assert fit_schedule(1, 6, 64, 2, 0, 1) == (1, 6)
    # min_steps: more windows per video, the batch kept, at least min_steps steps.
    wpv, batch = fit_schedule(4, 28, 64, 30, 300, 1)
    assert batch == 64 and 30 * (28 * wpv // 64) >= 300


def test_one_video_per_class_trains(tmp_path: Path) -> None:
    work = tmp_path / "w"
    make_synthetic_work(work, n_classes=2, videos_per_class=1, splits=("train",))
    cfg = {**TWO_EPOCHS, "batch_size": 64, "windows_per_video": 1, "epochs": 1}
    res = train(TrainConfig(work, name="one", **cfg))  # type: ignore[arg-type]
    assert res is not None and res.selection_split == ""  # nothing to carve from
    ck = load_checkpoint(work / "runs" / "one" / "last.pt")
    assert ck.batch_size_used == 2 and ck.global_step == 1


# ---------------------------------------------------------------------------------- device settings


@pytest.mark.cuda
def test_train_steps_on_cuda(tmp_path: Path) -> None:
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import train
    from tests.synthetic import make_synthetic_work

    make_synthetic_work(tmp_path, n_classes=2, videos_per_class=3, frames_range=(100, 200))
    res = train(
        TrainConfig(
            tmp_path,
            name="gpu",
            model="resnet",
            width=0.25,
            epochs=2,
            batch_size=8,
            num_workers=0,
            device="cuda",
            progress=False,
            min_steps=0,
            val_split="",
        )
    )
    assert res is not None
    ck = load_checkpoint(tmp_path / "runs" / "gpu" / "last.pt")
    assert ck.config["device"] == "cuda" and ck.config["channels_last"] == "on"
    assert ck.global_step > 0
    weights = [v for v in ck.model.values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)


def _tiny(work: Path, name: str, **kw: object) -> TrainConfig:
    opts: dict[str, object] = dict(
        model="panns",
        width=0.125,
        batch_size=8,
        epochs=2,
        windows_per_video=4,
        num_workers=0,
        amp="off",
        device="cpu",
        progress=False,
        min_steps=0,
        val_split="",
        deterministic=True,
        checkpoint_every=0,
    )
    return TrainConfig(work, name=name, **{**opts, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synthetic import make_synthetic_work

    work = tmp_path_factory.mktemp("small")
    make_synthetic_work(work, n_classes=2, videos_per_class=4, frames_range=(100, 200), seed=3)
    return work


def test_data_wait_share_is_the_loader_part_of_the_epoch(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import types

    import avfuse.train as T

    # A clock that only moves when a batch is read (3 units) or a step is taken (1 unit).
    clock = [0.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class SlowData(T.WindowDataset):
        def __getitems__(self, items):  # type: ignore[no-untyped-def]
            clock[0] += 3.0
            return super().__getitems__(items)

    step = T._Run.step

    def timed_step(self, x, y):  # type: ignore[no-untyped-def]
        clock[0] += 1.0
        return step(self, x, y)

    monkeypatch.setattr(T, "WindowDataset", SlowData)
    monkeypatch.setattr(T._Run, "step", timed_step)
    T.train(_tiny(small, "wait"))
    lines = [
        json.loads(x) for x in (small / "runs" / "wait" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert m["data_wait_share"] == pytest.approx(0.75)


def test_normalising_on_the_device_trains_the_same_weights(small: Path) -> None:
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import train

    for name, where in (("host", "off"), ("dev", "on")):
        train(_tiny(small, name, device_normalize=where))
    a = load_checkpoint(small / "runs" / "host" / "last.pt").model
    b = load_checkpoint(small / "runs" / "dev" / "last.pt").model
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, msg=k)


def test_the_fused_optimizer_takes_the_same_step(small: Path) -> None:
    # One step (8 windows, batch 8): AdamW turns last-bit differences of near-zero gradients
    # into steps of +-lr, so only the first step can be compared, at any thread count.
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import train

    for name, where in (("unfused", "off"), ("fused", "on")):
        train(_tiny(small, name, fused_optimizer=where, epochs=1, windows_per_video=1))
    a = load_checkpoint(small / "runs" / "unfused" / "last.pt")
    b = load_checkpoint(small / "runs" / "fused" / "last.pt")
    assert a.global_step == b.global_step == 1
    for k, v in a.model.items():
        torch.testing.assert_close(b.model[k], v, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------ best.pt from validated epochs, resume rules


# The shared tiny settings (tests.test_train), with the schedule these tests count steps of.
SCHEDULE_TINY = {k: v for k, v in TINY.items() if k != "deterministic"} | dict(
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
        work,
        name="every2",
        epochs=4,
        eval_every=2,
        val_split="val",
        selection="top1",
        **SCHEDULE_TINY,
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

    cfg = TrainConfig(work, name="noval", epochs=2, val_split="", **SCHEDULE_TINY)  # type: ignore[arg-type]
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

    cfg = TrainConfig(work, name="sched", epochs=3, val_split="", **SCHEDULE_TINY)  # type: ignore[arg-type]

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


# ------------------------------------------------------------------ fine-tuning pretrained networks


# The shared tiny settings (tests.test_train) without a model.
# min_steps 0 (as in test_train): these tests check loading, shapes and plumbing, which one
# epoch shows; the 300-step floor of small datasets made each run ~5 s.
PRETRAINED_TINY: dict[str, Any] = {k: v for k, v in TINY.items() if k != "model"} | dict(
    windows_per_video=2, channels_last="off", epochs=1
)


def _released_small(model: nn.Module, tmp: Path, seed: int) -> Path:
    return save_released(randomise(model, seed), tmp / "init.pth")


def test_vggish_init_sees_unstandardised_inputs(tmp_path: Path) -> None:
    work = finetune_work(tmp_path, n_mels=64, example_frames=96, frames=(96, 200))
    init = _released_small(VGGish(3, width=0.125), tmp_path, 6)
    cfg = TrainConfig(work, model="vggish", init=init, **{**PRETRAINED_TINY, "epochs": 1})
    assert resolve_normalize(cfg) == "none"
    assert resolve_normalize(TrainConfig(work, model="vggish")) == "band"
    assert (
        resolve_normalize(TrainConfig(work, model="vggish", init=init, normalize="band")) == "band"
    )
    res = train(cfg)
    assert res is not None
    model, norm, _ = model_from_checkpoint(load_checkpoint(res.last_path))
    model.eval()
    # Scores must be those of the network on the store's raw log-mel windows.
    out = predict(
        PredictConfig(work, run="audio", checkpoint="last", split="val", device="cpu", amp="off")
    )
    assert out is not None
    store = FeatureStore(work / "features")
    vid = str(out.scores.ids[0])
    x = np.asarray(store[vid], np.float32)
    wins = np.stack([x[s : s + 96] for s in range(0, len(x) - 95, 96)])
    with torch.no_grad():
        expect = torch.softmax(model(torch.from_numpy(wins)), 1).mean(0).numpy()
    assert np.allclose(out.scores.scores[0], expect, atol=1e-5)
    assert np.array_equal(norm.apply(x), x)


def test_freeze_backbone_trains_only_the_head(tmp_path: Path) -> None:
    work = finetune_work(tmp_path, n_mels=64, example_frames=96, frames=(96, 200))
    src = randomise(Cnn10(3, width=0.125), 7)
    init = save_released(src, tmp_path / "init.pth")
    res = train(
        TrainConfig(work, model="cnn10", init=init, freeze_backbone=True, **PRETRAINED_TINY)
    )
    assert res is not None
    after = load_checkpoint(res.last_path).model
    for k, v in src.state_dict().items():
        if k.startswith("fc_audioset"):
            assert not torch.equal(after[k], v), k
        else:  # weights and batch-norm statistics alike
            assert torch.equal(after[k], v), k


def test_backbone_lr_mult_sets_group_rates() -> None:
    model = Cnn10(5, width=0.125)
    groups = param_groups(model, 0.05, lr=1e-3, backbone_lr_mult=0.1)
    head = {id(p) for p in model.fc_audioset.parameters()}
    seen = 0
    for g in groups:
        for p in g["params"]:
            seen += 1
            assert g["lr"] == pytest.approx(1e-3 if id(p) in head else 1e-4)
    assert seen == len(list(model.parameters()))
