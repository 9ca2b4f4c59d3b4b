"""Audio classifiers over log-mel windows: ``(batch, frames, n_mels) -> (batch, classes)``.

Every model also accepts ``(batch, 1, frames, n_mels)``. The window length (``frames``) and band
count come from the feature store's front end (96 x 64 for VGGish). ``width`` scales the channel
counts (1.0 is the published architecture; tests use small fractions).

* :class:`VGGish` -- the AudioSet VGGish network plus a classifier head. Backbone parameter
  names and shapes follow the common torch port (``harritaylor/torchvggish``:
  ``features.0.weight`` ... ``embeddings.4.bias``), so a converted AudioSet checkpoint loads
  with :meth:`VGGish.load_backbone`.
* :class:`ResNet` -- ResNet-18-style 2D CNN on one-channel log-mel.
* :class:`PANNsCNN` -- a small PANNs-style CNN for training from scratch (its own parameter
  names: it loads no released checkpoint).
* :class:`Cnn14`, :class:`Cnn10` -- the PANNs AudioSet networks (Kong et al., 2020) with the
  release's parameter names (``bn0``, ``conv_block1..6``, ``fc1``, ``fc_audioset``), so
  ``Cnn14_mAP=0.431.pth`` / ``Cnn10_mAP=0.380.pth`` load strictly. They take log-mel input; the
  spectrogram and log-mel extractors of the release stay in avfuse's front end.
* :class:`~avfuse.ast_model.AST` -- the Audio Spectrogram Transformer over ``transformers``
  (optional extra ``ast``), initialised from a Hugging Face model folder (safetensors only).

:func:`load_init` initialises any of them from a checkpoint file, strictly by default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from avfuse import ast_model
from avfuse.ast_model import AST
from avfuse.model_config import HEADS, MODELS
from avfuse.safe_pickle import load_torch

log = logging.getLogger(__name__)


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(B, T, F) or (B, 1, T, F) -> (B, 1, T, F)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4 and x.shape[1] == 1:
        return x
    raise ValueError(
        f"expected input (batch, frames, mels) or (batch, 1, frames, mels), got {tuple(x.shape)}"
    )


def _unwrap_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict inside a ``{"state_dict": ...}`` and/or ``{"model": ...}`` wrapper."""
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping):
            state = inner
    return state


def _ch(base: int, width: float) -> int:
    return max(4, round(base * width))


