"""Audio classifiers over 96-frame log-mel windows: ``(batch, 96, n_mels) -> (batch, classes)``.

Every model also accepts ``(batch, 1, 96, n_mels)``. ``width`` scales the channel counts (1.0 is
the published architecture; tests use small fractions).

* :class:`VGGish` -- the AudioSet VGGish network plus a classifier head. Backbone parameter
  names and shapes follow the common torch port (``harritaylor/torchvggish``:
  ``features.0.weight`` ... ``embeddings.4.bias``), so a converted AudioSet checkpoint loads
  with :meth:`VGGish.load_backbone`.
* :class:`ResNet` -- ResNet-18-style 2D CNN on one-channel log-mel.
* :class:`PANNsCNN` -- PANNs-style CNN: conv blocks, mean over frequency, max + mean over time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from avfuse.safe_pickle import load_torch


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


MODELS: dict[str, type[nn.Module]] = {"vggish": VGGish, "resnet": ResNet, "panns": PANNsCNN}


def build_model(name: str, num_classes: int, width: float = 1.0, dropout: float = 0.3) -> nn.Module:
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    return cls(num_classes=num_classes, width=width, dropout=dropout)  # type: ignore[call-arg]


def load_init(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from a state-dict file (``--init``); returns ignored keys.

    For :class:`VGGish` the backbone is matched strictly (see :meth:`VGGish.load_backbone`);
    other models load every key whose name and shape match and raise if none does.
    """
    state = load_torch(path)  # third-party files may carry a numpy RandomState
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if isinstance(model, VGGish):
        return model.load_backbone(state)
    state = _unwrap_state(state)
    ours = model.state_dict()
    usable = {
        k: v for k, v in state.items() if k in ours and tuple(v.shape) == tuple(ours[k].shape)
    }
    if not usable:
        raise ValueError(f"{path}: no parameter matches the {type(model).__name__} layout")
    model.load_state_dict({**ours, **usable}, strict=True)
    return sorted(set(state) - set(usable))
