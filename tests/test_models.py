"""The networks: shapes, the released VGGish and PANNs layouts against the reference
implementations, strict --init loading."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from avfuse.checkpoint import load_checkpoint
from avfuse.model_config import MODELS, TrainConfig
from avfuse.models import (
    Cnn10,
    Cnn14,
    PANNsCNN,
    ResNet,
    VGGish,
    build_model,
    fuse_for_inference,
    load_init,
)
from avfuse.predict import PredictConfig, predict
from avfuse.safe_pickle import CorruptCheckpointError
from avfuse.scores import ScoreFile
from avfuse.store import FeatureStore
from avfuse.train import train
from tests.released import finetune_work, randomise, save_released
from tests.test_train import PRETRAINED_TINY

try:
    from panns_inference import models as panns
except ImportError:  # optional: only the tests that need it are skipped
    panns = None

needs_panns = pytest.mark.skipif(panns is None, reason="needs panns_inference.models")


try:
    from torchvggish import torchvggish
except ImportError:  # optional: only the tests that need it are skipped
    torchvggish = None

needs_torchvggish = pytest.mark.skipif(torchvggish is None, reason="needs torchvggish.torchvggish")

# harritaylor/torchvggish layout, written out by hand from the published architecture:
# features = [conv64, relu, pool, conv128, relu, pool, conv256, relu, conv256, relu, pool,
#             conv512, relu, conv512, relu, pool]; embeddings = [fc, relu, fc, relu, fc, relu].
VGGISH_LAYOUT = {
    "features.0.weight": (64, 1, 3, 3),
    "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3),
    "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3),
    "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3),
    "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3),
    "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3),
    "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 512 * 4 * 6),
    "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096),
    "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096),
    "embeddings.4.bias": (128,),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channel_dim", [False, True])
def test_output_shape_small(name: str, channel_dim: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, width=0.125).eval()
    x = torch.randn(3, 1, 96, 64) if channel_dim else torch.randn(3, 96, 64)
    y = model(x)
    assert y.shape == (3, 7) and torch.isfinite(y).all()
    # (B, 96, 64) and (B, 1, 96, 64) are the same input
    assert torch.allclose(model(x.reshape(3, 96, 64)), y, atol=1e-6)


@pytest.mark.parametrize("cls", [ResNet, PANNsCNN])
def test_output_shape_full_width(cls: type) -> None:
    model = cls(num_classes=5).eval()
    assert model(torch.randn(2, 96, 64)).shape == (2, 5)


def test_rejects_bad_input_shape() -> None:
    with pytest.raises(ValueError, match="expected input"):
        ResNet(3, width=0.125)(torch.randn(2, 2, 96, 64))


def test_vggish_backbone_matches_the_torchvggish_layout() -> None:
    with torch.device("meta"):
        model = VGGish(num_classes=10)
    shapes = {k: tuple(v.shape) for k, v in model.backbone_state_dict().items()}
    assert shapes == VGGISH_LAYOUT


def test_vggish_flattens_in_time_freq_channel_order() -> None:
    # The AudioSet weights expect NHWC flattening; check against a manual permutation.
    model = VGGish(num_classes=2, width=0.125).eval()
    x = torch.randn(2, 96, 64)
    feats = model.features(x.unsqueeze(1))  # (B, C, 6, 4)
    flat = torch.stack([feats[b].permute(1, 2, 0).reshape(-1) for b in range(2)])
    assert torch.allclose(model.embed(x), model.embeddings(flat), atol=1e-6)


def test_vggish_load_backbone_strict(tmp_path) -> None:
    torch.manual_seed(1)
    src = VGGish(num_classes=3, width=0.125)
    state = {f"module.{k}": v.clone() for k, v in src.backbone_state_dict().items()}
    state["pproc._pca_matrix"] = torch.zeros(2, 2)  # the port's post-processing buffers
    path = tmp_path / "vggish_random.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    dst = VGGish(num_classes=3, width=0.125)
    head = dst.classifier.weight.clone()
    ignored = load_init(dst, path)
    assert ignored == ["pproc._pca_matrix"]
    for k, v in src.backbone_state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(dst.classifier.weight, head)  # the head keeps its own initialisation

    bad = {k.removeprefix("module."): v for k, v in state.items() if "embeddings.4" not in k}
    bad["features.0.weight"] = torch.zeros(5, 1, 3, 3)
    with pytest.raises(ValueError) as err:
        dst.load_backbone(bad)
    msg = str(err.value)
    assert "missing: embeddings.4.weight" in msg and "missing: embeddings.4.bias" in msg
    assert "shape: features.0.weight" in msg


def test_load_init_other_models_by_name_and_shape(tmp_path) -> None:
    src = ResNet(4, width=0.125)
    path = tmp_path / "r.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = ResNet(6, width=0.125)  # different head: the fc layer is skipped
    ignored = load_init(dst, path)
    assert set(ignored) == {"fc.weight", "fc.bias"}
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    with pytest.raises(ValueError, match="no parameter"):
        torch.save({"x": torch.zeros(1)}, path)
        load_init(dst, path)


def test_ast_refuses_an_architecture_of_another_window() -> None:
    from avfuse.ast_model import base_arch

    with pytest.raises(
        ValueError, match="takes windows of 1024 frames x 128 bands, the run has 96"
    ):
        build_model("ast", 3, n_mels=64, frames=96, arch=base_arch(1024, 128))


def test_init_with_a_nan_weight_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = build_model("resnet", 3, 0.25)
    state = model.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    path = tmp_path / "init.pt"
    torch.save(state, path)
    with pytest.raises(CorruptCheckpointError, match=f"tensor {name} holds NaN") as info:
        load_init(build_model("resnet", 3, 0.25), path)
    assert str(path) in str(info.value)


# ------------------------------------------------------ released layouts against the reference code


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


@needs_panns
def test_cnn14_release_layout_matches_reference(tmp_path: Path, wave10s: torch.Tensor) -> None:
    ref = randomise(_reference_cnn14(), 1).eval()
    path = save_released(ref, tmp_path / "Cnn14_mAP=0.431.pth")
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


@needs_panns
def test_cnn10_release_layout_matches_reference(tmp_path: Path, wave10s: torch.Tensor) -> None:
    ref = randomise(_ReferenceCnn10(), 2).eval()
    front = _reference_cnn14()  # its torchlibrosa front end is the one Cnn10 was trained on
    path = save_released(ref, tmp_path / "Cnn10_mAP=0.380.pth")
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


@needs_panns
def test_strict_init_refuses_other_layouts(tmp_path: Path, caplog: Any) -> None:
    ref10 = randomise(_ReferenceCnn10(), 3)
    path10 = save_released(ref10, tmp_path / "cnn10.pth")
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


@needs_panns
def test_other_class_count_gets_a_new_head(tmp_path: Path, caplog: Any) -> None:
    ref10 = randomise(_ReferenceCnn10(), 4)
    path = save_released(ref10, tmp_path / "cnn10.pth")
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
    with pytest.raises(ValueError, match=r"refusing to load tests\.test_models\._mark"):
        load_init(Cnn10(527), path)
    assert _EXECUTED == []


@needs_torchvggish
def test_vggish_matches_torchvggish(tmp_path: Path) -> None:
    ref = randomise(torchvggish._vgg(postprocess=False), 5).eval()
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


@pytest.mark.parametrize("name", ["vggish", "resnet", "panns", "cnn10", "cnn14"])
def test_every_model_trains_and_predicts_with_80_bands_64_frames(tmp_path: Path, name: str) -> None:
    work = finetune_work(tmp_path, n_mels=80, example_frames=64, frames=(64, 160))
    res = train(TrainConfig(work, model=name, name=name, **PRETRAINED_TINY))
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


def test_build_model_takes_bands_and_frames() -> None:
    m = build_model("vggish", 4, width=0.125, n_mels=80, frames=64)
    assert m(torch.zeros(2, 64, 80)).shape == (2, 4)


def test_folded_batch_norms_give_the_same_embeddings() -> None:
    model = randomise(Cnn14(5, width=0.125), 9).eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.conv_block3.modules())
    x = torch.randn(2, 200, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model.embed(x), fused.embed(x)  # type: ignore[operator]
    scale = float(a.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(b / scale, a / scale, atol=1e-5, rtol=0)
