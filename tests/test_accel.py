"""The one inference placement (device, autocast, memory format) of train, scoring and embed."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from avfuse.accel import (
    Placement,
    resolve_channels_last,
    set_memory_format,
    unsafe_channels_last_convs,
)
from avfuse.model_config import TrainConfig
from avfuse.models import build_model
from tests.test_train import _tiny

SRC = Path(__file__).resolve().parents[1] / "src" / "avfuse"


class _Seen(nn.Module):
    """Records the input it gets; returns a linear map of it (autocast applies to ``linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.fc(x.flatten(2).mean(2).expand(-1, 5))


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_is_one_channel_float32_in_the_models_format(channels_last: bool) -> None:
    x = torch.arange(2 * 4 * 3, dtype=torch.float16).reshape(2, 4, 3)
    place = Placement(torch.device("cpu"), None, channels_last)
    got = place.model_input(x)
    assert got.shape == (2, 1, 4, 3) and got.dtype == torch.float32
    assert torch.equal(got[:, 0], x.float())
    assert got.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


@pytest.mark.parametrize(("amp", "out"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_forward_runs_the_model_under_the_placements_autocast(
    amp: torch.dtype | None, out: torch.dtype
) -> None:
    model = _Seen()
    place = Placement(torch.device("cpu"), amp, channels_last=True)
    y = place.forward(model, place.to_device(torch.ones(2, 4, 3)))
    assert y.dtype == out and y.shape == (2, 3)
    assert model.seen is not None and model.seen.shape == (2, 1, 4, 3)
    assert model.seen.is_contiguous(memory_format=torch.channels_last)
    # Outside forward no autocast is left on.
    assert model(torch.ones(2, 1, 4, 3)).dtype == torch.float32


def test_autocast_and_memory_format_are_spelled_only_in_accel() -> None:
    """Train's step, scoring and embedding run the network through :class:`Placement`: no other
    module opens an autocast region or converts an input's memory format itself."""
    bad = []
    for path in SRC.rglob("*.py"):
        if path.name == "accel.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "autocast":
                bad.append(f"{path.name}:{node.lineno} autocast")
            if isinstance(node, ast.keyword) and node.arg == "memory_format":
                bad.append(f"{path.name}:{node.lineno} memory_format")
    assert not bad, bad


CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
# Trains a thin ResNet at 16 torch threads, first with the default channels_last (auto), then
# forced on: the setup that made oneDNN write past a scratchpad in loss.backward() (the
# process died with SIGABRT/SIGSEGV, or corrupted memory silently).
SIXTEEN_THREADS = """
import sys, torch
torch.set_num_threads(16)
from collections.abc import Callable
from pathlib import Path
from avfuse.checkpoint import load_checkpoint
from avfuse.train import TrainConfig, train
work = Path(sys.argv[1])
for name, cl in (("auto", "auto"), ("forced", "on")):
    train(TrainConfig(work, name=name, model="resnet", width=0.125, batch_size=8, epochs=2,
                      windows_per_video=4, num_workers=0, amp="off", device="cpu",
                      progress=False, min_steps=0, val_split="", channels_last=cl))
    ck = load_checkpoint(work / "runs" / name / "last.pt")
    assert ck.global_step > 0
    assert all(torch.isfinite(v).all() for v in ck.model.values() if v.is_floating_point())
    print(name, ck.config["channels_last"], ck.global_step)
"""


def test_thin_resnet_trains_at_16_threads_without_heap_corruption(tmp_path: Path) -> None:
    from tests.synthetic import make_synthetic_work

    make_synthetic_work(tmp_path, n_classes=2, videos_per_class=3, frames_range=(100, 200))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIXTEEN_THREADS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    # auto chose the contiguous format for this model; forced on ran with the guard
    assert any(ln.startswith("auto off ") for ln in lines), proc.stdout
    assert any(ln.startswith("forced on ") for ln in lines), proc.stdout


def test_unsafe_convolutions_are_the_thin_strided_shortcuts() -> None:
    # ResNet stages at width 0.125: 8, 16, 32, 64 channels; stages 2-4 open with a strided 1x1
    # shortcut over the previous stage's channels: only the one over 8 channels is below 16.
    thin = build_model("resnet", 3, 0.125, 0.0, n_mels=64, frames=96)
    assert unsafe_channels_last_convs(thin) == ["layers.2.down.0"]
    assert unsafe_channels_last_convs(build_model("resnet", 3, 1.0, 0.0)) == []
    # PANNs-style and VGG-style networks have no 1x1 convolutions at all
    for name in ("panns", "vggish", "cnn14"):
        assert unsafe_channels_last_convs(build_model(name, 3, 0.125, 0.0)) == [], name


def test_channels_last_auto_rule() -> None:
    thin = build_model("resnet", 3, 0.125, 0.0)
    wide = build_model("panns", 3, 0.125, 0.0)
    assert resolve_channels_last("auto", CPU, thin) is False
    assert resolve_channels_last("auto", CPU, wide) is True
    assert resolve_channels_last("auto", CUDA, thin) is True
    assert resolve_channels_last("on", CPU, thin) is True
    assert resolve_channels_last("off", CUDA, wide) is False
    assert resolve_channels_last(True, CPU) is True and resolve_channels_last(False, CPU) is False
    with pytest.raises(ValueError, match="channels_last"):
        resolve_channels_last("sometimes", CPU)


def test_guarded_convolutions_run_contiguous_and_compute_the_same() -> None:
    torch.manual_seed(0)
    ref = build_model("resnet", 3, 0.125, 0.0)
    guarded_model = build_model("resnet", 3, 0.125, 0.0)
    guarded_model.load_state_dict(ref.state_dict())
    assert set_memory_format(ref, CPU, False) == []
    assert set_memory_format(guarded_model, CPU, True) == ["layers.2.down.0"]
    seen: list[tuple[bool, tuple[int, ...]]] = []
    conv = dict(guarded_model.named_modules())["layers.2.down.0"]
    assert isinstance(conv, nn.Conv2d)
    conv.register_forward_hook(
        lambda m, a, o: seen.append((a[0].is_contiguous(), tuple(m.weight.stride())))
    )
    other = dict(guarded_model.named_modules())["layers.4.down.0"]  # 32 channels: channels-last
    assert isinstance(other, nn.Conv2d)
    assert other.weight.is_contiguous(memory_format=torch.channels_last)

    x = torch.randn(4, 1, 96, 64)
    grads = []
    for model, xin in ((ref, x), (guarded_model, x.contiguous(memory_format=torch.channels_last))):
        model.train()
        model.zero_grad()
        model(xin).logsumexp(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    cin = conv.weight.shape[1]
    assert seen == [(True, (cin, 1, 1, 1))]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synthetic import make_synthetic_work

    work = tmp_path_factory.mktemp("small")
    make_synthetic_work(work, n_classes=2, videos_per_class=4, frames_range=(100, 200), seed=3)
    return work


def test_batch_size_auto_is_64_on_cpu(small: Path) -> None:
    from avfuse.accel import default_batch_size
    from avfuse.config import load_config

    assert default_batch_size(0, CUDA) == 256 and default_batch_size(12, CUDA) == 12
    from avfuse.train import train

    # 8 train videos x 16 windows = 128 windows: two steps of the automatic 64 per epoch
    train(_tiny(small, "auto_batch", batch_size=0, windows_per_video=16, epochs=1))
    saved = load_config(TrainConfig, small / "runs" / "auto_batch" / "config.toml")
    assert saved.batch_size == 64
    from avfuse.checkpoint import load_checkpoint

    assert load_checkpoint(small / "runs" / "auto_batch" / "last.pt").global_step == 2
