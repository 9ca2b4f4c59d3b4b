"""The Audio Spectrogram Transformer (Gong et al., 2021) over ``transformers``' implementation.

Users hold AST checkpoints as Hugging Face model folders (``config.json`` plus
``model.safetensors``, e.g. ``MIT/ast-finetuned-audioset-10-10-0.4593``). This module reads
them without any download and without pickle: the architecture from ``config.json`` (plain
JSON, only the fields an AST has, each type-checked), the weights with ``safetensors``, and the
normalisation statistics of the front end from ``preprocessor_config.json``. The network is
built from the config and the state dict is matched by avfuse itself (strictly, listing every
mismatch; see :func:`avfuse.models.match_state`), so no ``from_pretrained`` code path runs.

``transformers`` is an optional dependency (``pip install 'avfuse[ast]'``), imported only when
an :class:`AST` is built: avfuse imports and runs without it.

Input: the Kaldi-fbank log-mel of :meth:`avfuse.melspec.FrontendConfig.ast`, windows of exactly
the checkpoint's ``max_length`` frames (1024 = 10.24 s for the AudioSet models): the position
embeddings are learnt for that many patches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avfuse.melspec import AST_MEAN, AST_STD, FrontendConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
PREFIX = "audio_spectrogram_transformer."
# JSON files of a model folder are a few kB; anything far larger is not one.
MAX_JSON_BYTES = 8 << 20

# The architecture fields of an AST config and their JSON types (every other field of
# config.json, labels included, is not needed to build the network).
ARCH_FIELDS: dict[str, type | tuple[type, ...]] = {
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "intermediate_size": int,
    "hidden_act": str,
    "hidden_dropout_prob": (int, float),
    "attention_probs_dropout_prob": (int, float),
    "initializer_range": (int, float),
    "layer_norm_eps": (int, float),
    "patch_size": int,
    "qkv_bias": bool,
    "frequency_stride": int,
    "time_stride": int,
    "max_length": int,
    "num_mel_bins": int,
}
# AST-base as released for AudioSet (ImageNet-pretrained DeiT-base, 10 x 10 patch strides over
# 1024 frames of 128 bands): the architecture of a model trained from scratch.
AST_BASE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "patch_size": 16,
    "qkv_bias": True,
    "frequency_stride": 10,
    "time_stride": 10,
    "max_length": 1024,
    "num_mel_bins": 128,
}
# Parameter names of the released checkpoints (and of what ``save_pretrained`` writes) ->
# the module names of the transformers version that builds the network. Order matters: the
# attention's output projection before the MLP's ``output.dense``.
_LEGACY_NAMES = (
    (r"\.encoder\.layer\.(\d+)\.", r".layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is not a model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def base_arch(max_length: int = 1024, num_mel_bins: int = 128) -> dict[str, Any]:
    """AST-base's architecture for windows of ``max_length`` frames of ``num_mel_bins`` bands."""
    return {**AST_BASE, "max_length": int(max_length), "num_mel_bins": int(num_mel_bins)}


def read_arch(folder: str | Path) -> dict[str, Any]:
    """The architecture fields of ``folder/config.json`` (an AST config), type-checked.

    A missing field takes AST-base's value (configs omit fields at their defaults); a wrong
    ``model_type``, a field of the wrong type or a non-positive size is refused naming it.
    """
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ValueError(f"{folder}: no {CONFIG} (expected a Hugging Face AST model folder)")
    cfg = _read_json(path)
    kind = cfg.get("model_type")
    if kind != "audio-spectrogram-transformer":
        raise ValueError(f"{path}: model_type {kind!r} is not 'audio-spectrogram-transformer'")
    arch = dict(AST_BASE)
    for key, tp in ARCH_FIELDS.items():
        if key not in cfg:
            continue
        v = cfg[key]
        # bool is an int in Python: a size given as true/false is refused too.
        if not isinstance(v, tp) or (tp is not bool and isinstance(v, bool)):
            raise ValueError(f"{path}: {key} = {v!r} is not a {getattr(tp, '__name__', tp)}")
        arch[key] = v
    for key, tp in ARCH_FIELDS.items():
        if tp is int and arch[key] < 1:
            raise ValueError(f"{path}: {key} = {arch[key]} must be >= 1")
    if arch["hidden_size"] % arch["num_attention_heads"]:
        raise ValueError(
            f"{path}: hidden_size {arch['hidden_size']} is not a multiple of "
            f"num_attention_heads {arch['num_attention_heads']}"
        )
    return arch


