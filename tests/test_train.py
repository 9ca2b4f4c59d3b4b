"""Training: the loop learns, checkpoints round-trip, a killed run resumes to identical weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from avfuse.checkpoint import load_checkpoint
from avfuse.config import load_config, to_dict
from avfuse.data import compute_norm_stats
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.io import read_json, write_json
from avfuse.manifest import load_classes
from avfuse.models import VGGish
from avfuse.predict import PredictConfig, predict
from avfuse.scoring import model_from_checkpoint
from avfuse.store import FeatureStore, FrontendMismatchError
from avfuse.train import TrainConfig, lr_factor, spec_augment, train
from tests.synthetic import make_synthetic_work

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