class VGGish(nn.Module):
    """VGGish (Hershey et al., 2017) with a classifier: (B, 96, 64) -> (B, num_classes).

    ``features``: conv3x3 64, pool, 128, pool, 256, 256, pool, 512, 512, pool (ReLU after every
    conv), ``embeddings``: FC 4096-4096-128 with ReLU, as in the AudioSet release; then dropout
    and a linear ``classifier``. With ``width`` != 1 the layout no longer matches the release.
    """

    BACKBONE = ("features.", "embeddings.")
    HEAD = ("classifier.",)
    EMBED_DIM = 128

    # Its layers depend on the window: build_model passes ``n_mels`` and ``frames``.
    SIZED_BY_WINDOW = True

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        dropout: float = 0.3,
        n_mels: int = 64,
        frames: int = 96,
    ) -> None:
        super().__init__()
        cfg: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]
        layers: list[nn.Module] = []
        cin = 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = _ch(int(v), width)
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        hidden = _ch(4096, width)
        flat = cin * (frames // 16) * (n_mels // 16)
        self.embeddings = nn.Sequential(
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 128),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 96, 64) -> (B, 128) VGGish embedding."""
        x = self.features(_as_image(x))
        # The release flattens in (time, freq, channel) order (TensorFlow NHWC).
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.embeddings(x)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(x)))  # type: ignore[no-any-return]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.BACKBONE)}

    def load_backbone(self, state: Mapping[str, Any]) -> list[str]:
        """Load a VGGish state dict (``features.*``, ``embeddings.*``) with strict matching.

        A wrapped dict (``{"state_dict": ...}`` / ``{"model": ...}``) and a ``module.`` prefix are
        accepted; other keys (e.g. the port's ``pproc.*`` PCA buffers) are ignored and returned.
        Any missing key, unexpected backbone key or shape mismatch raises ``ValueError`` listing
        all of them.
        """
        state = {k.removeprefix("module."): v for k, v in _unwrap_state(state).items()}
        ours = self.backbone_state_dict()
        theirs = {k: v for k, v in state.items() if k.startswith(self.BACKBONE)}
        ignored = sorted(k for k in state if not k.startswith(self.BACKBONE))
        problems = [f"missing: {k} {tuple(ours[k].shape)}" for k in ours if k not in theirs]
        problems += [f"unexpected: {k} {tuple(theirs[k].shape)}" for k in theirs if k not in ours]
        problems += [
            f"shape: {k} checkpoint {tuple(theirs[k].shape)} vs model {tuple(ours[k].shape)}"
            for k in ours
            if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)
        ]
        if problems:
            raise ValueError(
                "checkpoint does not match the VGGish backbone layout (use width=1.0, 64 mel "
                "bands, 96 frames):\n  " + "\n  ".join(problems)
            )
        self.load_state_dict({**self.state_dict(), **theirs}, strict=True)
        return ignored


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.down(x), inplace=True)


class ResNet(nn.Module):
    """ResNet-18-style CNN for one-channel log-mel: (B, 96, 64) -> (B, num_classes).

    Stem 7x7/2 conv + 3x3/2 max pool, four stages of two basic blocks (64-128-256-512 channels
    times ``width``), global average pooling, dropout, linear.
    """

    HEAD = ("fc.",)

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        dropout: float = 0.3,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        c0 = _ch(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(1, c0, 7, 2, 3, bias=False),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        cin = c0
        for i, n in enumerate(blocks):
            cout = _ch(64 * 2**i, width)
            for j in range(n):
                stages.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            # Residual branches start as identity: trains faster and more stably from scratch.
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(_as_image(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))  # type: ignore[no-any-return]


class ConvBlock(nn.Module):
    """Two conv3x3-BN-ReLU, then 2x2 average pooling (the PANNs block)."""

    def __init__(self, cin: int, cout: int, pool: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return F.avg_pool2d(x, 2) if self.pool else x


class PANNsCNN(nn.Module):
    """PANNs-style CNN (Kong et al., 2020; Cnn10 layout): (B, 96, 64) -> (B, num_classes).

    Four conv blocks (64-128-256-512 channels times ``width``), mean over frequency, then max +
    mean over time, an FC embedding layer with ReLU, dropout and a linear classifier.
    """

    HEAD = ("fc.",)

    def __init__(
        self, num_classes: int, width: float = 1.0, dropout: float = 0.3, embed_dim: int = 512
    ) -> None:
        super().__init__()
        chans = [_ch(c, width) for c in (64, 128, 256, 512)]
        blocks: list[nn.Module] = []
        cin = 1
        for c in chans:
            blocks.append(ConvBlock(cin, c))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        d = _ch(embed_dim, width)
        self.fc1 = nn.Linear(cin, d)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(_as_image(x))  # (B, C, T', F')
        x = x.mean(dim=3)  # over frequency -> (B, C, T')
        x = x.amax(dim=2) + x.mean(dim=2)
        x = F.relu(self.fc1(self.dropout(x)), inplace=True)
        return self.fc(self.dropout(x))  # type: ignore[no-any-return]


class PANNsBlock(nn.Module):
    """The PANNs conv block: two conv3x3-BN-ReLU, then average pooling over ``pool``."""

    def __init__(self, cin: int, cout: int, pool: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return F.avg_pool2d(x, self.pool) if self.pool != (1, 1) else x


class _PANNs(nn.Module):
    """The PANNs CNN family over log-mel: (B, T, n_mels) -> (B, num_classes) logits.

    ``bn0`` standardises each mel band (its running statistics come with the checkpoint, so
    pretrained weights need no external band normalisation), then conv blocks with dropout 0.2,
    mean over frequency, max + mean over time, dropout 0.5, ``fc1`` + ReLU (the embedding) and
    ``fc_audioset`` (logits; ``sigmoid`` of them is the release's ``clipwise_output`` when
    ``num_classes`` is 527). ``dropout`` is applied to the embedding before the head only when
    fine-tuning (the release feeds the undropped embedding to its head).
    """

    CHANNELS: tuple[int, ...] = ()
    LAST_POOL: tuple[int, int] = (2, 2)
    HEAD = ("fc_audioset.",)
    AUDIOSET_CLASSES = 527

    # Its layers depend on the window: build_model passes ``n_mels`` and ``frames``.
    SIZED_BY_WINDOW = True

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        dropout: float = 0.0,
        n_mels: int = 64,
        frames: int = 1001,
    ) -> None:
        super().__init__()
        n_pool = sum(1 for _ in self.CHANNELS[:-1]) + (self.LAST_POOL != (1, 1))
        if min(n_mels, frames) < 2**n_pool:
            raise ValueError(
                f"{type(self).__name__} pools {n_pool} times: needs windows of at least "
                f"{2**n_pool} frames and bands, got {frames} x {n_mels}"
            )
        self.bn0 = nn.BatchNorm2d(n_mels)
        chans = [_ch(c, width) for c in self.CHANNELS]
        cin = 1
        for i, c in enumerate(chans):
            pool = self.LAST_POOL if i == len(chans) - 1 else (2, 2)
            setattr(self, f"conv_block{i + 1}", PANNsBlock(cin, c, pool))
            cin = c
        self.n_blocks = len(chans)
        self.embed_dim = cin
        self.fc1 = nn.Linear(cin, cin)
        self.head_dropout = nn.Dropout(dropout)
        self.fc_audioset = nn.Linear(cin, num_classes)
        # The release's initialisation (Xavier-uniform weights, zero biases, unit BN).
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels) log-mel -> (B, embed_dim) embedding (2048 for Cnn14, 512 for Cnn10)."""
        x = _as_image(x)
        # bn0 normalises over the mel axis: move bands onto the channel axis and back.
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        for i in range(self.n_blocks):
            x = getattr(self, f"conv_block{i + 1}")(x)
            x = F.dropout(x, p=0.2, training=self.training)
        x = x.mean(dim=3)
        x = x.amax(dim=2) + x.mean(dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        return F.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_audioset(self.head_dropout(self.embed(x)))  # type: ignore[no-any-return]


class Cnn14(_PANNs):
    """PANNs Cnn14: six blocks of 64-2048 channels, 2048-d embedding (``Cnn14_mAP=0.431.pth``)."""

    CHANNELS = (64, 128, 256, 512, 1024, 2048)
    LAST_POOL = (1, 1)


class Cnn10(_PANNs):
    """PANNs Cnn10: four blocks of 64-512 channels, 512-d embedding (``Cnn10_mAP=0.380.pth``)."""

    CHANNELS = (64, 128, 256, 512)
    LAST_POOL = (2, 2)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a PANNs model with every conv block's batch norms folded into its
    convolutions (``torch.nn.utils.fusion``): the same outputs to float rounding, one pass
    less over the largest activations. Other models are returned as an eval-mode copy."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(model).eval()
    for m in out.modules():
        if isinstance(m, PANNsBlock):
            m.conv1 = fuse_conv_bn_eval(m.conv1, m.bn1)  # type: ignore[assignment]
            m.conv2 = fuse_conv_bn_eval(m.conv2, m.bn2)  # type: ignore[assignment]
            m.bn1 = nn.Identity()  # type: ignore[assignment]
            m.bn2 = nn.Identity()  # type: ignore[assignment]
    return out


class EmbeddingHead(nn.Module):
    """Classifier over precomputed embeddings: (B, D) or (B, 1, 1, D) -> (B, num_classes).

    ``hidden`` 0 is a linear probe; otherwise one hidden ReLU layer (a small MLP).
    """

    HEAD = ("fc.",)

    def __init__(
        self, num_classes: int, n_mels: int, hidden: int = 0, dropout: float = 0.0, **_: Any
    ) -> None:
        super().__init__()
        self.body: nn.Module = nn.Identity()
        d = n_mels
        if hidden > 0:
            self.body = nn.Sequential(nn.Linear(n_mels, hidden), nn.ReLU(inplace=True))
            d = hidden
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.fc(self.dropout(self.body(x)))  # type: ignore[no-any-return]


# Entries of released checkpoints that are not part of any avfuse model: the PANNs release's
# waveform front end (avfuse computes log-mel in its own front end) and torchvggish's PCA.
EXTRA_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "pproc.")


def build_model(
    name: str,
    num_classes: int,
    width: float = 1.0,
    dropout: float = 0.3,
    n_mels: int = 64,
    frames: int = 96,
    arch: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model ``name`` for windows of ``frames`` x ``n_mels`` (the store's front end).

    For ``linear`` / ``mlp`` (heads over embeddings) ``n_mels`` is the embedding size. ``arch``
    is the architecture of models configured by their checkpoint (``ast``: see
    :func:`model_arch`; AST-base when not given); it must agree with ``frames`` x ``n_mels``.
    A model class with a ``build`` classmethod (keyword arguments ``width``, ``dropout``,
    ``n_mels``, ``frames``, ``arch``) is made by it; one whose ``SIZED_BY_WINDOW`` is true by
    ``cls(num_classes, width, dropout, n_mels=, frames=)``; any other by
    ``cls(num_classes=, width=, dropout=)``.
    """
    if name in HEADS:
        return EmbeddingHead(num_classes, n_mels, hidden=HEADS[name], dropout=dropout)
    if name not in MODELS:
        known = ", ".join([*MODELS, *HEADS])
        raise ValueError(f"unknown model {name!r}; choose one of {known}")
    cls = model_class(name)
    build = getattr(cls, "build", None)
    if build is not None:
        model: nn.Module = build(
            num_classes, width=width, dropout=dropout, n_mels=n_mels, frames=frames, arch=arch
        )
        return model
    if getattr(cls, "SIZED_BY_WINDOW", False):
        return cls(num_classes, width, dropout, n_mels=n_mels, frames=frames)  # type: ignore[call-arg]
    # The common constructor, for models that adapt to any window size.
    return cls(num_classes=num_classes, width=width, dropout=dropout)  # type: ignore[call-arg]


def model_class(name: str) -> type[nn.Module]:
    """The class of the :data:`~avfuse.model_config.MODELS` entry ``name``."""
    entry = MODELS.entry(name)
    cls = globals().get(entry.cls)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model {name!r}: avfuse.models has no model class {entry.cls!r}")
    return cls


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier head (everything else is the backbone)."""
    return tuple(getattr(model, "HEAD", ()))


def is_head(model: nn.Module, key: str) -> bool:
    return key.startswith(head_prefixes(model))


@dataclass(frozen=True)
class InitReport:
    """What :func:`load_init` did: tensors loaded, skipped extras, head fate, problems waived."""

    loaded: list[str]
    ignored: list[str]
    head: str  # "loaded", "new" (replaced: class count or layout differs) or "none"
    problems: list[str]


def match_state(
    model: nn.Module, state: Mapping[str, Any], *, partial: bool = False, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], InitReport]:
    """Match a state dict against ``model``; returns (tensors to load, report).

    The backbone (every tensor outside the head) must match exactly: a missing, unexpected or
    mis-shaped tensor raises ``ValueError`` listing all of them, unless ``partial``. Even then
    at least one backbone tensor must match: a checkpoint of which only the head fits is
    refused. Head tensors load when their shapes fit (same class count), else the head stays
    new. Known extras (:data:`EXTRA_PREFIXES`) are skipped and listed.
    """
    state = {str(k).removeprefix("module."): v for k, v in _unwrap_state(state).items()}
    ours = model.state_dict()
    if isinstance(model, AST):
        state = model.adapt_state(state)
    extra = sorted(k for k in state if k.startswith(EXTRA_PREFIXES) and k not in ours)
    theirs = {k: v for k, v in state.items() if k not in extra}
    if not all(isinstance(v, torch.Tensor) for v in theirs.values()):
        bad = sorted(k for k, v in theirs.items() if not isinstance(v, torch.Tensor))
        raise ValueError(f"{source}: non-tensor entries {bad[:5]} in the state dict")
    name = type(model).__name__

    def shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    problems = [
        f"missing: {k} {shape(v)}"
        for k, v in ours.items()
        if not is_head(model, k) and k not in theirs
    ]
    problems += [
        f"unexpected: {k} {shape(v)}"
        for k, v in theirs.items()
        if k not in ours and not is_head(model, k)
    ]
    problems += [
        f"shape: {k} checkpoint {shape(theirs[k])} vs model {shape(v)}"
        for k, v in ours.items()
        if not is_head(model, k) and k in theirs and shape(theirs[k]) != shape(v)
    ]
    usable = {
        k: v
        for k, v in theirs.items()
        if k in ours and not is_head(model, k) and shape(v) == shape(ours[k])
    }
    if not usable:
        raise ValueError(
            f"{source}: no parameter matches the {name} backbone (a checkpoint of another "
            "architecture, or of which only the head fits):\n  " + "\n  ".join(problems[:20])
        )
    if problems and not partial:
        raise ValueError(
            f"{source} does not match the {name} backbone ({len(problems)} problem(s); "
            "check --model and --width, or pass --init-partial to load what matches):\n  "
            + "\n  ".join(problems)
        )
    head_keys = [k for k in ours if is_head(model, k)]
    head_fits = bool(head_keys) and all(
        k in theirs and shape(theirs[k]) == shape(ours[k]) for k in head_keys
    )
    head = "none" if not any(k in theirs for k in head_keys) else "new"
    if head_fits:
        usable.update({k: theirs[k] for k in head_keys})
        head = "loaded"
    ignored = sorted(set(state) - set(usable))
    return usable, InitReport(sorted(usable), ignored, head, problems)


def load_init(model: nn.Module, path: str | Path, *, partial: bool = False) -> list[str]:
    """Initialise ``model`` from a checkpoint file (``--init``); returns the keys not loaded.

    Reads ``checkpoint["model"]`` / ``["state_dict"]`` or a bare state dict through the safe
    loader, matches it with :func:`match_state` (strict unless ``partial``) and logs what
    happened, including a head replaced because the class count differs.
    """
    if isinstance(model, AST) or Path(path).is_dir() or Path(path).suffix == ".safetensors":
        # Hugging Face weights: safetensors only, never unpickled.
        state: Any = ast_model.read_state(path)
    else:
        state = load_torch(path)  # third-party files may carry a numpy RandomState
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    usable, rep = match_state(model, state, partial=partial, source=str(path))
    model.load_state_dict({**model.state_dict(), **usable}, strict=True)
    name = type(model).__name__
    log.info("initialised %s from %s: %d tensors", name, path, len(rep.loaded))
    if rep.head == "new":
        log.info(
            "%s: the checkpoint's head does not fit this class count; a new head is trained", path
        )
    if rep.problems:
        log.warning(
            "%s: partial load, %d backbone problem(s):\n  %s",
            path,
            len(rep.problems),
            "\n  ".join(rep.problems),
        )
    if rep.ignored:
        log.info(
            "%s: not loaded: %s",
            path,
            ", ".join(rep.ignored[:10]) + (" ..." if len(rep.ignored) > 10 else ""),
        )
    return rep.ignored


def embed_dim(model: nn.Module) -> int:
    """Size of ``model.embed``'s output (VGGish 128, Cnn14 2048, Cnn10 512 at width 1)."""
    if isinstance(model, VGGish):
        return model.classifier.in_features
    if isinstance(model, _PANNs | AST):
        return model.embed_dim
    raise ValueError(f"{type(model).__name__} has no embedding output")


def model_arch(name: str, init: str | Path | None, window: int = 0) -> dict[str, Any] | None:
    """The architecture a model takes from its checkpoint, or ``None`` (models of fixed layout).

    ``ast``: ``init``'s ``config.json``, or AST-base over ``window`` frames (1024 when 0) without
    ``init``. A ``window`` other than the checkpoint's ``max_length`` is refused: the position
    embeddings are learnt for that many frames.
    """
    if name != "ast":
        return None
    if init is None:
        return ast_model.base_arch(window or ast_model.AST_BASE["max_length"])
    if not Path(init).is_dir():
        raise ValueError(f"--init {init}: the ast model loads a Hugging Face model folder")
    arch = ast_model.read_arch(init)
    if window and window != arch["max_length"]:
        raise ValueError(
            f"--window {window}: the checkpoint {init} takes windows of max_length "
            f"{arch['max_length']} frames (its position embeddings); leave --window at 0"
        )
    return arch


def layer_scale(model: nn.Module, name: str, decay: float) -> float:
    """Learning-rate factor of parameter ``name`` under layer-wise decay (1 for the head and
    for models without layers to decay): ``decay ** (depth of the head - depth of name)``."""
    layer_id = getattr(model, "layer_id", None)
    if decay == 1.0 or layer_id is None or is_head(model, name):
        return 1.0
    top = int(getattr(model, "num_layers", 0)) + 1
    return float(decay ** (top - int(layer_id(name))))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Trade compute for activation memory; refused for models without it (the CNNs)."""
    fn = getattr(model, "enable_gradient_checkpointing", None)
    if fn is None:
        raise ValueError(f"{type(model).__name__} has no gradient checkpointing (ast has)")
    fn()


__all__: Sequence[str] = [
    "AST",
    "Cnn10",
    "Cnn14",
    "EmbeddingHead",
    "InitReport",
    "PANNsCNN",
    "ResNet",
    "VGGish",
    "build_model",
    "embed_dim",
    "load_init",
    "match_state",
    "model_class",
]
