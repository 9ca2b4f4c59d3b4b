"""The built-in demo: a generated Kinetics-style dataset, a stand-in video model, one full run.

``avfuse demo`` needs no download and no network. It

1. **generates** a small action-recognition dataset, deterministically from a seed
   (:func:`generate_dataset`): ``ROOT/{train,val,heldout}/CLASS/YTID_SSSSSS_EEEEEE.ext``, real
   video files written with PyAV (mostly H.264 + AAC in mp4, some MPEG-4 + AAC, a share of
   VP8 + Opus webm and MPEG-4 + Vorbis mkv; source rates 22.05-48 kHz, mono and stereo), with the
   defects real datasets have: videos without an audio track, unreadable files (random bytes, a
   truncated mp4), clips too short for one 0.96 s audio example (0.3-0.9 s, in a few classes)
   and muted sound tracks (digital silence and -90 dBFS hiss, in a few classes);
2. trains a **stand-in video classifier** (:func:`train_video_baseline`) on the training videos
   and writes its scores for ``val`` and ``heldout`` in an external format (a CSV "wide" table
   whose ids are file names, as a user's own video model would export), so the demo exercises
   the same import path as a Kinetics user's video scores;
3. calls :func:`avfuse.pipeline.run` on that dataset with demo-sized settings and prints where the
   fusion report is.

Why a ``heldout`` split: fusion weights must be chosen on videos the reported figure is not
measured on. The audio model has seen every training video, so its training-set scores are
over-confident; a separate split of labelled videos, scored by both models, is the honest and
simplest choice (k-fold cross-validation on ``val`` is the alternative when no such split
exists; set ``heldout_per_class = 0`` and the fusion stage falls back to it).

Class design. Every class is a (visual signature, sound signature) pair, each drawn with
per-video variation (colours, sizes, speeds, phases, a distractor object, brightness; pitch,
tempo, timbre, a class-independent background sound at a random signal-to-noise ratio). Some
classes share their visual signature and differ only by sound (``playing trumpet`` /
``playing trombone``, ``whistling`` / ``singing``), others share their sound and differ only by
look (``vacuuming floor`` / ``mowing lawn``, ``jogging`` / ``running on treadmill``). So the video
model confuses the first kind, the audio model the second, and fusing them gains on both.

Modules: :mod:`avfuse.demo.synth` (pictures and sounds), :mod:`avfuse.demo.dataset` (plan,
encoding, generation), :mod:`avfuse.demo.baseline` (the stand-in video model),
:mod:`avfuse.demo.runner` (``avfuse demo``).
"""

from avfuse.demo.baseline import (
    FEATURE_SIZE,
    GRID,
    HIST_BINS,
    LinearModel,
    VideoBaselineResult,
    fit_logistic,
    train_video_baseline,
    video_features,
)
from avfuse.demo.dataset import (
    CATALOGUE,
    HISS_DBFS,
    SPLIT_CODES,
    DatasetInfo,
    VideoSpec,
    generate_dataset,
    plan_dataset,
    write_video,
)
from avfuse.demo.runner import DemoConfig, DemoResult, demo, demo_run_config
from avfuse.demo.synth import HARD_AUDIO_SHARE, HARD_VIDEO_SHARE, render, synthesize_audio

__all__ = [
    "CATALOGUE",
    "FEATURE_SIZE",
    "GRID",
    "HARD_AUDIO_SHARE",
    "HARD_VIDEO_SHARE",
    "HISS_DBFS",
    "HIST_BINS",
    "SPLIT_CODES",
    "DatasetInfo",
    "DemoConfig",
    "DemoResult",
    "LinearModel",
    "VideoBaselineResult",
    "VideoSpec",
    "demo",
    "demo_run_config",
    "fit_logistic",
    "generate_dataset",
    "plan_dataset",
    "render",
    "synthesize_audio",
    "train_video_baseline",
    "video_features",
    "write_video",
]
