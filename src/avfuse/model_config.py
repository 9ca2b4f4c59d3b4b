"""Settings of the model stages (train, predict, embed), importable without torch.

The orchestrators (``avfuse run``, the CLI, the demo) build, compare and save these configs
for every run, most of which train nothing: keeping them apart from the modules that import
torch keeps ``avfuse run`` with nothing to do at a fraction of torch's ~220 MB and 2 s start.
The stages re-export them (``avfuse.train.TrainConfig`` is this module's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from avfuse.config import Config, finished_run_settings
from avfuse.registry import OneOf, Registry
from avfuse.workdir import ScoreLayout, WorkDir

# What a clip shorter than one window becomes when its window is cut (the store keeps only its
# real frames): ``repeat`` loops the clip, ``zeros`` appends digital silence (the front end's
# log floor, log(log_offset)), ``drop`` leaves the clip out of training and scoring.
ShortClips = Literal["repeat", "zeros", "drop"]
SHORT_CLIPS: tuple[str, ...] = ("repeat", "zeros", "drop")

Aggregation = Literal["mean_softmax", "mean_logits", "max"]


@dataclass(frozen=True)
class ModelEntry:
    """One architecture of :data:`MODELS`.

    ``cls``: the name of its class in :mod:`avfuse.models` (a name, so that the configs stay
    importable without torch). ``pretrained``: released weights exist for it (``--init``,
    ``avfuse embed``), and it takes the inputs of their training, so no band standardisation
    goes in front of it (VGGish saw raw log-mel; PANNs standardise in bn0).
    """

    cls: str
    pretrained: bool = False


# The model table: a new architecture is a class in avfuse.models and one entry here; the
# config fields, CLI choices and messages read their names from it.
MODELS: Registry[ModelEntry] = Registry(
    "model",
    {
        "vggish": ModelEntry("VGGish", pretrained=True),
        "resnet": ModelEntry("ResNet"),
        "panns": ModelEntry("PANNsCNN"),
        "cnn14": ModelEntry("Cnn14", pretrained=True),
        "cnn10": ModelEntry("Cnn10", pretrained=True),
        "ast": ModelEntry("AST", pretrained=True),
    },
)
ModelName = Annotated[str, OneOf(MODELS)]
# Heads over precomputed embeddings (``avfuse train --from-embeddings``, input (B, 1, 1, D)):
# name -> hidden width (0: a linear layer alone).
HEADS: Registry[int] = Registry("head", {"linear": 0, "mlp": 512})
HeadName = Annotated[str, OneOf(HEADS)]
# The models ``avfuse embed`` can run: those with released weights.
PretrainedName = Annotated[str, OneOf(MODELS, keep=lambda entry: entry.pretrained)]
# Steps a run takes at least: with a few hundred clips an epoch is a handful of steps, and 18
# steps left a generated two-class set (14 clips a class, half under 1 s) at chance, while 300
# steps reached 11 of 12 val videos (benchmarks/bench_short_clips.py).
MIN_STEPS = 300
TriState = Literal["auto", "on", "off"]
# Configs and checkpoints written before channels_last had an "auto" stored a boolean.
BOOL_TO_TRI_STATE = {True: "on", False: "off"}
CHANNELS_LAST_HELP = (
    "channels-last memory format; auto: on for CUDA, and on CPU unless the model has a strided "
    "1x1 convolution over fewer than 16 channels (oneDNN corrupts memory there; forced on, "
    "those convolutions stay contiguous)"
)
HELDOUT = "heldout"
# Longest window any setting or checkpoint may ask for: 65536 frames are 11 minutes at the 10 ms
# hop, longer than any clip of a video data set; a window of 10^9 would allocate gigabytes per
# batch before a single frame is read.
MAX_WINDOW = 1 << 16
# Largest batch: a batch is allocated whole, and 65536 windows is already ~1.6 GB of input.
MAX_BATCH = 1 << 16
# Widest channel multiplier: 16x the published networks is already far beyond their size.
MAX_WIDTH = 16.0
CARVE = "carve"


@dataclass(frozen=True)
class TrainConfig(Config):
    """Model, recipe and run settings of ``avfuse train``."""

    work: Path = field(
        metadata={"help": "work folder (manifest + feature store)", "positional": True}
    )
    name: str = field(default="audio", metadata={"help": "run name: outputs in WORK/runs/NAME"})
    model: ModelName = field(default="resnet", metadata={"help": "architecture"})
    width: float = field(
        default=1.0,
        metadata={
            "help": "channel-width multiplier (1.0 = published size)",
            "above": 0.0,
            "max": MAX_WIDTH,
        },
    )
    dropout: float = field(
        default=0.3, metadata={"help": "dropout before the classifier", "min": 0.0, "max": 0.99}
    )
    init: Path | None = field(
        default=None,
        metadata={
            "help": "checkpoint to initialise from (AudioSet VGGish / PANNs weights; for ast a "
            "Hugging Face model folder: config.json + model.safetensors)"
        },
    )
    init_partial: bool = field(
        default=False,
        metadata={"help": "let --init load only the backbone tensors that match (listed)"},
    )
    normalize: Literal["auto", "band", "none"] = field(
        default="auto",
        metadata={
            "help": "per-band standardisation of inputs; auto: none for --init on vggish/cnn14/"
            "cnn10 (inputs as in AudioSet training), band otherwise"
        },
    )
    window: int = field(
        default=0,
        metadata={
            "help": "frames per training window; 0 = the front end's example length",
            "min": 0,
            "max": MAX_WINDOW,
        },
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "train the classifier head only (linear probe)"}
    )
    backbone_lr_mult: float = field(
        default=1.0, metadata={"min": 0, "help": "backbone learning rate = lr x this (head: lr)"}
    )
    layer_decay: float = field(
        default=1.0,
        metadata={
            "omit_default": True,
            "help": "layer-wise learning-rate decay (ast): each layer below the top gets this "
            "factor once more; 1 = off",
            "min": 0.0,
            "max": 1.0,
        },
    )
    grad_checkpointing: bool = field(
        default=False,
        metadata={
            "omit_default": True,
            "help": "recompute activations in the backward pass (ast; less memory)",
        },
    )
    from_embeddings: str = field(
        default="",
        metadata={"help": "train a head on WORK/embeddings/NAME (from `avfuse embed`)"},
    )
    head: HeadName = field(
        default="linear", metadata={"help": "head over embeddings (with --from-embeddings)"}
    )
    epochs: int = field(default=30, metadata={"help": "training epochs", "min": 1})
    batch_size: int = field(
        default=0,
        metadata={
            "help": "windows per step and process; 0 = auto: 64 on CPU, 256 on CUDA (the lr "
            "scales with it per lr_scaling)",
            "min": 0,
            "max": MAX_BATCH,
        },
    )
    lr: float = field(
        default=1e-3, metadata={"above": 0, "help": "peak learning rate at base_batch_size"}
    )
    base_batch_size: int = field(
        default=64, metadata={"min": 1, "help": "effective batch size the lr is given for"}
    )
    lr_scaling: Literal["linear", "sqrt", "none"] = field(
        default="linear",
        metadata={"help": "scale lr by (effective batch / base_batch_size) this way"},
    )
    weight_decay: float = field(default=0.05, metadata={"min": 0, "help": "AdamW weight decay"})
    warmup_epochs: float = field(default=1.0, metadata={"min": 0, "help": "linear warm-up length"})
    label_smoothing: float = field(default=0.1, metadata={"min": 0, "max": 0.99, "help": "0 = off"})
    specaugment: bool = field(default=True, metadata={"help": "SpecAugment time/freq masks"})
    time_mask: int = field(default=16, metadata={"min": 0, "help": "max frames per time mask"})
    freq_mask: int = field(default=8, metadata={"min": 0, "help": "max bands per frequency mask"})
    num_masks: int = field(default=2, metadata={"min": 0, "help": "masks of each kind per window"})
    mixup_alpha: float = field(
        default=0.0, metadata={"min": 0, "help": "mixup Beta(alpha, alpha); 0 = off"}
    )
    grad_clip: float = field(default=5.0, metadata={"min": 0, "help": "max gradient norm; 0 = off"})
    windows_per_video: int = field(
        default=4,
        metadata={"help": "random windows drawn per video per epoch", "min": 1, "max": 1 << 12},
    )
    balanced: bool = field(default=False, metadata={"help": "class-balanced video sampling"})
    min_steps: int = field(
        default=MIN_STEPS,
        metadata={
            "min": 0,
            "help": "at least this many optimizer steps over the run: small datasets draw more "
            "windows per video per epoch (0 = epochs x windows_per_video only)",
        },
    )
    short_clips: ShortClips = field(
        default="repeat",
        metadata={
            "help": "clips shorter than one window: repeat (loop the clip), zeros (pad with "
            "silence) or drop (do not train on them); predict follows the checkpoint's choice"
        },
    )
    num_workers: int = field(default=2, metadata={"min": 0, "help": "DataLoader worker processes"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "device"})
    amp: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "mixed precision; auto: bf16 on GPUs/CPUs that support it"},
    )
    channels_last: TriState = field(
        default="auto", metadata={"help": CHANNELS_LAST_HELP, "legacy": BOOL_TO_TRI_STATE}
    )
    compile: TriState = field(
        default="auto",
        metadata={
            "help": "torch.compile the model; auto: on CUDA for runs of >= 2000 steps (compiling "
            "takes ~1 min, a short run would only wait for it)"
        },
    )
    fused_optimizer: TriState = field(
        default="auto", metadata={"help": "fused AdamW (one kernel per step); auto: on CUDA"}
    )
    device_normalize: TriState = field(
        default="auto",
        metadata={
            "help": "standardise bands on the device, after the copy of the stored windows "
            "(half the bytes for a float16 store); auto: on CUDA"
        },
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "random seed"})
    deterministic: bool = field(
        default=False, metadata={"help": "deterministic algorithms (bit-exact resume; slower)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue WORK/runs/NAME/last.pt"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    val_split: str = field(
        default="auto",
        metadata={
            "help": "split that chooses best.pt: a split name, 'carve' (a seeded, class-"
            "stratified part of train, not trained on), 'auto' (heldout if the manifest has "
            "it, else carve) or '' (none: best.pt = last)"
        },
    )
    selection: Literal["auto", "top1", "last"] = field(
        default="auto",
        metadata={
            "help": "which validated epoch best.pt keeps: auto (the latest within one standard "
            "error of the best top-1 and log-likelihood; the last epoch once the selection "
            "split saturates or when it has under 3 videos per class), top1 (the first epoch "
            "with the highest top-1), last"
        },
    )
    carve_fraction: float = field(
        default=0.1,
        metadata={
            "help": "share of each class of train carved out for model selection",
            "min": 0.0,
            "max": 0.9,
        },
    )
    eval_every: int = field(
        default=1, metadata={"help": "validate every N epochs; 0 = never", "min": 0}
    )
    val_hop: int = field(
        default=0, metadata={"help": "hop between validation windows; 0 = the window", "min": 0}
    )
    checkpoint_every: int = field(
        default=500,
        metadata={"min": 0, "help": "also write last.pt every N steps; 0 = per epoch only"},
    )
    norm_videos: int = field(
        default=5000,
        metadata={"min": 0, "help": "training videos sampled for band statistics; 0 = all"},
    )
    progress: bool = field(default=True, metadata={"help": "progress bars"})


@dataclass(frozen=True)
class PredictConfig(Config):
    """Which checkpoint scores which split, and how windows are combined."""

    work: Path = field(metadata={"help": "work folder", "positional": True})
    run: str = field(
        default="audio",
        # --run-name: under torchrun, --run is an ambiguous prefix of torchrun's --run-path.
        metadata={"help": "run name under WORK/runs", "flags": ("--run-name",)},
    )
    checkpoint: str = field(
        default="best", metadata={"help": "best, last, or a path to a .pt checkpoint"}
    )
    split: str = field(default="val", metadata={"help": "split of the manifest to score"})
    aggregation: Aggregation = field(
        default="mean_softmax", metadata={"help": "how window scores become a video score"}
    )
    hop: int = field(
        default=0,
        metadata={
            "help": "frames between window starts (0 = the model's window: no overlap)",
            "min": 0,
            "max": MAX_WINDOW,
        },
    )
    window: int = field(
        default=0,
        metadata={
            "help": "frames per window; 0 = the checkpoint's, -1 = the whole clip as one window "
            "(models with global pooling: cnn14, cnn10, panns, resnet)",
            "min": -1,
            "max": MAX_WINDOW,
        },
    )
    batch_size: int = field(
        default=256, metadata={"help": "windows per forward pass", "min": 1, "max": MAX_BATCH}
    )
    num_workers: int = field(default=0, metadata={"min": 0, "help": "DataLoader worker processes"})
    output: Path | None = field(
        default=None, metadata={"help": "score file (default WORK/scores/audio_SPLIT.npz)"}
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "device"})
    amp: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "mixed precision (auto: bf16 where native)"}
    )
    short_clips: Literal["auto", "repeat", "zeros", "drop"] = field(
        default="auto",
        metadata={
            "help": "clips shorter than one window: repeat (loop), zeros (pad with silence), "
            "drop (leave unscored); auto: the checkpoint's training policy"
        },
    )
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    model_choice: Literal["network", "best", "baseline", "ensemble"] = field(
        default="network",
        metadata={
            "help": "whose scores are written: network (the checkpoint), baseline (log-mel "
            "statistics + logistic regression), ensemble (their calibrated mean of "
            "log-probabilities), or best: the one of the three that does best on the split "
            "that chose best.pt (never the evaluated one); the others are written beside it"
        },
    )
    baseline_max_train: int = field(
        default=20000,
        metadata={
            "help": "fit the baseline on at most this many training videos (seeded); 0 = all",
            "min": 0,
        },
    )


# ---------------------------------------------------------------------------------------------
# What the orchestrator asks of train and predict: their outputs and whether they are done
# (here, not in the stages, so that asking does not import torch).


def train_outputs(cfg: TrainConfig) -> list[Path]:
    """The file a finished training leaves: the run's ``best.pt``."""
    return [WorkDir(cfg.work).checkpoint(cfg.name)]


