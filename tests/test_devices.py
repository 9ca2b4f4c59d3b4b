"""Where training runs: many torch threads on CPU (channels-last safety), devices, GPU tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from avfuse.accel import resolve_channels_last, set_memory_format, unsafe_channels_last_convs
from avfuse.config import from_dict, load_config
from avfuse.model_config import EmbedConfig, TrainConfig
from avfuse.models import build_model

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


def test_boolean_channels_last_of_old_configs_still_loads(tmp_path: Path) -> None:
    assert from_dict(TrainConfig, {"work": "w", "channels_last": True}).channels_last == "on"
    assert from_dict(TrainConfig, {"work": "w", "channels_last": False}).channels_last == "off"
    path = tmp_path / "embed.toml"
    path.write_text('work = "w"\nchannels_last = false\n', "utf-8")
    assert load_config(EmbedConfig, path).channels_last == "off"
    assert TrainConfig(Path("w")).channels_last == "auto"
    with pytest.raises(ValueError, match="channels_last"):
        from_dict(TrainConfig, {"work": "w", "channels_last": "maybe"})


@pytest.mark.cuda
def test_train_steps_on_cuda(tmp_path: Path) -> None:
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import train
    from tests.synthetic import make_synthetic_work

    make_synthetic_work(tmp_path, n_classes=2, videos_per_class=3, frames_range=(100, 200))
    res = train(
        TrainConfig(
            tmp_path,
            name="gpu",
            model="resnet",
            width=0.25,
            epochs=2,
            batch_size=8,
            num_workers=0,
            device="cuda",
            progress=False,
            min_steps=0,
            val_split="",
        )
    )
    assert res is not None
    ck = load_checkpoint(tmp_path / "runs" / "gpu" / "last.pt")
    assert ck.config["device"] == "cuda" and ck.config["channels_last"] == "on"
    assert ck.global_step > 0
    weights = [v for v in ck.model.values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)


# ------------------------------------------------------------------------- devices under torchrun


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[object]]:
    """``fake_gpus(count, local_rank, world_size)``: a host with ``count`` GPUs as seen by a
    torchrun rank; returns the list that records ``set_device`` and the group's backend."""
    from avfuse import distributed as D

    calls: list[object] = []

    def setup(count: int, local_rank: int, world_size: int = 1) -> list[object]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
        monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
        monkeypatch.setattr(
            D.dist, "init_process_group", lambda backend: calls.append(f"group:{backend}")
        )
        monkeypatch.setattr(D.atexit, "register", lambda f: None)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.delenv(D.SHARE_GPUS_ENV, raising=False)
        return calls

    return setup


def test_each_local_rank_binds_its_own_gpu_everywhere(
    fake_gpus: Callable[..., list[object]],
) -> None:
    from avfuse import distributed as D

    calls = fake_gpus(count=2, local_rank=1, world_size=2)
    assert D.resolve_device("cuda") == torch.device("cuda", 1)
    assert D.resolve_device("auto") == torch.device("cuda", 1)
    D.init(D.resolve_device("auto"))
    assert calls == [torch.device("cuda", 1), "group:nccl"]
    calls.clear()
    D.init("cuda")  # a bare type resolves by the same rule
    assert calls[0] == torch.device("cuda", 1)


def test_fewer_gpus_than_local_ranks_is_refused(fake_gpus: Callable[..., list[object]]) -> None:
    from avfuse import distributed as D

    calls = fake_gpus(count=1, local_rank=1, world_size=2)
    with pytest.raises(RuntimeError, match=r"local rank 1 .* 1 GPU"):
        D.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="nproc_per_node=1"):
        D.init("cuda")
    assert calls == []  # nothing bound, no group joined


def test_sharing_gpus_on_purpose_is_logged(
    fake_gpus: Callable[..., list[object]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from avfuse import distributed as D

    calls = fake_gpus(count=1, local_rank=1, world_size=2)
    monkeypatch.setenv(D.SHARE_GPUS_ENV, "1")
    with caplog.at_level("WARNING"):
        assert D.resolve_device("cuda") == torch.device("cuda", 0)
    assert "shares cuda:0" in caplog.text
    D.init(D.resolve_device("cuda"))
    # NCCL refuses two ranks on one GPU: a shared GPU runs the group on gloo
    assert calls == [torch.device("cuda", 0), "group:gloo"]


# ------------------------------------------------------------------------- throughput settings


def _tiny(work: Path, name: str, **kw: object) -> TrainConfig:
    opts: dict[str, object] = dict(
        model="panns",
        width=0.125,
        batch_size=8,
        epochs=2,
        windows_per_video=4,
        num_workers=0,
        amp="off",
        device="cpu",
        progress=False,
        min_steps=0,
        val_split="",
        deterministic=True,
        checkpoint_every=0,
    )
    return TrainConfig(work, name=name, **{**opts, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synthetic import make_synthetic_work

    work = tmp_path_factory.mktemp("small")
    make_synthetic_work(work, n_classes=2, videos_per_class=4, frames_range=(100, 200), seed=3)
    return work


def test_data_wait_share_is_the_loader_part_of_the_epoch(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import types

    import avfuse.train as T

    # A clock that only moves when a batch is read (3 units) or a step is taken (1 unit).
    clock = [0.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class SlowData(T.WindowDataset):
        def __getitems__(self, items):  # type: ignore[no-untyped-def]
            clock[0] += 3.0
            return super().__getitems__(items)

    step = T._Run.step

    def timed_step(self, x, y):  # type: ignore[no-untyped-def]
        clock[0] += 1.0
        return step(self, x, y)

    monkeypatch.setattr(T, "WindowDataset", SlowData)
    monkeypatch.setattr(T._Run, "step", timed_step)
    T.train(_tiny(small, "wait"))
    lines = [
        json.loads(x) for x in (small / "runs" / "wait" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert m["data_wait_share"] == pytest.approx(0.75)


def test_normalising_on_the_device_trains_the_same_weights(small: Path) -> None:
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import train

    for name, where in (("host", "off"), ("dev", "on")):
        train(_tiny(small, name, device_normalize=where))
    a = load_checkpoint(small / "runs" / "host" / "last.pt").model
    b = load_checkpoint(small / "runs" / "dev" / "last.pt").model
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, msg=k)


def test_the_fused_optimizer_takes_the_same_step(small: Path) -> None:
    # One step (8 windows, batch 8): AdamW turns last-bit differences of near-zero gradients
    # into steps of +-lr, so only the first step can be compared, at any thread count.
    from avfuse.checkpoint import load_checkpoint
    from avfuse.train import train

    for name, where in (("unfused", "off"), ("fused", "on")):
        train(_tiny(small, name, fused_optimizer=where, epochs=1, windows_per_video=1))
    a = load_checkpoint(small / "runs" / "unfused" / "last.pt")
    b = load_checkpoint(small / "runs" / "fused" / "last.pt")
    assert a.global_step == b.global_step == 1
    for k, v in a.model.items():
        torch.testing.assert_close(b.model[k], v, rtol=1e-5, atol=1e-6, msg=k)


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


def test_boolean_channels_last_in_code_still_works() -> None:
    assert TrainConfig(Path("w"), channels_last=False).channels_last == "off"  # type: ignore[arg-type]
    assert EmbedConfig(Path("w"), channels_last=True).channels_last == "on"  # type: ignore[arg-type]