def frontend_for(folder: str | Path | None = None) -> FrontendConfig:
    """The front end a checkpoint expects: :meth:`FrontendConfig.ast` with the mean and std of
    ``folder/preprocessor_config.json`` (AudioSet's when the folder has none).

    A preprocessor of another sample rate or band count than the Kaldi front end computes, or
    with ``do_normalize`` off, is honoured or refused, never silently ignored.
    """
    mean, std = AST_MEAN, AST_STD
    n_mels = 128
    if folder is not None and (Path(folder) / PREPROCESSOR).is_file():
        path = Path(folder) / PREPROCESSOR
        pre = _read_json(path)
        sr = pre.get("sampling_rate", 16000)
        if sr != 16000:
            raise ValueError(f"{path}: sampling_rate {sr!r}; the AST front end is 16 kHz")
        n_mels = pre.get("num_mel_bins", 128)
        if not isinstance(n_mels, int) or isinstance(n_mels, bool) or n_mels < 1:
            raise ValueError(f"{path}: num_mel_bins {n_mels!r} is not a positive integer")
        for key in ("mean", "std"):
            v = pre.get(key, mean if key == "mean" else std)
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ValueError(f"{path}: {key} {v!r} is not a number")
        mean, std = float(pre.get("mean", mean)), float(pre.get("std", std))
        if pre.get("do_normalize", True) is False:
            std = 0.0
        elif std <= 0:
            raise ValueError(f"{path}: std {std} must be > 0")
    fe = FrontendConfig.ast(mean=mean, std=std)
    return fe if n_mels == 128 else FrontendConfig(**{**_fields(fe), "n_mels": n_mels})


def frontend_toml(folder: str | Path | None = None) -> str:
    """The ``[frontend]`` table of :func:`frontend_for`, for ``avfuse features --config``."""
    fe = frontend_for(folder)
    lines = ["[frontend]"]
    for key, value in fe.to_dict().items():
        text = json.dumps(value)  # TOML spells these scalars as JSON does, booleans included
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def frontend_mismatch(store_hash: str, folder: str | Path | None) -> str | None:
    """Why a feature store's front end is not the one ``folder``'s checkpoint expects, or
    ``None`` when its hash is :func:`frontend_for`'s."""
    want = frontend_for(folder)
    if store_hash == want.hash():
        return None
    return (
        f"the feature store's front end ({store_hash}) is not the one {folder} expects "
        f"(FrontendConfig.ast(mean={want.norm_mean}, std={want.norm_std}), {want.hash()}): "
        "the model sees other inputs than it was trained on"
    )


