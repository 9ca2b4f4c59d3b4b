"""Pretrained AudioSet networks: exact loading of the released layouts, equivalence with the
reference implementations (PyPI ``panns_inference``, ``torchlibrosa``, ``torchvggish``, used
here only as oracles), strict init, windows from the front end, fine-tuning options and the
frozen-embedding path end to end."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from avfuse.checkpoint import load_checkpoint
from avfuse.data import NormStats
from avfuse.embed import EmbedConfig, embed
from avfuse.evaluate import EvaluateConfig, evaluate
from avfuse.models import Cnn10, Cnn14, VGGish, build_model, fuse_for_inference, load_init
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint
from avfuse.store import EmbeddingSpec, FeatureStore
from avfuse.train import TrainConfig, param_groups, resolve_normalize, train
from tests.synthetic import make_synthetic_work
from tests.test_train import TINY as TRAIN_TINY

panns = pytest.importorskip("panns_inference.models")
torchvggish = pytest.importorskip("torchvggish.torchvggish")

# The shared tiny settings (tests.test_train) without a model.
# min_steps 0 (as in test_train): these tests check loading, shapes and plumbing, which one
# epoch shows; the 300-step floor of small datasets made each run ~5 s.
TINY: dict[str, Any] = {k: v for k, v in TRAIN_TINY.items() if k != "model"} | dict(
    windows_per_video=2, channels_last="off", epochs=1
)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and random batch-norm statistics (a checkpoint, not an initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith(("bn0.weight", "bn1.weight", "bn2.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "extractor" in name:
                continue  # the fixed STFT / mel matrices of the waveform front end
            else:
                fan_in = t[0].numel() if t.dim() > 1 else t.numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model


def _save_released(model: nn.Module, path: Path) -> Path:
    """The layout of the audioset_tagging_cnn release: model, sampler (numpy RandomState)."""
    rs = np.random.RandomState(1234)
    sampler = {"indexes_per_class": [np.arange(5), np.arange(3)], "random_state": rs}
    torch.save({"model": model.state_dict(), "sampler": sampler, "iteration": 600000}, path)
    return path


def _reference_cnn14() -> nn.Module:
    return panns.Cnn14(
        sample_rate=32000,
        window_size=1024,
        hop_size=320,
        mel_bins=64,
        fmin=50,
        fmax=14000,
        classes_num=527,
    )


class _ReferenceCnn10(nn.Module):
    """Cnn10 of the release, assembled from the reference package's own ``ConvBlock`` (the
    package ships Cnn14 only); the forward pass follows the published code line by line."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(64)
        self.conv_block1 = panns.ConvBlock(1, 64)
        self.conv_block2 = panns.ConvBlock(64, 128)
        self.conv_block3 = panns.ConvBlock(128, 256)
        self.conv_block4 = panns.ConvBlock(256, 512)
        self.fc1 = nn.Linear(512, 512, bias=True)
        self.fc_audioset = nn.Linear(512, 527, bias=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x, pool_size=(2, 2), pool_type="avg")
        x = torch.mean(x, dim=3)
        (x1, _) = torch.max(x, dim=2)
        x = x1 + torch.mean(x, dim=2)
        x = F.relu_(self.fc1(x))
        return {"clipwise_output": torch.sigmoid(self.fc_audioset(x)), "embedding": x}


@pytest.fixture(scope="module")
def wave10s() -> torch.Tensor:
    rng = np.random.default_rng(0)
    t = np.arange(32000 * 10) / 32000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
    x += 0.05 * rng.standard_normal(len(t))
    return torch.from_numpy(x.astype(np.float32))[None]


