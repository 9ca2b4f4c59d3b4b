"""Model shapes, the VGGish checkpoint layout and --init loading."""

from __future__ import annotations

import pytest
import torch

from avfuse.model_config import MODELS
from avfuse.models import PANNsCNN, ResNet, VGGish, build_model, load_init

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