def _fields(cfg: FrontendConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def _safe_member(folder: Path, name: object) -> Path:
    """``folder/name`` for a shard name read from an index file: a plain file name only."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{folder / WEIGHTS_INDEX}: shard name {name!r} is not a file name")
    return folder / name


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a model folder (``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` lists) or of one ``.safetensors`` file, on CPU.

    Read with ``safetensors`` only: a folder holding only ``pytorch_model.bin`` (a pickle) is
    refused, never unpickled.
    """
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - the ast extra installs it
        raise ValueError(
            "reading a Hugging Face model folder needs safetensors: pip install 'avfuse[ast]'"
        ) from None
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS).is_file():
            files = [p / WEIGHTS]
        elif (p / WEIGHTS_INDEX).is_file():
            weight_map = _read_json(p / WEIGHTS_INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{p / WEIGHTS_INDEX}: no weight_map")
            files = [_safe_member(p, n) for n in sorted(set(weight_map.values()), key=str)]
        else:
            found = ", ".join(sorted(q.name for q in p.iterdir())[:10]) or "nothing"
            raise ValueError(
                f"{p}: no {WEIGHTS} (found {found}); only safetensors weights are read, "
                "never pickled .bin files"
            )
    elif p.suffix == ".safetensors":
        files = [p]
    else:
        raise ValueError(f"{p}: an AST loads a Hugging Face model folder or a .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValueError(f"{f}: tensors {clash[:5]} also in another shard")
        state.update(part)
    return state


def to_module_names(state: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's tensors under the names of our modules.

    Released AST checkpoints (and ``save_pretrained``) use the original layout
    (``encoder.layer.N.attention.attention.query``); the installed transformers may name its
    modules otherwise (``layers.N.attention.q_proj``): the names are translated only when our
    modules use the new ones. A folder of a bare ``ASTModel`` (no classifier) has no
    ``audio_spectrogram_transformer.`` prefix: it is added.
    """
    out = dict(state)
    if out and not any(k.startswith(PREFIX) for k in out):
        out = {PREFIX + k: v for k, v in out.items()}
    if any(".layers." in k for k in ours) and any(".encoder.layer." in k for k in out):
        renamed = {}
        for k, v in out.items():
            for pat, rep in _LEGACY_NAMES:
                k = re.sub(pat, rep, k)
            renamed[k] = v
        out = renamed
    return out


def _transformers_ast() -> Any:
    try:
        from transformers.models.audio_spectrogram_transformer import (
            modeling_audio_spectrogram_transformer as mod,
        )
    except ImportError:
        raise ValueError(
            "the ast model needs the transformers package: pip install 'avfuse[ast]'"
        ) from None
    return mod


class AST(nn.Module):
    """AST classifier: ``(B, T, F)`` or ``(B, 1, T, F)`` log-mel -> ``(B, num_classes)`` logits.

    ``T`` must be the architecture's ``max_length`` and ``F`` its ``num_mel_bins``. The
    submodules carry transformers' ``ASTForAudioClassification`` names
    (``audio_spectrogram_transformer.*``, ``classifier.*``: layer norm + linear), so a
    released checkpoint's tensors map one to one. The embedding is the mean of the CLS and
    distillation tokens' final states (what the released head classifies), ``hidden_size``-d.
    """

    # The head's layer norm fits any class count: it loads with the backbone, so a new head
    # for other classes is only the final linear layer.
    HEAD = ("classifier.dense.",)

    @classmethod
    def build(
        cls,
        num_classes: int,
        *,
        width: float,
        dropout: float,
        n_mels: int,
        frames: int,
        arch: Mapping[str, Any] | None,
    ) -> AST:
        """AST of ``arch`` (AST-base when ``None``), which must take windows of ``frames`` x
        ``n_mels``; ``width`` unused (see :func:`avfuse.models.build_model`)."""
        arch = dict(arch) if arch is not None else base_arch(frames, n_mels)
        if (arch["max_length"], arch["num_mel_bins"]) != (frames, n_mels):
            raise ValueError(
                f"the AST checkpoint takes windows of {arch['max_length']} frames x "
                f"{arch['num_mel_bins']} bands, the run has {frames} x {n_mels} (use the "
                "checkpoint's window and FrontendConfig.ast() features)"
            )
        return cls(num_classes, arch, dropout)

    def __init__(self, num_classes: int, arch: Mapping[str, Any], dropout: float = 0.0) -> None:
        super().__init__()
        mod = _transformers_ast()
        unknown = sorted(set(arch) - set(ARCH_FIELDS))
        if unknown:
            raise ValueError(f"unknown AST architecture fields {unknown}")
        self.arch = {**AST_BASE, **dict(arch)}
        config = mod.ASTConfig(**self.arch, num_labels=num_classes)
        self.audio_spectrogram_transformer = mod.ASTModel(config)
        self.head_dropout = nn.Dropout(dropout)
        self.classifier = mod.ASTMLPHead(config)
        # The released initialisation of a new head (normal(0, initializer_range), zero bias).
        nn.init.normal_(self.classifier.dense.weight, std=float(self.arch["initializer_range"]))
        nn.init.zeros_(self.classifier.dense.bias)
        self.embed_dim = int(self.arch["hidden_size"])
        self.num_layers = int(self.arch["num_hidden_layers"])

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == 1:
            x = x[:, 0]
        t, f = int(self.arch["max_length"]), int(self.arch["num_mel_bins"])
        if x.dim() != 3 or tuple(x.shape[1:]) != (t, f):
            raise ValueError(
                f"AST takes windows of exactly {t} frames x {f} bands (its position "
                f"embeddings), got {tuple(x.shape)}"
            )
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, hidden_size): mean of the CLS and distillation token states."""
        out = self.audio_spectrogram_transformer(input_values=self._inputs(x))
        return out.pooler_output  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_dropout(self.embed(x)))  # type: ignore[no-any-return]

    def adapt_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint's state dict under this module's parameter names."""
        return to_module_names(state, self.state_dict())

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise learning-rate decay: 0 the patch and
        position embeddings, ``i + 1`` encoder layer ``i``, ``num_layers + 1`` the final norm
        and the head."""
        rest = name.removeprefix(PREFIX)
        if rest.startswith("embeddings."):
            return 0
        m = re.match(r"(?:layers|encoder\.layer)\.(\d+)\.", rest)
        if m:
            return int(m.group(1)) + 1
        return self.num_layers + 1

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each encoder layer's activations in the backward pass (memory for time)."""
        net = self.audio_spectrogram_transformer
        kwargs = {"use_reentrant": False}  # works with frozen inputs (no grad into the input)
        enable = getattr(net, "activation_checkpointing_enable", None)
        if enable is not None:  # the name since transformers 5.x; the old one warns
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


__all__ = [
    "AST",
    "AST_BASE",
    "base_arch",
    "frontend_for",
    "frontend_toml",
    "read_arch",
    "read_state",
    "to_module_names",
]
