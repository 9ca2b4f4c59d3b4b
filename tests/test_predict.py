"""Prediction: every video of the split scored, statuses of unusable videos, front-end refusal,
CUDA equal to CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from avfuse.checkpoint import load_checkpoint
from avfuse.io import read_json, read_table, write_json, write_table
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint
from avfuse.store import FeatureStore, FrontendMismatchError, ShardWriter, commit_index
from avfuse.train import TrainConfig, train
from tests.synthetic import make_synthetic_work
from tests.test_train import TINY


class BandMean(nn.Module):
    """Logits = per-band mean over the window times a fixed matrix (easy to recompute)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 96, -1).mean(1) @ self.w


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def predict_work(w: Path) -> Path:
    """A trained tiny ResNet over 3 classes, with three extra val videos: one too short (in the
    store), one without audio, one never featurised."""
    make_synthetic_work(w, n_classes=3, videos_per_class=3, frames_range=(100, 300), seed=2)
    man = read_table(w / "manifest.parquet")
    store = FeatureStore(w / "features")
    index = read_table(w / "features" / "index.parquet")
    sw = ShardWriter(w / "features", n_mels=64, prefix="extra")
    sw.add("val/class_00/short", np.zeros((50, 64), np.float32))
    commit_index(w / "features", index.to_dict("records") + sw.close())
    extra = [("val/class_00/short", 0), ("val/class_01/silent", 1), ("val/class_02/lost", 2)]
    rows = [
        {
            "video_id": v,
            "split": "val",
            "label": f"class_{k:02d}",
            "label_index": k,
            "path": "",
            "size_bytes": 0,
            "scan_status": "found",
        }
        for v, k in extra
    ]
    man = pd.concat([man, pd.DataFrame(rows)], ignore_index=True)
    write_table(man, w / "manifest.parquet")
    ids = man["video_id"].tolist()
    ext = pd.DataFrame({"video_id": ids, "status": ["ok"] * len(ids)})
    ext.loc[ext["video_id"] == "val/class_01/silent", "status"] = "no_audio"
    ext = ext[ext["video_id"] != "val/class_02/lost"]
    write_table(ext, w / "extract.parquet")
    feat = pd.DataFrame({"video_id": ids, "feature_status": ["ok"] * len(ids)})
    feat.loc[feat["video_id"] == "val/class_00/short", "feature_status"] = "too_short"
    feat.loc[feat["video_id"] == "val/class_01/silent", "feature_status"] = "not_extracted"
    write_table(feat, w / "features.parquet")
    assert len(store) == 18
    opts = {**TINY, "model": "resnet"}
    train(TrainConfig(w, name="p", epochs=1, val_split="", **opts))  # type: ignore[arg-type]
    return w


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return predict_work(tmp_path_factory.mktemp("pred"))


def test_predict_writes_every_video_of_the_split(work: Path) -> None:
    res = predict(PredictConfig(work, run="p", checkpoint="last", amp="off", device="cpu"))
    assert res is not None
    sf = ScoreFile.load(work / "scores" / "audio_val.npz")
    man = read_table(work / "manifest.parquet")
    assert sorted(sf.ids.tolist()) == sorted(man.loc[man["split"] == "val", "video_id"])
    st = dict(zip(sf.ids.tolist(), sf.status.tolist()))
    assert st["val/class_00/short"] == "too_short"
    assert st["val/class_01/silent"] == "no_audio"
    assert st["val/class_02/lost"] == "not_in_store"
    bad = ~sf.has_scores
    assert bad.sum() == 3 and np.isnan(sf.scores[bad]).all() and (sf.n_windows[bad] == 0).all()
    good = sf.has_scores
    np.testing.assert_allclose(sf.scores[good].sum(1), 1.0, rtol=1e-5)
    store = FeatureStore(work / "features")
    for vid, n in zip(sf.ids[good], sf.n_windows[good]):
        assert n == store.frames(vid) // 96

    # the score of one video, recomputed from the checkpoint by hand
    model, norm, _ = model_from_checkpoint(load_checkpoint(work / "runs" / "p" / "last.pt"))
    model.eval()
    vid = sf.ids[good][0]
    x = norm.apply(np.asarray(store[vid]))
    wins = torch.from_numpy(np.stack([x[s : s + 96] for s in range(0, len(x) - 95, 96)]))
    with torch.no_grad():
        expect = torch.softmax(model(wins), 1).mean(0).numpy()
    np.testing.assert_allclose(sf.select([vid]).scores[0], expect, rtol=1e-4, atol=1e-6)

    csv = pd.read_csv(res.csv_path)
    assert csv["video_id"].tolist() == sf.ids.tolist()
    np.testing.assert_allclose(csv[sf.classes].to_numpy(), sf.scores, rtol=1e-5)
    assert sf.meta["aggregation"] == "mean_softmax" and sf.meta["split"] == "val"


def test_predict_refuses_other_frontend(work: Path) -> None:
    meta_path = work / "features" / "store.json"
    meta = read_json(meta_path)
    try:
        write_json(meta_path, {**meta, "frontend_hash": "0123456789abcdef"})
        with pytest.raises(FrontendMismatchError, match="0123456789abcdef"):
            predict(PredictConfig(work, run="p", checkpoint="last", amp="off", device="cpu"))
    finally:
        write_json(meta_path, meta)


@pytest.mark.cuda
def test_predict_on_cuda_matches_cpu(work: Path) -> None:
    # cuDNN convolutions in float32 may run in TF32 (10-bit mantissa, ~5e-4 relative per
    # product): probabilities agree to a few 1e-3, not to the 1e-4 of two CPU runs.
    runs = {}
    for device in ("cpu", "cuda"):
        out = work / "scores" / f"on_{device}.npz"
        predict(
            PredictConfig(work, run="p", checkpoint="last", amp="off", device=device, output=out)  # type: ignore[arg-type]
        )
        runs[device] = ScoreFile.load(out)
    a, b = runs["cpu"], runs["cuda"]
    assert a.ids.tolist() == b.ids.tolist() and (a.n_windows == b.n_windows).all()
    good = a.has_scores
    assert (b.has_scores == good).all()
    np.testing.assert_allclose(b.scores[good], a.scores[good], rtol=0, atol=5e-3)
    margin = np.sort(a.scores[good], 1)
    clear = margin[:, -1] - margin[:, -2] > 1e-2
    assert (a.scores[good].argmax(1) == b.scores[good].argmax(1))[clear].all()


def test_predict_outputs_and_finished_settings_follow_the_score_file(tmp_path: Path) -> None:
    import dataclasses

    from avfuse.config import save_config
    from avfuse.model_config import predict_finished_settings, predict_is_done, predict_outputs

    cfg = PredictConfig(work=tmp_path, split="val")
    out = tmp_path / "scores" / "audio_val.npz"
    assert predict_outputs(cfg) == [out]
    assert not predict_is_done(cfg) and predict_finished_settings(cfg) is None
    out.parent.mkdir()
    out.write_bytes(b"scores")
    assert predict_is_done(cfg) and predict_finished_settings(cfg) is None  # no saved settings
    save_config(cfg, tmp_path / "scores" / "audio_val.predict.toml")
    assert predict_finished_settings(cfg) == cfg
    elsewhere = dataclasses.replace(cfg, output=tmp_path / "mine.npz")
    assert predict_outputs(elsewhere) == [tmp_path / "mine.npz"]
    assert not predict_is_done(elsewhere) and predict_finished_settings(elsewhere) is None
