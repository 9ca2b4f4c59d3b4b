"""Per-device speed settings: memory format, fused optimizer, compilation, batch size.

Every setting here is a tri-state ``auto | on | off`` (or a number with ``0 = auto``) whose
``auto`` is chosen per device: what pays on a GPU is often slower, or unsafe, on a CPU.

Channels-last on CPU. oneDNN's backward-weights pass of a *strided 1x1* convolution over a
channels-last input writes past its scratchpad when the input has fewer channels than the
instruction set's channel block (16 on AVX-512, 8 on AVX2): heap corruption, seen as
``free(): invalid next size`` or SIGSEGV at 12 or more torch threads with thin models (a ResNet
shortcut at width 0.125 sees 8 channels). ``auto`` therefore runs a model with such a
convolution contiguous on CPU (channels-last otherwise: it measured faster there), and a user
who forces ``on`` on a CPU gets those convolutions guarded: their weights and inputs stay in the
contiguous format, which oneDNN then runs in its plain (not blocked-NHWC) kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TRI_STATE: tuple[str, ...] = ("auto", "on", "off")

# The widest channel block of oneDNN's x86 convolution kernels (AVX-512; AVX2 blocks by 8, so
# a guard at 16 covers both).
CHANNEL_BLOCK = 16


def resolve_channels_last(
    setting: str | bool, device: torch.device, model: nn.Module | None = None
) -> bool:
    """Whether to run ``model`` in channels-last on ``device``.

    ``auto``: on CUDA; on a CPU only for a model none of whose convolutions the oneDNN defect
    covers (measured faster there for every model, see the README). Booleans (old configs)
    mean ``on``/``off``.
    """
    if isinstance(setting, bool):
        return setting
    if setting not in TRI_STATE:
        raise ValueError(f"unknown channels_last {setting!r} (auto, on or off)")
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return True
    return model is not None and not unsafe_channels_last_convs(model)


def unsafe_channels_last_convs(model: nn.Module) -> list[str]:
    """Names of the convolutions the oneDNN defect covers: 1x1 kernel, a stride above 1, and
    fewer input channels (per group) than :data:`CHANNEL_BLOCK`."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        one_by_one = tuple(m.kernel_size) == (1, 1)
        strided = any(s > 1 for s in m.stride)
        if one_by_one and strided and m.in_channels // m.groups < CHANNEL_BLOCK:
            out.append(name)
    return out


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    del module
    x = args[0]
    return (x.contiguous(memory_format=torch.contiguous_format), *args[1:])


def set_memory_format(model: nn.Module, device: torch.device, channels_last: bool) -> list[str]:
    """Put ``model`` on ``device`` in the chosen memory format; returns the guarded convs.

    On a CPU with channels-last, every convolution from :func:`unsafe_channels_last_convs` keeps
    a contiguous weight and gets a forward pre-hook that makes its input contiguous, so the
    defective kernel is never chosen (oneDNN picks channels-last when input or weight is).
    """
    mem = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=mem)  # type: ignore[call-overload]
    if not channels_last or device.type == "cuda":
        return []
    guarded = unsafe_channels_last_convs(model)
    modules = dict(model.named_modules())
    for name in guarded:
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        # clone, not .contiguous(): a 1x1 kernel in channels-last already counts as contiguous,
        # yet its strides still select the channels-last kernel.
        conv.weight.data = conv.weight.data.clone(memory_format=torch.contiguous_format)
        conv.register_forward_pre_hook(_contiguous_input)
    return guarded


@dataclass(frozen=True)
class Placement:
    """Where and how a network runs: the one rule for device, autocast and memory format that
    training steps, scoring and embedding share (so a model scores as it trained).

    ``amp_dtype`` ``None`` runs float32; ``channels_last`` must match the format
    :func:`set_memory_format` gave the model.
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device (asynchronous from pinned memory)."""
        return x.to(self.device, non_blocking=True)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Windows (B, T, F) of any float dtype -> the network's input (B, 1, T, F) float32,
        in the model's memory format."""
        x = x.float().unsqueeze(1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def forward(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` (a model, or its ``embed``) on windows ``x`` (B, T, F) already on the device,
        under autocast; returns its output as computed (maybe in the autocast dtype)."""
        x = self.model_input(x)
        with self.autocast():
            return fn(x)


# Steps from which torch.compile's one-off cost (~1 min for Cnn14) is worth paying by default.
COMPILE_MIN_STEPS = 2000
CPU_BATCH, CUDA_BATCH = 64, 256


def on_for_cuda(setting: str, device: torch.device) -> bool:
    """A tri-state whose ``auto`` means "on CUDA only"."""
    if setting not in TRI_STATE:
        raise ValueError(f"unknown setting {setting!r} (auto, on or off)")
    return device.type == "cuda" if setting == "auto" else setting == "on"


def resolve_compile(setting: str, device: torch.device, total_steps: int) -> bool:
    if setting == "auto":
        return device.type == "cuda" and total_steps >= COMPILE_MIN_STEPS
    return on_for_cuda(setting, device)


def default_batch_size(batch_size: int, device: torch.device) -> int:
    """``0`` (auto) -> 64 on CPU, 256 on CUDA: a GPU at batch 64 waits on kernel launches."""
    if batch_size > 0:
        return batch_size
    return CUDA_BATCH if device.type == "cuda" else CPU_BATCH
