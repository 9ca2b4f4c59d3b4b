"""The audio model a run keeps: chosen on the selection split, never on the evaluated one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avfuse import baseline as bl
from avfuse import choice as ch
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.io import read_table, write_table
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, train
from tests.synthetic import make_synthetic_work
from tests.test_train import TINY


def test_rule_is_top1_then_log_likelihood_then_simplest() -> None:
    figs = {
        "network": {"top1": 0.70, "mean_log_likelihood": -0.2},
        "baseline": {"top1": 0.75, "mean_log_likelihood": -0.9},
        "ensemble": {"top1": 0.75, "mean_log_likelihood": -0.5},
    }
    assert ch.pick(figs) == "ensemble"  # tie on top-1: the higher log-likelihood
    figs["ensemble"]["mean_log_likelihood"] = -0.9
    assert ch.pick(figs) == "baseline"  # a full tie: the simpler model
    figs["network"]["top1"] = 0.76
    assert ch.pick(figs) == "network"  # top-1 first, whatever the likelihood
    figs["network"]["top1"] = float("nan")
    assert ch.pick(figs) == "baseline"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ensemble_is_the_weighted_mean_of_tempered_log_probabilities() -> None:
    rng = np.random.default_rng(0)
    pn = _softmax(rng.normal(size=(40, 5)) * 2)
    pb = _softmax(rng.normal(size=(40, 5)))
    ens = ch.Ensemble(weight=0.3, t_network=2.0, t_baseline=0.5)
    ln = np.log(pn) / 2.0
    ln -= np.log(np.exp(ln).sum(1, keepdims=True))
    lb = np.log(pb) / 0.5
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    np.testing.assert_allclose(ens.apply(pn, pb), _softmax(0.3 * ln + 0.7 * lb), atol=1e-5)


def test_ensemble_weight_follows_the_informative_model() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 15)
    informative = _softmax(3.0 * np.eye(4)[y] + rng.normal(size=(60, 4)))
    noise = _softmax(rng.normal(size=(60, 4)))
    assert ch.fit_ensemble(informative, noise, y).weight >= 0.8
    assert ch.fit_ensemble(noise, informative, y).weight <= 0.2
    # out of fold: reproducible, and each row a distribution
    a = ch.cross_validated_ensemble(informative, noise, y)
    np.testing.assert_array_equal(a, ch.cross_validated_ensemble(informative, noise, y))
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("choice")
    make_synthetic_work(
        w, n_classes=4, videos_per_class=6, splits=("train", "heldout", "val"), seed=5
    )
    opts = {**TINY, "model": "resnet"}
    train(TrainConfig(w, name="c", epochs=1, val_split="auto", **opts))  # type: ignore[arg-type]
    return w


def _relabel(work: Path, split: str, new: dict[str, int]) -> None:
    man = read_table(work / "manifest.parquet")
    rows = man["split"] == split
    man.loc[rows, "label_index"] = man.loc[rows, "video_id"].map(new).astype(np.int64)
    man.loc[rows, "label"] = [f"class_{k:02d}" for k in man.loc[rows, "label_index"]]
    write_table(man, work / "manifest.parquet")


def _predict(work: Path, split: str) -> ScoreFile:
    cfg = PredictConfig(work, run="c", split=split, amp="off", device="cpu", model_choice="best")
    res = predict(cfg)
    assert res is not None
    return ScoreFile.load(res.path)


def test_choice_is_made_on_the_selection_split_never_on_val(work: Path) -> None:
    """Labels built so that heldout (the selection split) favours the baseline and val the
    network: the kept model is the baseline's side, and val's labels do not move it."""
    man = read_table(work / "manifest.parquet")
    store = FeatureStore(work / "features")
    tr = man[man["split"] == "train"].sort_values("video_id")
    base = bl.fit_baseline(store, tr["video_id"].tolist(), tr["label_index"].to_numpy(), 4)
    # The network's and the baseline's decisions on heldout and val (network: the candidate
    # file written beside the chosen scores with model_choice = network).
    net = {}
    for split in ("heldout", "val"):
        res = predict(PredictConfig(work, run="c", split=split, amp="off", device="cpu"))
        assert res is not None
        net[split] = dict(zip(res.scores.ids.tolist(), res.scores.scores.argmax(1)))
    held = sorted(net["heldout"])
    base_held = dict(zip(held, base.predict_proba(store, held).argmax(1)))
    agree = np.mean([net["heldout"][v] == base_held[v] for v in held])
    assert agree < 0.9, "the two models must disagree on heldout for the test to mean anything"
    _relabel(work, "heldout", {v: int(k) for v, k in base_held.items()})
    _relabel(work, "val", {v: int(k) for v, k in net["val"].items()})

    sf = _predict(work, "val")
    mc = sf.meta["model_choice"]
    assert mc["selection_split"] == "heldout" and mc["selection_videos"] == len(held)
    assert mc["chosen"] in ("baseline", "ensemble")
    # selection figures against an independent count
    assert mc["figures"]["baseline"]["top1"] == pytest.approx(1.0)
    assert mc["figures"]["network"]["top1"] == pytest.approx(agree)
    # the written scores are the kept candidate's, and every candidate is beside them
    kept = ScoreFile.load(ch.candidate_path(work / "scores" / "audio_val.npz", mc["chosen"]))
    np.testing.assert_array_equal(kept.scores, sf.scores)
    val_ids = sorted(net["val"])
    expect = base.predict_proba(store, val_ids)
    got = ScoreFile.load(ch.candidate_path(work / "scores" / "audio_val.npz", "baseline"))
    np.testing.assert_allclose(got.select(val_ids).scores, expect, atol=1e-6)

    # On val the network is right everywhere: val would have picked it.
    m = evaluate(EvaluateConfig(work, split="val")).metrics
    cands = m["model_choice"]["candidates"]
    assert cands["network"]["top1"] == pytest.approx(1.0) and not cands["network"]["chosen"]
    assert cands[mc["chosen"]]["chosen"]
    assert cands["baseline"]["top1"] < 1.0
    assert m["top1"] == pytest.approx(cands[mc["chosen"]]["top1"])

    # Any other val labels: the very same choice, figures and scores.
    rng = np.random.default_rng(0)
    _relabel(work, "val", {v: int(rng.integers(4)) for v in val_ids})
    again = _predict(work, "val")
    assert again.meta["model_choice"] == mc
    np.testing.assert_array_equal(again.scores, sf.scores)


def test_no_selection_split_keeps_the_network(tmp_path: Path) -> None:
    make_synthetic_work(tmp_path, n_classes=3, videos_per_class=3, seed=3)
    opts = {**TINY, "model": "resnet"}
    train(TrainConfig(tmp_path, name="n", epochs=1, val_split="", **opts))  # type: ignore[arg-type]
    plain = predict(PredictConfig(tmp_path, run="n", amp="off", device="cpu"))
    assert plain is not None
    net = plain.scores.scores.copy()
    res = predict(PredictConfig(tmp_path, run="n", amp="off", device="cpu", model_choice="best"))
    assert res is not None
    assert res.scores.meta["model_choice"]["chosen"] == "network"
    assert "no selection split" in res.scores.meta["model_choice"]["reason"]
    np.testing.assert_array_equal(res.scores.scores, net)


def test_dynamics_statistics_by_hand() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 4))
    got = bl.video_statistics(x, "dynamics")
    t, n = x.shape
    change = [[x[i + 1, b] - x[i, b] for i in range(t - 1)] for b in range(n)]
    c = x - x.mean(0)
    sweep = [
        sum(c[i, b] * c[i + 1, b + 1] - c[i + 1, b] * c[i, b + 1] for i in range(t - 1)) / (t - 1)
        for b in range(n - 1)
    ] + [0.0]
    expect = np.concatenate(
        [
            x.mean(0),
            x.std(0),
            [np.mean(np.abs(c)) for c in change],
            [np.std(c) for c in change],
            sweep,
        ]
    )
    np.testing.assert_allclose(got, expect, atol=1e-12)
    np.testing.assert_allclose(bl.video_statistics(x, "meanstd"), expect[:8], atol=1e-12)
    np.testing.assert_array_equal(bl.video_statistics(x[:1])[8:], 0.0)


def test_sweep_direction_is_what_mean_and_std_cannot_see() -> None:
    t = np.arange(96)
    up = np.zeros((96, 16))
    up[t, (t // 2) % 16] = 1.0  # a ridge climbing one band every two frames
    down = up[:, ::-1].copy()  # the same ridge descending: same per-band mean and std...
    s_up = bl.video_statistics(up)
    s_down = bl.video_statistics(down)
    np.testing.assert_allclose(np.sort(s_up[:32]), np.sort(s_down[:32]))
    # ...but the sweep term has opposite signs
    assert (s_up[64:79] > 0).all() and (s_down[64:79] < 0).all()
