"""torchrun: 2 CPU processes (gloo on loopback) train, resume and predict once per video; each
local rank binds its own GPU; stages leave the process group they joined."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from avfuse import distributed as D
from avfuse.checkpoint import load_checkpoint
from avfuse.predict import PredictConfig, predict
from avfuse.scores import ScoreFile
from avfuse.scoring import model_from_checkpoint
from tests.synthetic import make_synthetic_work
from tests.test_train import SCHEDULE_TINY

SCRIPT = """
import atexit, json, sys
from pathlib import Path
from avfuse import distributed as D
from avfuse.train import StopTraining, TrainConfig, train

work = Path(sys.argv[1])
# Registered before the group is joined, so it runs after the teardown registered by joining.
atexit.register(lambda: (work / f"exit{D.env().rank}.json").write_text(json.dumps(D._initialized())))
common = dict(model="resnet", width=0.125, batch_size=4, windows_per_video=3, num_workers=0,
              amp="off", device="cpu", progress=False, checkpoint_every=0, eval_every=1,
              name="ddp", min_steps=0, val_split="val")
seen = []
def log_step(step):
    seen.append(step)
    if step == 5 and not resumed:  # killed in epoch 2, after epoch 1's checkpoint
        raise StopTraining
resumed = False
try:
    train(TrainConfig(work, epochs=2, **common), on_step=log_step)
except StopTraining:
    pass
left = D._initialized()  # the group outlives a stage that raised, for the next stage
resumed = True
r2 = train(TrainConfig(work, epochs=2, resume=True, **common), on_step=log_step)
e = D.env()
(work / f"rank{e.rank}.json").write_text(json.dumps(
    {"rank": e.rank, "world": e.world_size, "steps": seen, "r2": r2 is not None,
     "group_left": [left, D._initialized()]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_single_process_helpers() -> None:
    e = D.env()
    assert (e.rank, e.world_size, e.is_main, e.distributed) == (0, 1, True, False)
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    cpu = torch.device("cpu")
    assert D.resolve_amp("off", cpu) is None and D.resolve_amp("bf16", cpu) == torch.bfloat16
    assert D.resolve_amp("auto", cpu) == (torch.bfloat16 if D.cpu_supports_bf16() else None)
    with pytest.raises(ValueError, match="CUDA"):
        D.resolve_amp("fp16", cpu)
    assert D.resolve_device("cpu") == cpu


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # 12 train videos x 3 windows = 36 -> 18 per rank -> 4 steps of 4 per epoch (drop_last)
    make_synthetic_work(work, n_classes=3, videos_per_class=4, frames_range=(100, 260), seed=4)
    script = tmp_path / "ddp_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(work),
    ]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    # prediction through the command line, as a user runs it
    cmd[-2:] = [
        "-m",
        "avfuse",
        "predict",
        str(work),
        "--run-name",
        "ddp",
        "--checkpoint",
        "last",
        "--amp",
        "off",
        "--batch-size",
        "7",
        "--output",
        str(work / "scores" / "ddp.npz"),
    ]
    cmd = [f"--master_port={_free_port()}" if c.startswith("--master_port") else c for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    import json

    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["r2"] for r in ranks] == [True, False]  # results (and files) from rank 0 only
    for r in ranks:  # both ranks ran epoch 1 and a step of epoch 2, then resumed at epoch 2
        assert r["steps"] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
        assert r["group_left"] == [True, True]
    # ... and is left when the process exits.
    assert [json.loads((work / f"exit{r}.json").read_text()) for r in range(2)] == [False, False]

    ck = load_checkpoint(work / "runs" / "ddp" / "last.pt")
    assert ck.world_size == 2 and ck.effective_batch_size == 8
    assert ck.epoch == 2 and ck.global_step == 8 and len(ck.rng) == 2
    model, _, _ = model_from_checkpoint(ck)
    assert model(torch.randn(2, 96, 64)).shape == (2, 3)
    lines = (work / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]

    single = predict(
        PredictConfig(
            work,
            run="ddp",
            checkpoint="last",
            amp="off",
            device="cpu",
            batch_size=32,
            output=work / "scores" / "single.npz",
        )
    )
    assert single is not None
    a = ScoreFile.load(work / "scores" / "ddp.npz")
    b = single.scores
    assert a.ids.tolist() == b.ids.tolist() and len(set(a.ids.tolist())) == 12
    assert a.status.tolist() == b.status.tolist()
    np.testing.assert_array_equal(a.n_windows, b.n_windows)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


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


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.synthetic import make_synthetic_work

    w = tmp_path_factory.mktemp("floor")
    # 12 train videos x 2 windows = 24 windows -> 3 steps of 8 per epoch
    make_synthetic_work(w, n_classes=3, videos_per_class=4, frames_range=(100, 200), seed=2)
    return w


def test_stage_functions_leave_no_process_group(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (world size > 1) stages join the group once; it is left at exit."""
    import torch.distributed as dist

    from avfuse import distributed as D
    from avfuse.predict import PredictConfig, predict
    from avfuse.train import StopTraining, TrainConfig, train

    calls: list[str] = []
    state = {"on": False}

    def fake_init(backend: str) -> None:
        calls.append(f"init {backend}")
        state["on"] = True

    def fake_destroy() -> None:
        calls.append("destroy")
        state["on"] = False

    # One process posing as rank 0 of 1: the collectives degrade to local ones.
    monkeypatch.setattr(D, "_initialized", lambda: state["on"])
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr(dist, "destroy_process_group", fake_destroy)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(D, "all_gather_object", lambda obj: [obj])
    monkeypatch.setattr(D, "all_reduce_sum", lambda values, device="cpu": list(values))
    monkeypatch.setattr(D, "broadcast_buffers", lambda module, src=0: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    at_exit: list[Any] = []
    monkeypatch.setattr(D.atexit, "register", at_exit.append)

    cfg = TrainConfig(work, name="pg", epochs=1, val_split="", **SCHEDULE_TINY)  # type: ignore[arg-type]
    train(cfg)
    # Joined once, and left at process exit: re-joining under torchrun would block.
    assert calls == ["init gloo"] and D.destroy in at_exit
    predict(PredictConfig(work, run="pg", checkpoint="last", amp="off", device="cpu"))
    assert calls == ["init gloo"]  # the next stage reuses the group

    # A failing stage keeps the group for what the script does next.
    def stop(step: int) -> None:
        raise StopTraining

    with pytest.raises(StopTraining):
        train(dataclasses.replace(cfg, name="pg2"), on_step=stop)
    assert calls == ["init gloo"] and state["on"]
    D.destroy()  # what the interpreter runs at exit
    assert calls == ["init gloo", "destroy"] and not state["on"]