def test_cnn14_release_layout_matches_reference(tmp_path: Path, wave10s: torch.Tensor) -> None:
    ref = _randomise(_reference_cnn14(), 1).eval()
    path = _save_released(ref, tmp_path / "Cnn14_mAP=0.431.pth")
    ours = Cnn14(527, n_mels=64, frames=1001).eval()
    ignored = load_init(ours, path)
    # Only the waveform front end of the release stays behind, and it is listed.
    assert ignored and all(k.startswith(("spectrogram_", "logmel_")) for k in ignored)
    with torch.no_grad():
        expect = ref(wave10s)
        logmel = ref.logmel_extractor(ref.spectrogram_extractor(wave10s))  # (1, 1, 1001, 64)
        emb = ours.embed(logmel[:, 0])
        clip = torch.sigmoid(ours(logmel))
    assert logmel.shape == (1, 1, 1001, 64)
    assert emb.shape == (1, 2048)
    scale = float(expect["embedding"].abs().max())
    assert scale > 1e-3  # the comparison must not be between two vectors of zeros
    torch.testing.assert_close(emb / scale, expect["embedding"] / scale, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip, expect["clipwise_output"], atol=1e-4, rtol=0)


def test_cnn10_release_layout_matches_reference(tmp_path: Path, wave10s: torch.Tensor) -> None:
    ref = _randomise(_ReferenceCnn10(), 2).eval()
    front = _reference_cnn14()  # its torchlibrosa front end is the one Cnn10 was trained on
    path = _save_released(ref, tmp_path / "Cnn10_mAP=0.380.pth")
    ours = Cnn10(527).eval()
    assert load_init(ours, path) == []
    with torch.no_grad():
        logmel = front.logmel_extractor(front.spectrogram_extractor(wave10s))
        expect = ref(logmel)
        emb = ours.embed(logmel)
        clip = torch.sigmoid(ours(logmel[:, 0]))
    scale = float(expect["embedding"].abs().max())
    assert emb.shape == (1, 512) and scale > 1e-3
    torch.testing.assert_close(emb / scale, expect["embedding"] / scale, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip, expect["clipwise_output"], atol=1e-4, rtol=0)


def test_strict_init_refuses_other_layouts(tmp_path: Path, caplog: Any) -> None:
    ref10 = _randomise(_ReferenceCnn10(), 3)
    path10 = _save_released(ref10, tmp_path / "cnn10.pth")
    with pytest.raises(ValueError) as err:
        load_init(Cnn14(527), path10)
    msg = str(err.value)
    assert "missing: conv_block5.conv1.weight" in msg
    assert "missing: conv_block6.bn2.running_var" in msg
    assert "shape: fc1.weight checkpoint (512, 512) vs model (2048, 2048)" in msg

    # Only the head fits: refused, with or without --init-partial.
    head_only = tmp_path / "head.pth"
    torch.save(
        {"model": {k: v for k, v in ref10.state_dict().items() if "fc_audioset" in k}}, head_only
    )
    for partial in (False, True):
        with pytest.raises(ValueError, match="no parameter matches"):
            load_init(Cnn10(527), head_only, partial=partial)

    # --init-partial loads what matches (the first four blocks and bn0), and says what not.
    model = Cnn14(527)
    with caplog.at_level(logging.WARNING):
        load_init(model, path10, partial=True)
    assert "partial load" in caplog.text
    for k, v in ref10.state_dict().items():
        if k.startswith(("conv_block1.", "conv_block4.", "bn0.")):
            assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.fc_audioset.weight[:, :512], ref10.fc_audioset.weight)


def test_other_class_count_gets_a_new_head(tmp_path: Path, caplog: Any) -> None:
    ref10 = _randomise(_ReferenceCnn10(), 4)
    path = _save_released(ref10, tmp_path / "cnn10.pth")
    torch.manual_seed(0)
    model = Cnn10(10)
    before = model.fc_audioset.weight.clone()
    with caplog.at_level(logging.INFO, logger="avfuse.models"):
        ignored = load_init(model, path)
    assert set(ignored) == {"fc_audioset.weight", "fc_audioset.bias"}
    assert "new head" in caplog.text
    assert torch.equal(model.fc_audioset.weight, before)
    assert torch.equal(model.conv_block3.conv2.weight, ref10.conv_block3.conv2.weight)


_EXECUTED: list[str] = []


def _mark() -> str:
    _EXECUTED.append("ran")
    return "ran"


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_mark, ())


def test_safe_loader_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "sampler": _Evil()}, path)
    with pytest.raises(ValueError, match=r"refusing to load tests\.test_pretrained\._mark"):
        load_init(Cnn10(527), path)
    assert _EXECUTED == []


