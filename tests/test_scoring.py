"""Window scoring and per-video aggregation, checkpoint specs checked before a network is built,
and the scored statuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from avfuse.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from avfuse.data import NormStats
from avfuse.models import build_model
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint, score_videos
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, train
from tests.checkpoints import make_checkpoint
from tests.released import finetune_work
from tests.test_predict import BandMean, _softmax, predict_work
from tests.test_train import PRETRAINED_TINY, _work_with_a_nan_video


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return predict_work(tmp_path_factory.mktemp("pred"))


@pytest.mark.parametrize("aggregation", ["mean_softmax", "mean_logits", "max"])
def test_score_videos_aggregates_windows_per_video(work: Path, aggregation: str) -> None:
    store = FeatureStore(work / "features")
    ids = ["val/class_02/v001", "train/class_00/v000", "val/class_00/v002"]
    torch.manual_seed(0)
    model = BandMean(torch.randn(64, 3))
    norm = NormStats(np.full(64, -4.0, np.float32), np.full(64, 2.0, np.float32))
    out = score_videos(
        model,
        store,
        ids,
        norm,
        hop=48,
        window=96,
        batch_size=5,
        aggregation=aggregation,
        progress=False,
    )  # type: ignore[arg-type]
    w = model.w.detach().numpy().astype(np.float64)
    for vid in ids:
        x = (np.asarray(store[vid], np.float64) + 4.0) / 2.0
        starts = range(0, len(x) - 96 + 1, 48)
        logits = np.stack([x[s : s + 96].mean(0) @ w for s in starts])
        expect = {
            "mean_softmax": _softmax(logits).mean(0),
            "mean_logits": _softmax(logits.mean(0)),
            "max": _softmax(logits).max(0),
        }[aggregation]
        scores, n = out[vid]
        assert n == len(starts)
        np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-6)


def test_nan_features_never_give_ok_scores(tmp_path: Path) -> None:
    work = tmp_path / "w"
    vid = _work_with_a_nan_video(work, "val")
    model = build_model("resnet", 2, 0.25, 0.0, n_mels=64, frames=96)
    ckpt = make_checkpoint(
        model=model.state_dict(),
        spec=ModelSpec("resnet", 0.25, 0.0, 64, 96),
        classes=("class_00", "class_01"),
        norm=NormStats(np.full(64, -4.0, np.float32), np.ones(64, np.float32)),
        frontend_hash=FeatureStore(work / "features").frontend_hash,
    )
    path = tmp_path / "c.pt"
    save_checkpoint(path, ckpt)
    res = predict(PredictConfig(work, checkpoint=str(path), amp="off", device="cpu"))
    assert res is not None
    sf = ScoreFile.load(res.path)
    st = dict(zip(sf.ids.tolist(), sf.status.tolist(), strict=True))
    assert st[vid] == "non_finite"
    assert np.isnan(sf.select([vid]).scores).all()
    others = sf.has_scores
    assert others.sum() == len(sf.ids) - 1
    assert np.isfinite(sf.scores[others]).all()
    np.testing.assert_allclose(sf.scores[others].sum(1), 1.0, rtol=1e-5)


def test_a_spec_describing_a_network_larger_than_its_weights_is_refused_unbuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from avfuse import scoring

    small = build_model("resnet", 2, 0.25, 0.0, n_mels=64, frames=96)
    spec = ModelSpec("resnet", 16.0, 0.0, 64, 96)
    ckpt = make_checkpoint(model=small.state_dict(), spec=spec)
    built: list[bool] = []
    real = scoring.build_model

    def counting(*a: Any, **k: Any) -> Any:
        built.append(torch.empty(0).device.type != "meta")
        return real(*a, **k)

    monkeypatch.setattr(scoring, "build_model", counting)
    with pytest.raises(ValueError, match=r"describes a network of .* bytes, its weights hold"):
        scoring.model_from_checkpoint(ckpt)
    assert built == [False]  # only the meta-device probe was built
    spec_ok = dataclasses.replace(spec, width=0.25)
    model, _, _ = scoring.model_from_checkpoint(dataclasses.replace(ckpt, model_spec=spec_ok))
    assert built == [False, False, True]
    assert torch.equal(model.state_dict()["fc.weight"], small.state_dict()["fc.weight"])


def test_whole_clip_scoring_is_one_window_per_video(tmp_path: Path) -> None:
    work = finetune_work(tmp_path, n_mels=64, example_frames=96, frames=(96, 250))
    res = train(TrainConfig(work, model="cnn10", **PRETRAINED_TINY))
    assert res is not None
    model, norm, _ = model_from_checkpoint(load_checkpoint(res.last_path))
    model.eval()
    out = predict(
        PredictConfig(work, split="val", window=-1, checkpoint="last", device="cpu", amp="off")
    )
    assert out is not None
    sf = out.scores
    assert (sf.n_windows == 1).all() and sf.meta["window"] == -1
    store = FeatureStore(work / "features")
    vid = str(sf.ids[-1])
    x = torch.from_numpy(norm.apply(np.asarray(store[vid])))[None]
    with torch.no_grad():
        expect = torch.softmax(model(x), 1)[0].numpy()
    np.testing.assert_allclose(sf.scores[-1], expect, atol=1e-5)
