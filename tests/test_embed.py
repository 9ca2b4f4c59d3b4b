"""Frozen embeddings of a pretrained network and the head trained on them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from avfuse.checkpoint import load_checkpoint
from avfuse.embed import EmbedConfig, embed
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.models import Cnn10
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint
from avfuse.store import CorruptStoreError, EmbeddingSpec, FeatureStore, store_problem
from avfuse.train import TrainConfig, train
from tests.released import cnn10_weights, finetune_work, randomise, save_released
from tests.test_train import PRETRAINED_TINY
from tests.workfolders import copy_work, store_rows, truncate


def test_truncated_embedding_shard_names_embed_and_a_plain_rerun_repairs_it(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path
) -> None:
    work0, cfg0 = embedded
    work = copy_work(work0, tmp_path)
    cfg = EmbedConfig(**{**cfg0.__dict__, "work": work})
    root = work / "embeddings" / "cnn10"
    before = store_rows(FeatureStore(root))
    shards = sorted((root / "shards").iterdir())
    assert len(shards) > 1
    truncate(shards[0])
    with pytest.raises(CorruptStoreError, match="run `avfuse embed` again") as info:
        FeatureStore(root)
    assert str(shards[0]) in str(info.value)
    assert "avfuse embed" in store_problem(root)

    res = embed(cfg)  # plain rerun
    in_bad = len(
        pd.read_parquet(work0 / "embeddings" / "cnn10" / "index.parquet").query(
            "shard == @shards[0].name"
        )
    )
    assert res.embedded == in_bad > 0 and res.skipped == len(before) - in_bad
    after = store_rows(FeatureStore(root))
    assert after.keys() == before.keys()
    for v in before:
        np.testing.assert_allclose(after[v], before[v], rtol=1e-6, atol=1e-6)


def test_embed_force_redoes_everything_and_replaces_other_settings(
    embedded: tuple[Path, EmbedConfig], tmp_path: Path
) -> None:
    work0, cfg0 = embedded
    work = copy_work(work0, tmp_path)
    root = work / "embeddings" / "cnn10"
    before = store_rows(FeatureStore(root))
    other = cnn10_weights(9, tmp_path / "o.pth")
    cfg = EmbedConfig(**{**cfg0.__dict__, "work": work, "init": other})
    with pytest.raises(ValueError, match="pass --force"):
        embed(cfg)
    res = embed(EmbedConfig(**{**cfg.__dict__, "force": True}))
    assert res.embedded == len(before) and res.skipped == 0
    after = store_rows(FeatureStore(root))
    assert after.keys() == before.keys()
    assert not all(np.allclose(after[v], before[v]) for v in before)  # other weights


def test_embed_then_head_end_to_end(tmp_path: Path) -> None:
    work = finetune_work(tmp_path, n_mels=64, example_frames=96, frames=(96, 300))
    src = randomise(Cnn10(3, width=0.125), 8).eval()
    init = save_released(src, tmp_path / "init.pth")
    ecfg = EmbedConfig(
        work,
        model="cnn10",
        init=init,
        width=0.125,
        device="cpu",
        amp="off",
        channels_last="off",
        progress=False,
        chunk_videos=4,
    )
    res = embed(ecfg)
    store = FeatureStore(work / "features")
    emb = FeatureStore(work / "embeddings" / "cnn10")
    assert res.embedded == len(store) and emb.frontend == EmbeddingSpec(
        model="cnn10",
        dim=64,  # width 0.125 of 512
        init_sha256=hashlib.sha256(init.read_bytes()).hexdigest(),
        window=96,
        hop=96,
        per_window=True,
        source_frontend_hash=store.frontend_hash,
        width=0.125,
    )
    vid = emb.ids[0]
    x = np.asarray(store[vid], np.float32)
    starts = range(0, len(x) - 95, 96)
    with torch.no_grad():
        expect = src.embed(torch.from_numpy(np.stack([x[s : s + 96] for s in starts])))
    assert emb.frames(vid) == len(starts)
    tol = 1e-4 * float(expect.abs().max())  # batch norms are folded for inference
    np.testing.assert_allclose(np.asarray(emb[vid]), expect.numpy(), atol=tol, rtol=0)

    # Resume: a rerun skips everything; a lost chunk is recomputed to the same rows.
    again = embed(ecfg)
    assert again.embedded == 0 and again.skipped == len(store)
    index = emb.root / "index.parquet"
    import pandas as pd

    df = pd.read_parquet(index)
    df[df["video_id"] != vid].to_parquet(index)
    third = embed(ecfg)
    assert third.embedded == 1
    np.testing.assert_allclose(np.asarray(FeatureStore(emb.root)[vid]), expect.numpy(), atol=1e-5)

    opts = {
        **PRETRAINED_TINY,
        "epochs": 3,
        "model": "resnet",
    }  # a head: the network is the embeddings'
    tcfg = TrainConfig(work, name="head", from_embeddings="cnn10", **opts)
    out = train(tcfg)
    assert out is not None
    ckpt = load_checkpoint(out.best_path)
    assert ckpt.embeddings == "cnn10" and ckpt.model_spec.name == "linear"
    pred = predict(PredictConfig(work, run="head", split="val", device="cpu", amp="off"))
    assert pred is not None
    sf = ScoreFile.load(pred.path)
    head, norm, _ = model_from_checkpoint(ckpt)
    head.eval()
    z = np.asarray(FeatureStore(emb.root)[str(sf.ids[0])], np.float32)
    with torch.no_grad():
        p = torch.softmax(head(torch.from_numpy(norm.apply(z))), 1).mean(0).numpy()
    np.testing.assert_allclose(sf.scores[0], p, atol=1e-5)
    assert (sf.status == "ok").all()
    ev = evaluate(EvaluateConfig(work, scores=pred.path))
    assert 0.0 <= ev.metrics["top1"] <= 1.0