def test_vggish_matches_torchvggish(tmp_path: Path) -> None:
    ref = _randomise(torchvggish._vgg(postprocess=False), 5).eval()
    path = tmp_path / "vggish-10086976.pth"
    torch.save(ref.state_dict(), path)
    ours = VGGish(num_classes=3).eval()
    assert load_init(ours, path) == []
    x = torch.randn(4, 1, 96, 64, generator=torch.Generator().manual_seed(0)) * 2 - 3
    with torch.no_grad():
        expect = ref(x)
        got = ours.embed(x[:, 0])
    scale = float(expect.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(got / scale, expect / scale, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- train / predict


def _work(tmp: Path, n_mels: int, example_frames: int, frames: tuple[int, int]) -> Path:
    make_synthetic_work(
        tmp,
        n_classes=3,
        videos_per_class=3,
        n_mels=n_mels,
        example_frames=example_frames,
        frames_range=frames,
    )
    return tmp


def _released_small(model: nn.Module, tmp: Path, seed: int) -> Path:
    return _save_released(_randomise(model, seed), tmp / "init.pth")


@pytest.mark.parametrize("name", ["vggish", "resnet", "panns", "cnn10", "cnn14"])
def test_every_model_trains_and_predicts_with_80_bands_64_frames(tmp_path: Path, name: str) -> None:
    work = _work(tmp_path, n_mels=80, example_frames=64, frames=(64, 160))
    res = train(TrainConfig(work, model=name, name=name, **TINY))
    assert res is not None
    ckpt = load_checkpoint(res.last_path)
    assert ckpt.window == 64
    assert ckpt.model_spec.n_mels == 80 and ckpt.model_spec.frames == 64
    out = predict(PredictConfig(work, run=name, split="val", device="cpu", amp="off"))
    assert out is not None
    sf = ScoreFile.load(out.path)
    store = FeatureStore(work / "features")
    for vid, n, st in zip(sf.ids, sf.n_windows, sf.status, strict=True):
        t = store.frames(str(vid))
        assert st == "ok" and n == 1 + (t - 64) // 64, (vid, t, n)
    assert np.allclose(sf.scores.sum(1), 1.0, atol=1e-5)


def test_vggish_init_sees_unstandardised_inputs(tmp_path: Path) -> None:
    work = _work(tmp_path, n_mels=64, example_frames=96, frames=(96, 200))
    init = _released_small(VGGish(3, width=0.125), tmp_path, 6)
    cfg = TrainConfig(work, model="vggish", init=init, **{**TINY, "epochs": 1})
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
    work = _work(tmp_path, n_mels=64, example_frames=96, frames=(96, 200))
    src = _randomise(Cnn10(3, width=0.125), 7)
    init = _save_released(src, tmp_path / "init.pth")
    res = train(TrainConfig(work, model="cnn10", init=init, freeze_backbone=True, **TINY))
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


# --------------------------------------------------------------------------- embeddings


def test_embed_then_head_end_to_end(tmp_path: Path) -> None:
    work = _work(tmp_path, n_mels=64, example_frames=96, frames=(96, 300))
    src = _randomise(Cnn10(3, width=0.125), 8).eval()
    init = _save_released(src, tmp_path / "init.pth")
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

    opts = {**TINY, "epochs": 3, "model": "resnet"}  # a head: the network is the embeddings'
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


def test_identity_norm_is_exact() -> None:
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float16)
    assert np.array_equal(NormStats.identity(5).apply(x), x.astype(np.float32))


def test_build_model_takes_bands_and_frames() -> None:
    m = build_model("vggish", 4, width=0.125, n_mels=80, frames=64)
    assert m(torch.zeros(2, 64, 80)).shape == (2, 4)


def test_folded_batch_norms_give_the_same_embeddings() -> None:
    model = _randomise(Cnn14(5, width=0.125), 9).eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.conv_block3.modules())
    x = torch.randn(2, 200, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model.embed(x), fused.embed(x)  # type: ignore[operator]
    scale = float(a.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(b / scale, a / scale, atol=1e-5, rtol=0)


def test_whole_clip_scoring_is_one_window_per_video(tmp_path: Path) -> None:
    work = _work(tmp_path, n_mels=64, example_frames=96, frames=(96, 250))
    res = train(TrainConfig(work, model="cnn10", **TINY))
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