def train_is_done(cfg: TrainConfig) -> bool:
    """Whether the run's checkpoint is there to be read (an unfinished run resumes itself)."""
    return all(p.exists() for p in train_outputs(cfg))


def train_resumable(cfg: TrainConfig) -> bool:
    """Whether the run folder holds the ``last.pt`` an interrupted training resumes from."""
    return WorkDir(cfg.work).checkpoint(cfg.name, "last").exists()


def train_finished_settings(cfg: TrainConfig) -> TrainConfig | None:
    """The settings of the finished training in the run folder: ``None`` when there is none,
    or its ``metrics.jsonl`` stops before the configured last epoch (a run cut short)."""
    wd = WorkDir(cfg.work)
    try:
        lines = wd.run_metrics(cfg.name).read_text("utf-8").splitlines()
        epochs = [json.loads(ln).get("epoch", 0) for ln in lines]
    except (OSError, ValueError, AttributeError):
        return None
    if not epochs or max(epochs) < cfg.epochs:
        return None
    return finished_run_settings(TrainConfig, wd.run_config(cfg.name), train_outputs(cfg))


def predict_scores(cfg: PredictConfig) -> Path:
    """The score file predict writes: ``output``, else ``WORK/scores/audio_SPLIT.npz``."""
    return Path(cfg.output) if cfg.output else WorkDir(cfg.work).scores(cfg.split)


