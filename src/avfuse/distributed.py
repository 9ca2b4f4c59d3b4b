"""Process-group helpers: one place for rank detection, collectives and rank-0-only output.

Training and prediction run unchanged as a single process or under ``torchrun``::

    torchrun --nproc_per_node=4 -m avfuse train WORK --model resnet
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 -m avfuse train ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` then joins the
process group (NCCL when the device is CUDA, gloo on CPU). Without those variables every helper
degrades to the single-process case, so callers never branch on "distributed or not".
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _initialized() -> bool:
    """Whether this process has joined a process group (else every helper is a no-op)."""
    return dist.is_available() and dist.is_initialized()


def env() -> DistEnv:
    """Rank, world size and local rank of this process (from the process group or torchrun)."""
    if _initialized():
        return DistEnv(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )
    return DistEnv(
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def init(device: torch.device | str) -> DistEnv:
    """Join the process group if launched by torchrun (idempotent); returns this rank's env.

    ``device`` is this rank's device from :func:`resolve_device` (a bare ``"cuda"``/``"cpu"``
    is resolved here): with CUDA the process binds to that very GPU before NCCL starts, so the
    group, the model and every collective use one device.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    e = env()
    if device.type == "cuda":
        # Also in a single process: collectives and current-device allocations follow it.
        torch.cuda.set_device(device)
    if e.world_size <= 1 or not dist.is_available() or dist.is_initialized():
        return e
    nccl = device.type == "cuda" and not _sharing_gpus()
    dist.init_process_group(backend="nccl" if nccl else "gloo")
    atexit.register(destroy)
    return env()


def destroy() -> None:
    if _initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device | str) -> Iterator[DistEnv]:
    """Be in the process group for the ``with`` body (under torchrun); returns this rank's env.

    The group is joined once per process and left when the process exits (:func:`init`
    registers :func:`destroy` with ``atexit``), not at the end of each stage: re-joining a
    group under torchrun after leaving it reuses the launcher's rendezvous keys and blocks
    forever, and a script that runs train and then predict must be able to do so.
    """
    yield init(device)


def is_main() -> bool:
    return env().is_main


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Element-wise sum of ``values`` over ranks (used for epoch loss/accuracy totals).

    ``device`` defaults to where the group's backend reduces: this rank's GPU under NCCL
    (which has no CPU tensors), the CPU under gloo.
    """
    if not _initialized():
        return list(values)
    if device is None:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


class MainOnlyFilter(logging.Filter):
    """Drop log records on ranks other than 0, so N processes print one log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main()


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, MainOnlyFilter) for f in logger.filters):
        logger.addFilter(MainOnlyFilter())
    return logger


# --------------------------------------------------------------------------- devices and AMP


SHARE_GPUS_ENV = "AVFUSE_SHARE_GPUS"


def _sharing_gpus() -> bool:
    return os.environ.get(SHARE_GPUS_ENV, "").lower() in ("1", "true", "yes")


def resolve_device(device: str) -> torch.device:
    """This process's device for ``device`` (auto, cpu, cuda): the one rule of every stage.

    ``auto`` is CUDA if present, else CPU. CUDA is ``cuda:LOCAL_RANK``: under torchrun each
    local rank has its own GPU. With fewer GPUs than local ranks this refuses, naming both
    counts, unless ``AVFUSE_SHARE_GPUS=1`` asks to share them on purpose (rank r on
    ``cuda:r % count``, with a warning; the group then runs on gloo, as NCCL refuses two ranks
    of one group on one GPU): slower, for trying a multi-process launch on a small machine.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"unknown device {device!r} (auto, cpu or cuda)")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is available")
    local, count = env().local_rank, torch.cuda.device_count()
    if local < count:
        return torch.device("cuda", local)
    if not _sharing_gpus():
        raise RuntimeError(
            f"local rank {local} needs cuda:{local} but this host has {count} GPU(s): start "
            f"at most {count} process(es) per node (torchrun --nproc_per_node={count}), or set "
            f"{SHARE_GPUS_ENV}=1 to share the GPUs on purpose"
        )
    shared = torch.device("cuda", local % count)
    logging.getLogger(__name__).warning(
        "%s=1: local rank %d shares %s (%d GPU(s) for more local ranks)",
        SHARE_GPUS_ENV,
        local,
        shared,
        count,
    )
    return shared


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX / ARM BF16).

    Without native support bf16 autocast on CPU is emulated and slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", " bf16"))


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (auto, off, bf16, fp16) on ``device``; ``None`` = float32.

    ``auto``: bf16 on CUDA where supported, else fp16; bf16 on a CPU with native bf16, else off.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp=fp16 needs CUDA (use bf16 or off on CPU)")
        return torch.float16
    if amp != "auto":
        raise ValueError(f"unknown amp {amp!r} (auto, off, bf16, fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def amp_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off") if dtype else "off"


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    Each rank updates its running statistics on its own shard; evaluating with rank 0's makes
    every rank score like the checkpoint rank 0 writes.
    """
    if not _initialized():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)
