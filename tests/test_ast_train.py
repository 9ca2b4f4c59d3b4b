"""Fine-tuning, scoring and embedding with the ``ast`` model from a tiny model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from avfuse.checkpoint import load_checkpoint
from avfuse.data import pad_window
from avfuse.embed import EmbedConfig, embed
from avfuse.models import build_model, load_init, model_arch
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint
from avfuse.store import FeatureStore
from avfuse.train import TrainConfig, param_groups, resolve_normalize, train
from tests.synthetic import make_synthetic_work
from tests.test_ast_model import save_folder
from tests.test_train import TINY

# The tiny training settings of test_train, at the model's own width.
RUN = {k: v for k, v in TINY.items() if k != "width"} | dict(
    model="ast", batch_size=4, windows_per_video=2, epochs=2, dropout=0.0, channels_last=False
)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    make_synthetic_work(w, n_classes=3, videos_per_class=2, n_mels=128, frames_range=(60, 180))
    return w


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save_folder(tmp_path / "tiny", labels=5, seed=3)


def test_freeze_backbone_fine_tunes_the_new_head_only(work: Path, folder: Path) -> None:
    cfg = TrainConfig(work, init=folder, freeze_backbone=True, **RUN)  # type: ignore[arg-type]
    assert resolve_normalize(cfg) == "none"
    res = train(cfg)
    assert res is not None
    ckpt = load_checkpoint(res.last_path)
    # The window is the checkpoint's max_length, and the architecture travels with the run.
    assert ckpt.window == 100
    assert ckpt.model_spec.arch["hidden_size"] == 64
    src = build_model("ast", 3, n_mels=128, frames=100, arch=model_arch("ast", folder))
    load_init(src, folder)
    for k, v in src.state_dict().items():
        if k.startswith("classifier.dense."):
            assert not torch.equal(ckpt.model[k], v), k
        else:
            assert torch.equal(ckpt.model[k], v), k

    # predict rebuilds the model from the checkpoint alone and scores 100-frame windows.
    out = predict(PredictConfig(work, checkpoint="last", split="val", device="cpu", amp="off"))
    assert out is not None
    sf = ScoreFile.load(out.path)
    model, norm, _ = model_from_checkpoint(ckpt)
    model.eval()
    store = FeatureStore(work / "features")
    vid = str(sf.ids[0])
    x = norm.apply(np.asarray(store[vid], np.float32))
    if len(x) < 100:
        wins = pad_window(x, 100, "repeat", 0.0)[None]
    else:
        wins = np.stack([x[s : s + 100] for s in range(0, len(x) - 99, 100)])
    with torch.no_grad():
        expect = torch.softmax(model(torch.from_numpy(wins)), 1).mean(0).numpy()
    np.testing.assert_allclose(sf.scores[0], expect, atol=1e-5)


def test_layer_decay_and_backbone_mult_rates(folder: Path) -> None:
    model = build_model("ast", 3, n_mels=128, frames=100, arch=model_arch("ast", folder))
    groups = param_groups(model, 0.05, lr=1e-3, backbone_lr_mult=0.5, layer_decay=0.8)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(rate) == len(list(model.parameters()))
    # 2 layers: depth 0 embeddings, 1-2 layers, 3 final norm; head at lr.
    expect = {
        "classifier.dense.weight": 1e-3,
        "classifier.layernorm.weight": 1e-3 * 0.5,
        "audio_spectrogram_transformer.layernorm.weight": 1e-3 * 0.5,
        "audio_spectrogram_transformer.layers.1.attention.q_proj.weight": 1e-3 * 0.5 * 0.8,
        "audio_spectrogram_transformer.layers.0.mlp.fc2.bias": 1e-3 * 0.5 * 0.8**2,
        "audio_spectrogram_transformer.embeddings.cls_token": 1e-3 * 0.5 * 0.8**3,
    }
    params = dict(model.named_parameters())
    for name, lr in expect.items():
        assert rate[id(params[name])] == pytest.approx(lr), name


def test_gradient_checkpointing_gives_the_same_gradients(folder: Path) -> None:
    arch = model_arch("ast", folder)
    x = torch.randn(2, 1, 100, 128, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = build_model("ast", 3, dropout=0.0, n_mels=128, frames=100, arch=arch)
        load_init(model, folder)
        torch.manual_seed(0)
        model.classifier.dense.reset_parameters()
        if ckpt:
            model.enable_gradient_checkpointing()  # type: ignore[operator]
            layers = model.audio_spectrogram_transformer.layers
            assert all(getattr(m, "gradient_checkpointing", False) for m in layers)
        model.train()
        model(x).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_option_trains(work: Path, folder: Path) -> None:
    res = train(TrainConfig(work, init=folder, grad_checkpointing=True, **RUN))  # type: ignore[arg-type]
    assert res is not None
    assert load_checkpoint(res.last_path).config["grad_checkpointing"] is True
    with pytest.raises(ValueError, match="no gradient checkpointing"):
        train(TrainConfig(work, name="cnn", **{**RUN, "model": "cnn10"}, grad_checkpointing=True))  # type: ignore[arg-type]


def test_embed_ast_then_head(work: Path, folder: Path) -> None:
    ecfg = EmbedConfig(
        work,
        model="ast",
        init=folder,
        device="cpu",
        amp="off",
        channels_last=False,
        progress=False,
    )
    res = embed(ecfg)
    assert res.dim == 64
    store = FeatureStore(work / "features")
    emb = FeatureStore(work / "embeddings" / "ast")
    # Clips shorter than the 100-frame window are embedded from a padded window, not dropped.
    assert any(store.frames(v) < 100 for v in store.ids)
    assert set(emb.ids) == set(store.ids) and res.embedded == len(store)
    ref = build_model("ast", 5, n_mels=128, frames=100, arch=model_arch("ast", folder))
    load_init(ref, folder)
    ref.eval()
    for vid in emb.ids:
        x = np.asarray(store[vid], np.float32)
        if len(x) < 100:
            wins = pad_window(x, 100, "repeat", 0.0)[None]
        else:
            wins = np.stack([x[s : s + 100] for s in range(0, len(x) - 99, 100)])
        with torch.no_grad():
            want = ref.audio_spectrogram_transformer(
                input_values=torch.from_numpy(wins)
            ).pooler_output.numpy()
        np.testing.assert_allclose(np.asarray(emb[vid]), want, atol=1e-4, rtol=0)

    out = train(
        TrainConfig(
            work,
            name="head",
            from_embeddings="ast",
            **{**RUN, "model": "resnet", "epochs": 2},  # type: ignore[arg-type]
        )
    )
    assert out is not None
    assert load_checkpoint(out.last_path).model_spec.n_mels == 64