def predict_outputs(cfg: PredictConfig) -> list[Path]:
    """The file a finished predict leaves: its score file."""
    return [predict_scores(cfg)]


def predict_is_done(cfg: PredictConfig) -> bool:
    """Whether the score file is there to be read."""
    return all(p.exists() for p in predict_outputs(cfg))


def predict_finished_settings(cfg: PredictConfig) -> PredictConfig | None:
    """The settings that wrote the score file in place (``None``: none, or unreadable)."""
    path = ScoreLayout(predict_scores(cfg)).predict_config
    return finished_run_settings(PredictConfig, path, predict_outputs(cfg))


@dataclass(frozen=True)
class EmbedConfig(Config):
    """Which pretrained network embeds which videos, and where the embeddings go."""

    work: Path = field(
        metadata={"help": "work folder (manifest + feature store)", "positional": True}
    )
    model: PretrainedName = field(default="cnn14", metadata={"help": "pretrained network"})
    init: Path | None = field(
        default=None,
        metadata={
            "help": "pretrained checkpoint (required; loaded strictly; ast: a Hugging Face "
            "model folder)"
        },
    )
    name: str = field(default="", metadata={"help": "output WORK/embeddings/NAME (default: model)"})
    width: float = field(
        default=1.0,
        metadata={
            "help": "channel-width multiplier (1.0 = release)",
            "above": 0.0,
            "max": MAX_WIDTH,
        },
    )
    window: int = field(
        default=0,
        metadata={
            "help": "frames per window; 0 = the front end's example length",
            "min": 0,
            "max": MAX_WINDOW,
        },
    )
    hop: int = field(
        default=0,
        metadata={"help": "frames between windows; 0 = the window", "min": 0, "max": MAX_WINDOW},
    )
    per_window: bool = field(
        default=True, metadata={"help": "one row per window (else one row per video: the mean)"}
    )
    splits: tuple[str, ...] = field(
        default=(), metadata={"help": "splits to embed (comma-separated; default all)"}
    )
    batch_size: int = field(
        default=0,
        metadata={
            "help": "windows per forward pass; 0 = auto: 64 on CPU, 512 on CUDA",
            "min": 0,
            "max": MAX_BATCH,
        },
    )
    chunk_videos: int = field(
        default=256,
        metadata={
            "help": "videos per committed chunk (the resume granularity)",
            "min": 1,
            "max": 1 << 20,
        },
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "device"})
    amp: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "mixed precision (auto: bf16 where native)"}
    )
    channels_last: TriState = field(
        default="auto", metadata={"help": CHANNELS_LAST_HELP, "legacy": BOOL_TO_TRI_STATE}
    )
    progress: bool = field(default=True, metadata={"help": "progress bar"})
    force: bool = field(
        default=False,
        metadata={"help": "discard WORK/embeddings/NAME and embed every video again"},
    )
