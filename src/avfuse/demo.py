"""The built-in demo: a generated Kinetics-style dataset, a stand-in video model, one full run.

``avfuse demo`` needs no download and no network. It

1. **generates** a small action-recognition dataset, deterministically from a seed
   (:func:`generate_dataset`): ``ROOT/{train,val,heldout}/CLASS/YTID_SSSSSS_EEEEEE.ext``, real
   video files written with PyAV (mostly H.264 + AAC in mp4, some MPEG-4 + AAC, a share of
   VP8 + Opus webm and MPEG-4 + Vorbis mkv; source rates 22.05-48 kHz, mono and stereo), with the
   defects real datasets have: videos without an audio track, unreadable files (random bytes, a
   truncated mp4) and clips too short for one 0.96 s audio example;
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
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avfuse.config import Config
from avfuse.io import atomic_write, read_json, write_json
from avfuse.parallel import batched, make_executor, map_batches

log = logging.getLogger(__name__)

SPLIT_CODES = {"train": 0, "val": 1, "heldout": 2}
# Shares of clips whose picture (sound) is hard to recognise, drawn independently: each model
# then also errs outside its blind pairs, and fusion can rescue one modality with the other.
HARD_VIDEO_SHARE = 0.2
HARD_AUDIO_SHARE = 0.2
DATASET_INFO = "demo_dataset.json"
# Videos per class and split when no ``per_split`` is given.
_PER_SPLIT = {"train": 30, "val": 10, "heldout": 10}

# name, visual signature, sound signature. Order matters: a dataset with N classes uses the
# first N; a class's clip names and content seeds do not depend on N (containers and defects,
# assigned per split, may).
CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("playing trumpet", "brass", "brass_high"),
    ("playing trombone", "brass", "brass_low"),
    ("vacuuming floor", "vacuum", "engine"),
    ("mowing lawn", "lawn", "engine"),
    ("whistling", "face", "whistle"),
    ("singing", "face", "voice"),
    ("jogging", "outdoor_run", "footsteps"),
    ("running on treadmill", "treadmill", "footsteps"),
    ("drumming", "drums", "drums"),
    ("ringing bell", "bell", "bell"),
    ("dribbling basketball", "court", "bounce"),
    ("typing", "keyboard", "keys"),
)


# ----------------------------------------------------------------------------------------------
# Plan: which files, with which defects


@dataclass(frozen=True)
class VideoSpec:
    """One file of the demo dataset; everything needed to write it in a worker."""

    split: str
    label: str
    class_pos: int
    index: int
    name: str  # file name, YTID_SSSSSS_EEEEEE.ext
    container: str  # mp4 | webm | mkv
    vcodec: str
    acodec: str | None  # None: no audio track
    sample_rate: int
    channels: int
    duration: float
    defect: str  # "" | no_audio | short | garbage | truncated
    seed: tuple[int, ...]
    size: int
    fps: int

    @property
    def rel(self) -> str:
        return f"{self.split}/{self.label}/{self.name}"


_YT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _youtube_name(rng: np.random.Generator) -> str:
    ytid = "".join(_YT_ALPHABET[i] for i in rng.integers(0, 64, 11))
    start = int(rng.integers(0, 300))
    return f"{ytid}_{start:06d}_{start + 10:06d}"


def plan_dataset(
    seed: int = 0,
    classes: int = 12,
    per_split: dict[str, int] | None = None,
    seconds: float = 3.5,
    size: int = 64,
    fps: int = 10,
    no_audio_fraction: float = 0.03,
    short_fraction: float = 0.03,
    unreadable: int = 2,
) -> list[VideoSpec]:
    """Every file of the dataset, deterministic in the arguments.

    ``per_split``: videos per class for each split (default train 30, val 10, heldout 10).
    Each split gets ``max(1, round(fraction * n))`` videos without audio and as many short clips
    (0.4-0.9 s); ``unreadable`` training files are random bytes or a truncated mp4.
    """
    if not 1 <= classes <= len(CATALOGUE):
        raise ValueError(f"classes must be between 1 and {len(CATALOGUE)}, got {classes}")
    per_split = per_split if per_split is not None else dict(_PER_SPLIT)
    specs: list[VideoSpec] = []
    ordinal = 0
    for split, n_per in per_split.items():
        if n_per <= 0:
            continue
        code = SPLIT_CODES.get(split, 10 + sum(map(ord, split)))
        slots = [(c, i) for c in range(classes) for i in range(n_per)]
        pick = np.random.default_rng([seed, code, 999]).permutation(len(slots)).tolist()
        n_def = len(slots)
        k_na = max(1, round(no_audio_fraction * n_def)) if no_audio_fraction > 0 else 0
        k_sh = max(1, round(short_fraction * n_def)) if short_fraction > 0 else 0
        k_un = unreadable if split == "train" else 0
        defects: dict[tuple[int, int], str] = {}
        order = iter(pick)
        for kind, k in (("garbage", min(k_un, 1)), ("truncated", k_un - min(k_un, 1))):
            for _ in range(k):
                defects[slots[next(order)]] = kind
        for kind, k in (("no_audio", k_na), ("short", k_sh)):
            for _ in range(k):
                nxt = next(order, None)
                if nxt is not None:
                    defects[slots[nxt]] = kind
        for c, i in slots:
            label = CATALOGUE[c][0]
            rng = np.random.default_rng([seed, code, c, i])
            stem = _youtube_name(rng)  # drawn first: independent of container and defects
            defect = defects.get((c, i), "")
            # A fixed rotation (not chance) so that even a small dataset holds every container.
            slot = ordinal % 10
            ordinal += 1
            if slot == 3:
                container, vcodec, acodec, rate = "webm", "libvpx", "libopus", 48000
            elif slot == 7:
                container, vcodec, acodec, rate = "mkv", "mpeg4", "vorbis", 44100
            else:
                container, vcodec, acodec = "mp4", "mpeg4" if slot == 5 else "libx264", "aac"
                rate = int(rng.choice([44100, 48000, 22050, 32000]))
            if defect in ("garbage", "truncated"):
                container, vcodec, acodec, rate = "mp4", "libx264", "aac", 44100
            channels = int(rng.choice([1, 1, 2]))
            if acodec == "vorbis":  # FFmpeg's own Vorbis encoder writes stereo only
                channels = 2
            if defect == "short":
                duration = float(rng.uniform(0.4, 0.9))
            else:
                duration = float(seconds + rng.uniform(-0.5, 0.5))
            specs.append(
                VideoSpec(
                    split=split,
                    label=label,
                    class_pos=c,
                    index=i,
                    name=f"{stem}.{container}",
                    container=container,
                    vcodec=vcodec,
                    acodec=None if defect == "no_audio" else acodec,
                    sample_rate=rate,
                    channels=channels,
                    duration=round(duration, 3),
                    defect=defect,
                    seed=(seed, code, c, i, 1),
                    size=size,
                    fps=fps,
                )
            )
    return specs


# ----------------------------------------------------------------------------------------------
# Pictures: (frames, H, W, 3) uint8, one renderer per visual signature


class _Canvas:
    def __init__(self, size: int) -> None:
        ax = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.yy, self.xx = np.meshgrid(ax, ax, indexing="ij")
        self.size = size

    def gradient(
        self, top: np.ndarray, bottom: np.ndarray, split: float | None = None
    ) -> np.ndarray:
        # split: a horizon, two flat areas instead of a gradient
        w = self.yy[..., None] if split is None else (self.yy[..., None] > split).astype(np.float32)
        return (1 - w) * top + w * bottom

    def disk(self, img: np.ndarray, cx: float, cy: float, r: float, col: np.ndarray) -> None:
        img[(self.xx - cx) ** 2 + (self.yy - cy) ** 2 <= r * r] = col

    def ellipse(
        self, img: np.ndarray, cx: float, cy: float, rx: float, ry: float, col: np.ndarray
    ) -> None:
        img[((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2 <= 1] = col

    def rect(
        self, img: np.ndarray, x0: float, y0: float, x1: float, y1: float, col: np.ndarray
    ) -> None:
        img[(self.xx >= x0) & (self.xx <= x1) & (self.yy >= y0) & (self.yy <= y1)] = col


def _col(
    rng: np.random.Generator, base: Sequence[float] | np.ndarray, jitter: float = 18.0
) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, jitter, 3), 0, 255)


def _render(visual: str, rng: np.random.Generator, n: int, fps: int, size: int) -> np.ndarray:
    cv = _Canvas(size)
    t = np.arange(n) / fps
    frames = np.empty((n, size, size, 3), np.float32)
    u = rng.uniform
    phase = u(0, 2 * np.pi)
    shirt = _col(rng, rng.uniform(40, 220, 3), 0)
    skin = _col(rng, (225, 180, 145), 15)

    def figure(img: np.ndarray, x: float, y: float) -> None:
        cv.rect(img, x - 0.05, y, x + 0.05, y + 0.28, shirt)
        cv.disk(img, x, y - 0.06, 0.06, skin)

    if visual == "brass":
        bg = cv.gradient(_col(rng, (110, 35, 40)), _col(rng, (60, 30, 25)))
        gold = _col(rng, (220, 180, 60))
        f, amp = u(0.4, 0.8), u(0.03, 0.07)
        for k in range(n):
            img = bg.copy()
            dy = amp * np.sin(2 * np.pi * f * t[k] + phase)
            cv.disk(img, 0.17, 0.45 + dy, 0.12, skin)
            cv.rect(img, 0.25, 0.47 + dy, 0.68, 0.53 + dy, gold)
            cv.disk(img, 0.76, 0.5 + dy, 0.11, gold)
            frames[k] = img
    elif visual == "face":
        bg = cv.gradient(_col(rng, (205, 195, 170)), _col(rng, (185, 175, 150)))
        f, sway = u(1.5, 3.0), u(0.01, 0.04)
        for k in range(n):
            img = bg.copy()
            dx = sway * np.sin(2 * np.pi * 0.5 * t[k] + phase)
            cv.disk(img, 0.5 + dx, 0.5, 0.3, skin)
            cv.disk(img, 0.4 + dx, 0.42, 0.035, np.zeros(3, np.float32))
            cv.disk(img, 0.6 + dx, 0.42, 0.035, np.zeros(3, np.float32))
            ry = 0.035 + 0.025 * np.sin(2 * np.pi * f * t[k] + phase)
            cv.ellipse(img, 0.5 + dx, 0.64, 0.08, max(ry, 0.01), np.array([90, 20, 30], np.float32))
            frames[k] = img
    elif visual in ("vacuum", "lawn"):
        if visual == "vacuum":
            bg = cv.gradient(_col(rng, (200, 200, 210)), _col(rng, (120, 125, 150)), 0.45)
            body, f = _col(rng, (60, 60, 70)), u(0.5, 0.9)
            xs = 0.5 + 0.25 * np.sin(2 * np.pi * f * t + phase)
        else:
            bg = cv.gradient(_col(rng, (120, 170, 230)), _col(rng, (60, 160, 60)), 0.3)
            body, speed = _col(rng, (200, 40, 30)), u(0.1, 0.2)
            xs = 0.15 + (u(0, 0.6) + speed * t) % 0.7
        for k in range(n):
            img = bg.copy()
            cv.rect(img, xs[k] - 0.1, 0.7, xs[k] + 0.1, 0.82, body)
            cv.rect(img, xs[k] + 0.06, 0.4, xs[k] + 0.09, 0.7, body * 0.6)
            frames[k] = img
    elif visual in ("outdoor_run", "treadmill"):
        f, amp = u(2.6, 3.2), u(0.02, 0.04)
        if visual == "outdoor_run":
            bg = cv.gradient(_col(rng, (130, 180, 235)), _col(rng, (110, 140, 90)), 0.5)
            xs = 0.1 + (u(0, 0.8) + u(0.15, 0.25) * t) % 0.8
        else:
            bg = cv.gradient(_col(rng, (150, 150, 150)), _col(rng, (120, 115, 110)), 0.6)
            xs = np.full(n, 0.5 + u(-0.1, 0.1))
        for k in range(n):
            img = bg.copy()
            if visual == "treadmill":
                cv.rect(img, 0.2, 0.8, 0.8, 0.88, np.array([20, 20, 20], np.float32))
                stripe = (
                    (0.2 + (0.6 * t[k]) % 0.6) if k % 2 == 0 else 0.2 + (0.6 * t[k] + 0.3) % 0.6
                )
                cv.rect(img, stripe, 0.8, stripe + 0.03, 0.88, np.array([90, 90, 90], np.float32))
            y = 0.5 - amp * abs(np.sin(np.pi * f * t[k] + phase))
            figure(img, xs[k], y)
            frames[k] = img
    elif visual == "drums":
        bg = cv.gradient(_col(rng, (30, 30, 45)), _col(rng, (15, 15, 20)))
        wood, f = _col(rng, (140, 80, 40)), u(3.0, 5.0)
        for k in range(n):
            img = bg.copy()
            cv.ellipse(img, 0.3, 0.75, 0.16, 0.08, wood)
            cv.ellipse(img, 0.7, 0.75, 0.16, 0.08, wood)
            for j, x in enumerate((0.3, 0.7)):
                h = 0.12 * abs(np.sin(np.pi * f * t[k] + phase + j * np.pi / 2))
                cv.rect(img, x - 0.02, 0.45 - h, x + 0.02, 0.65 - h, np.full(3, 235, np.float32))
            frames[k] = img
    elif visual == "bell":
        bg = cv.gradient(_col(rng, (235, 230, 215)), _col(rng, (200, 195, 180)))
        gold, f, amp = _col(rng, (200, 160, 40)), u(0.8, 1.2), u(0.1, 0.18)
        for k in range(n):
            img = bg.copy()
            dx = amp * np.sin(2 * np.pi * f * t[k] + phase)
            cv.rect(img, 0.49, 0.0, 0.51, 0.35, np.array([80, 60, 40], np.float32))
            cv.disk(img, 0.5 + dx, 0.45, 0.12, gold)
            cv.rect(img, 0.36 + dx, 0.45, 0.64 + dx, 0.6, gold)
            frames[k] = img
    elif visual == "court":
        bg = cv.gradient(_col(rng, (50, 80, 160)), _col(rng, (40, 70, 140)))
        ball, f = _col(rng, (240, 120, 30), 10), u(1.8, 2.2)
        bx = u(0.35, 0.65)
        for k in range(n):
            img = bg.copy()
            cv.rect(img, 0.0, 0.9, 1.0, 0.93, np.full(3, 240, np.float32))
            figure(img, bx - 0.18, 0.45)
            cv.disk(img, bx, 0.88 - 0.4 * abs(np.sin(np.pi * f * t[k] + phase)), 0.07, ball)
            frames[k] = img
    elif visual == "keyboard":
        bg = cv.gradient(_col(rng, (70, 55, 45)), _col(rng, (50, 40, 30)))
        cv.rect(bg, 0.25, 0.08, 0.75, 0.4, _col(rng, (60, 90, 160)))
        keys = [(0.12 + 0.08 * i, 0.6 + 0.08 * j) for i in range(10) for j in range(3)]
        for x, y in keys:
            cv.rect(bg, x, y, x + 0.06, y + 0.06, np.full(3, 170, np.float32))
        rate = u(8, 14) / fps
        for k in range(n):
            img = bg.copy()
            for _ in range(rng.poisson(rate)):
                x, y = keys[int(rng.integers(len(keys)))]
                cv.rect(img, x, y, x + 0.06, y + 0.06, np.full(3, 255, np.float32))
            frames[k] = img
    else:  # pragma: no cover - catalogue and renderers are defined together
        raise ValueError(visual)

    # Per-video nuisances: a drifting distractor, brightness, fixed texture, sensor noise.
    if rng.random() < 0.5:
        col, r = rng.uniform(0, 255, 3).astype(np.float32), u(0.05, 0.1)
        x0, y0, vx, vy = u(0, 1), u(0, 1), u(-0.2, 0.2), u(-0.2, 0.2)
        for k in range(n):
            cv.disk(frames[k], (x0 + vx * t[k]) % 1, (y0 + vy * t[k]) % 1, r, col)
    frames *= u(0.75, 1.2)
    if rng.random() < HARD_VIDEO_SHARE:  # a bad camera: dark, colour cast, grainy, a big occluder
        frames *= u(0.35, 0.6) * rng.uniform(0.6, 1.4, 3).astype(np.float32)
        frames += rng.normal(0, 12, frames.shape).astype(np.float32)
        col = rng.uniform(0, 255, 3).astype(np.float32)
        x0, y0, vx = u(0.2, 0.8), u(0.2, 0.8), u(-0.3, 0.3)
        for k in range(n):
            cv.disk(frames[k], (x0 + vx * t[k]) % 1, y0, u(0.18, 0.25), col)
    frames += rng.normal(0, 6, (1, size, size, 3)).astype(np.float32)
    frames += rng.normal(0, 3, frames.shape).astype(np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sounds: (samples,) float32 at the source rate, one synthesiser per sound signature


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.std(x) + 1e-9)


def _harmonics(
    f0: np.ndarray, sr: int, amps: Callable[[np.ndarray, int], Any], max_k: int = 24
) -> np.ndarray:
    """Sum of harmonics k*f0(t) with amplitude amps(k*f0, k) (formants, roll-off), below Nyquist."""
    ph = 2 * np.pi * np.cumsum(f0) / sr
    out = np.zeros_like(f0)
    for k in range(1, max_k + 1):
        fk = k * f0
        if fk.min() >= 0.45 * sr:
            break
        a = amps(fk, k) * (fk < 0.45 * sr)
        out += a * np.sin(k * ph)
    return out


def _notes(
    rng: np.random.Generator, n: int, sr: int, scale: np.ndarray, lo: float, hi: float
) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-constant f0 (notes of ``scale``) and a per-note attack/release envelope."""
    f0 = np.empty(n)
    env = np.empty(n)
    pos = 0
    while pos < n:
        ln = int(rng.uniform(lo, hi) * sr)
        seg = slice(pos, min(n, pos + ln))
        m = seg.stop - seg.start
        f0[seg] = rng.choice(scale)
        ramp = np.minimum(1.0, np.minimum(np.arange(m), m - np.arange(m)) / (0.02 * sr))
        env[seg] = ramp
        pos += ln
    return f0, env


def _impacts(
    rng: np.random.Generator, n: int, sr: int, times: np.ndarray, make: Callable[[], np.ndarray]
) -> np.ndarray:
    out = np.zeros(n)
    for t0 in times:
        s = int(t0 * sr)
        if 0 <= s < n:
            hit = make()
            m = min(len(hit), n - s)
            out[s : s + m] += hit[:m]
    return out


def _decay_tone(sr: int, f: float, tau: float, dur: float, sweep: float = 0.0) -> np.ndarray:
    tt = np.arange(int(dur * sr)) / sr
    freq = f * (1 + sweep * np.exp(-tt / 0.02))
    return np.exp(-tt / tau) * np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _synth(sound: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    u = rng.uniform
    pent = np.array([1, 9 / 8, 5 / 4, 3 / 2, 5 / 3, 2.0])
    if sound == "brass_high" or sound == "brass_low":
        base = u(392, 523) if sound == "brass_high" else u(98, 131)
        f0, env = _notes(rng, n, sr, base * pent, 0.25, 0.6)
        if sound == "brass_low":  # slide between notes
            from scipy.ndimage import uniform_filter1d

            f0 = uniform_filter1d(f0, int(0.06 * sr), mode="nearest")
        roll = 0.6 if sound == "brass_high" else 1.0
        x = env * _harmonics(f0, sr, lambda fk, k: float(k) ** -roll)
    elif sound == "whistle":
        f0, env = _notes(rng, n, sr, u(1000, 1400) * pent, 0.2, 0.5)
        f0 = f0 * (1 + 0.02 * np.sin(2 * np.pi * u(5, 6.5) * t))
        x = env * np.sin(2 * np.pi * np.cumsum(f0) / sr) + 0.05 * _band_noise(
            rng, n, sr, 1000, 6000
        )
    elif sound == "voice":
        f0, env = _notes(rng, n, sr, u(160, 260) * pent, 0.3, 0.7)
        f0 = f0 * (1 + 0.03 * np.sin(2 * np.pi * u(5, 6.5) * t))
        f1, f2 = u(500, 800), u(1000, 2000)

        def formants(fk: np.ndarray, k: int) -> np.ndarray:
            return (
                np.exp(-(((fk - f1) / 150) ** 2)) + 0.6 * np.exp(-(((fk - f2) / 250) ** 2)) + 0.05
            )

        x = env * _harmonics(f0, sr, formants)
    elif sound == "engine":
        f0 = u(80, 120) * (1 + 0.04 * np.sin(2 * np.pi * u(0.2, 0.6) * t + u(0, 6)))
        x = _harmonics(f0, sr, lambda fk, k: 80 / fk) + 0.5 * _band_noise(rng, n, sr, 200, 3000)
    elif sound == "footsteps":
        rate = u(2.6, 3.2)
        times = np.arange(u(0, 0.3), n / sr, 1 / rate)
        times = times + rng.normal(0, 0.015, len(times))
        f = u(60, 100)

        def step() -> np.ndarray:
            click = rng.standard_normal(int(0.03 * sr)) * np.exp(
                -np.arange(int(0.03 * sr)) / (0.005 * sr)
            )
            hit = _decay_tone(sr, f, 0.03, 0.15)
            hit[: len(click)] += 0.3 * click
            return hit

        x = _impacts(rng, n, sr, times, step)
    elif sound == "drums":
        beat = 60 / u(100, 140)
        x = np.zeros(n)
        for j, t0 in enumerate(np.arange(u(0, 0.2), n / sr, beat / 2)):
            s = int(t0 * sr)
            if j % 4 == 0:
                hit = _decay_tone(sr, u(50, 65), 0.12, 0.4, sweep=1.5)
            elif j % 4 == 2:
                m = int(0.2 * sr)
                hit = rng.standard_normal(m) * np.exp(-np.arange(m) / (0.04 * sr)) * 0.6
                hit += 0.5 * _decay_tone(sr, 180, 0.05, 0.2)
            else:
                m = int(0.05 * sr)
                hit = _band_noise(rng, m, sr, 6000, 0.45 * sr) * np.exp(-np.arange(m) / (0.01 * sr))
                hit *= 0.3
            m = min(len(hit), n - s)
            if m > 0:
                x[s : s + m] += hit[:m]
    elif sound == "bell":
        f = u(450, 900)
        x = np.zeros(n)
        for t0 in np.sort(rng.uniform(0, max(0.01, n / sr - 0.3), int(rng.integers(1, 4)))):
            s = int(t0 * sr)
            tt = np.arange(n - s) / sr
            for ratio, a, tau in ((1, 1, 1.2), (2.0, 0.6, 0.8), (2.76, 0.5, 0.6), (5.4, 0.3, 0.3)):
                if f * ratio < 0.45 * sr:
                    x[s:] += a * np.exp(-tt / tau) * np.sin(2 * np.pi * f * ratio * tt)
    elif sound == "bounce":
        rate, f = u(1.8, 2.2), u(150, 250)
        times = np.arange(u(0, 0.3), n / sr, 1 / rate)
        x = _impacts(rng, n, sr, times, lambda: _decay_tone(sr, f, 0.04, 0.2, sweep=0.3))
        for t0 in rng.uniform(0, n / sr, int(rng.integers(0, 3))):  # sneaker squeaks
            s, m = int(t0 * sr), int(0.08 * sr)
            m = min(m, n - s)
            if m > 0:
                tt = np.arange(m) / sr
                x[s : s + m] += 0.3 * np.sin(2 * np.pi * (2200 * tt + 4000 * tt**2))
    elif sound == "keys":
        times = np.cumsum(rng.exponential(1 / u(8, 14), int(n / sr * 20) + 5))
        res = u(3000, 5000)

        def click() -> np.ndarray:
            m = int(0.02 * sr)
            c = _band_noise(rng, m, sr, 2000, 0.45 * sr) * np.exp(-np.arange(m) / (0.003 * sr))
            return c + 0.5 * _decay_tone(sr, min(res, 0.4 * sr), 0.004, 0.02)

        x = _impacts(rng, n, sr, times, click)
    else:  # pragma: no cover
        raise ValueError(sound)
    return np.asarray(x, dtype=np.float64)


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Class-independent background: pink noise, mains hum, wind, distant babble or silence."""
    kind = rng.choice(["pink", "hum", "wind", "babble", "none"])
    t = np.arange(n) / sr
    if kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sr)
        spec /= np.sqrt(np.maximum(f, 20.0))
        x = np.fft.irfft(spec, n)
    elif kind == "hum":
        mains = rng.choice([50.0, 60.0])
        x = sum(np.sin(2 * np.pi * mains * k * t) / k for k in (1, 2, 3, 5))
        x = x + 0.1 * rng.standard_normal(n)
    elif kind == "wind":
        x = _band_noise(rng, n, sr, 20, 400) * (
            1 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.2, 0.7) * t)
        )
    elif kind == "babble":
        x = np.zeros(n)
        for _ in range(4):
            f0 = rng.uniform(100, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(2, 4) * t))
            x += _harmonics(f0, sr, lambda fk, k: 1 / (1 + fk / 500), max_k=8)
        x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2)
    else:
        return np.zeros(n)
    return x / (np.std(x) + 1e-9)


def synthesize_audio(sound: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One class sound plus a random background. ``-> (samples,)`` float32.

    The background is 5-25 dB below the class sound, except in a share of recordings
    (``HARD_AUDIO_SHARE``) where it drowns it (-10 to 0 dB), as wind or a crowd does.
    """
    x = _synth(sound, rng, n, sr)
    x = x / (np.std(x) + 1e-9)
    snr_db = rng.uniform(5, 25) if rng.random() >= HARD_AUDIO_SHARE else rng.uniform(-10, 0)
    x = x + _background(rng, n, sr) * 10 ** (-snr_db / 20)
    peak = np.max(np.abs(x)) + 1e-9
    return (x / peak * 10 ** (rng.uniform(-12, -1) / 20)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Writing files


def _encode(path: Path, spec: VideoSpec, frames: np.ndarray, audio: np.ndarray | None) -> None:
    """Write ``frames (T, H, W, 3) uint8`` and ``audio (channels, samples)`` float32 with PyAV."""
    import av

    with av.open(
        str(path), "w", format={"mkv": "matroska"}.get(spec.container, spec.container)
    ) as out:
        vs: Any = out.add_stream(spec.vcodec, rate=spec.fps)
        vs.width = vs.height = spec.size
        vs.pix_fmt = "yuv420p"
        # One thread: generation is parallel over processes already, and the output is then
        # identical from run to run.
        vs.codec_context.thread_count = 1
        if spec.vcodec == "libx264":
            vs.codec_context.options = {
                "preset": "veryfast",
                # mbtree off: with it, x264 output was seen to vary between identical runs.
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0",
            }
        ast: Any = None
        if audio is not None and spec.acodec:
            ast = out.add_stream(spec.acodec, rate=spec.sample_rate)
            ast.layout = "stereo" if spec.channels == 2 else "mono"
            if spec.acodec == "vorbis":  # FFmpeg's own Vorbis encoder is flagged experimental
                ast.codec_context.options = {"strict": "experimental"}
            elif spec.acodec == "aac":  # 5-7x faster than the default "twoloop" search
                ast.codec_context.options = {"aac_coder": "fast"}
        blk, a_pos = 1024, 0
        n_audio = 0 if audio is None else audio.shape[1]
        for i, img in enumerate(frames):
            # Converted here, not by the encoder's implicit conversion: with that, x264 output
            # was seen to vary from run to run.
            vf = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            out.mux(vs.encode(vf))
            # Interleave audio up to the end of this frame, as a camera would.
            while (
                ast is not None
                and audio is not None
                and a_pos < n_audio
                and a_pos <= (i + 1) * spec.sample_rate / spec.fps
            ):
                chunk = np.ascontiguousarray(audio[:, a_pos : a_pos + blk])
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=ast.layout.name)
                af.sample_rate = spec.sample_rate
                af.pts = a_pos
                out.mux(ast.encode(af))
                a_pos += blk
        out.mux(vs.encode(None))
        if ast is not None:
            out.mux(ast.encode(None))


def write_video(spec: VideoSpec, root: Path) -> Path:
    """Render, synthesise and encode one file of the dataset (atomically). Returns its path."""
    path = root / spec.rel
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(spec.seed))
    if spec.defect == "garbage":
        with atomic_write(path) as tmp:
            tmp.write_bytes(rng.integers(0, 256, 30_000, dtype=np.uint8).tobytes())
        return path
    _, visual, sound = CATALOGUE[spec.class_pos]
    n_frames = max(1, round(spec.duration * spec.fps))
    frames = _render(visual, rng, n_frames, spec.fps, spec.size)
    audio = None
    if spec.acodec is not None:
        n = round(n_frames / spec.fps * spec.sample_rate)
        mono = synthesize_audio(sound, rng, n, spec.sample_rate)
        if spec.channels == 2:  # a slightly different mix per side, as a real stereo recording
            g = rng.uniform(0.7, 1.0, 2)[:, None].astype(np.float32)
            audio = mono[None, :] * g
        else:
            audio = mono[None, :]
    with atomic_write(path) as tmp:
        _encode(tmp, spec, frames, audio)
        if spec.defect == "truncated":
            # The mp4 index (moov) is written last: cutting the file leaves it undecodable.
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) * 2 // 5])
    return path


def _executor(
    executor: Executor | None, num_workers: int | None
) -> contextlib.AbstractContextManager[Executor]:
    """The caller's executor as is, or a fresh one of ``num_workers`` closed afterwards."""
    return contextlib.nullcontext(executor) if executor is not None else make_executor(num_workers)


def _write_batch(batch: list[tuple[VideoSpec, str]]) -> list[str]:
    return [str(write_video(spec, Path(root))) for spec, root in batch]


@dataclass
class DatasetInfo:
    root: Path
    specs: list[VideoSpec]
    generated: int  # files written by this call (0 when an existing dataset was reused)
    settings: dict[str, Any] = field(default_factory=dict)  # as recorded in demo_dataset.json

    def count(self, defect: str, split: str | None = None) -> int:
        return sum(1 for s in self.specs if s.defect == defect and split in (None, s.split))

    def summary(self) -> str:
        splits = sorted({s.split for s in self.specs}, key=lambda x: SPLIT_CODES.get(x, 9))
        per = ", ".join(f"{sp} {sum(s.split == sp for s in self.specs)}" for sp in splits)
        defects = ", ".join(
            f"{d} {self.count(d)}" for d in ("no_audio", "short", "garbage", "truncated")
        )
        n_cls = len({s.label for s in self.specs})
        return f"demo dataset {self.root}: {n_cls} classes; videos: {per}; defects: {defects}"


def generate_dataset(
    root: str | Path,
    seed: int = 0,
    classes: int = 12,
    per_split: dict[str, int] | None = None,
    seconds: float = 3.5,
    size: int = 64,
    fps: int = 10,
    no_audio_fraction: float = 0.03,
    short_fraction: float = 0.03,
    unreadable: int = 2,
    executor: Executor | None = None,
    num_workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Write the demo dataset under ``root`` (see the module docstring).

    Deterministic: the same arguments give the same files (same names, same decoded audio).
    Skipped when ``root/demo_dataset.json`` records the same arguments and every file exists;
    files left by a killed run are finished, not rewritten.
    """
    root = Path(root)
    specs = plan_dataset(
        seed, classes, per_split, seconds, size, fps, no_audio_fraction, short_fraction, unreadable
    )
    settings = {
        "seed": seed,
        "classes": classes,
        "per_split": per_split or dict(_PER_SPLIT),
        "seconds": seconds,
        "size": size,
        "fps": fps,
        "no_audio_fraction": no_audio_fraction,
        "short_fraction": short_fraction,
        "unreadable": unreadable,
        "generator": 7,  # bump when the generator's output changes
    }
    info_path = root / DATASET_INFO
    old = None
    if info_path.exists() and not force:
        old = read_json(info_path)
        if old.get("settings") != settings:
            raise ValueError(
                f"{root} holds a demo dataset made with other settings ({old.get('settings')}); "
                "use another folder or force (avfuse demo --force)"
            )
    elif force and info_path.exists():
        shutil.rmtree(root)  # only a folder the generator made (it holds demo_dataset.json)
    todo = [s for s in specs if not (root / s.rel).exists()]
    if todo:
        batches = batched([(s, str(root)) for s in todo], 8)
        with _executor(executor, num_workers) as ex:
            for _ in map_batches(_write_batch, batches, ex, desc="generate", progress=progress):
                pass
    files = [
        {"video": s.rel, "defect": s.defect, "audio": s.acodec or "", "duration": s.duration}
        for s in specs
    ]
    info = {"settings": settings, "files": files}
    if todo or old != info:
        write_json(info_path, info)
    return DatasetInfo(root, specs, len(todo), settings)


# ----------------------------------------------------------------------------------------------
# The stand-in video model
#
# A user brings scores from their own video network (TSN, SlowFast, VideoMAE, ...). The demo
# has none, so it trains the simplest honest substitute: hand-made appearance and motion
# features from a few decoded frames and a multinomial logistic regression. It is deliberately
# weak on classes that differ only by sound, as a real video model would be.

FEATURE_SIZE = 48  # frames are resized to this square before features are taken
GRID = 4  # regions per side for colour and motion statistics
HIST_BINS = 8


def video_features(path: str | Path, max_frames: int = 16) -> np.ndarray:
    """Appearance and motion features of one video. ``-> (D,)`` float32, D = 88.

    Per region of a 4x4 grid: mean colour (48) and mean absolute frame difference (16);
    for the whole clip: an 8-bin histogram per colour channel (24). Raises on an unreadable file.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [
            f.to_ndarray(format="rgb24", width=FEATURE_SIZE, height=FEATURE_SIZE)
            for f in container.decode(stream)
        ]
    if not frames:
        raise ValueError("no decodable video frames")
    if len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    x = np.stack(frames).astype(np.float32) / 255.0  # (T, S, S, 3)
    t, s = x.shape[0], FEATURE_SIZE
    cell = s // GRID
    blocks = x[:, : cell * GRID, : cell * GRID].reshape(t, GRID, cell, GRID, cell, 3)
    colour = blocks.mean(axis=(0, 2, 4)).reshape(-1)
    gray = x.mean(axis=3)
    diff = np.abs(np.diff(gray, axis=0)) if t > 1 else np.zeros((1, s, s), np.float32)
    motion = (
        diff[:, : cell * GRID, : cell * GRID]
        .reshape(-1, GRID, cell, GRID, cell)
        .mean(axis=(0, 2, 4))
    ).reshape(-1) * 10.0
    hist = np.concatenate(
        [
            np.histogram(x[..., c], bins=HIST_BINS, range=(0, 1))[0] / x[..., c].size
            for c in range(3)
        ]
    )
    return np.concatenate([colour, motion, hist]).astype(np.float32)


def _features_batch(batch: list[tuple[str, str]]) -> list[tuple[str, np.ndarray | None, str]]:
    out: list[tuple[str, np.ndarray | None, str]] = []
    for vid, path in batch:
        try:
            out.append((vid, video_features(path), ""))
        except Exception as exc:  # any decoder error: this video gets no video score
            out.append((vid, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    return out


@dataclass
class LinearModel:
    """Multinomial logistic regression on standardised features."""

    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, D) -> (N, C)``."""
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def save(self, path: Path) -> None:
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                classes=np.asarray(self.classes),
                mean=self.mean,
                std=self.std,
                weight=self.weight,
                bias=self.bias,
            )


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: list[str], l2: float = 1e-2) -> LinearModel:
    """Fit softmax regression ``(N, D), (N,) -> LinearModel`` with L-BFGS and an L2 penalty."""
    from scipy.optimize import minimize

    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    z = (x - mean) / std
    n, d = z.shape
    c = len(classes)
    onehot = np.zeros((n, c))
    onehot[np.arange(n), y] = 1

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * c].reshape(d, c)
        b = theta[d * c :]
        logit = z @ w + b
        logit -= logit.max(axis=1, keepdims=True)
        logp = logit - np.log(np.exp(logit).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        value = -(onehot * logp).sum() / n + 0.5 * l2 * (w * w).sum()
        g = (p - onehot) / n
        grad = np.concatenate([(z.T @ g + l2 * w).ravel(), g.sum(axis=0)])
        return float(value), grad

    res = minimize(loss, np.zeros(d * c + c), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    theta = res.x
    return LinearModel(
        list(classes), mean, std, theta[: d * c].reshape(d, c), theta[d * c :].copy()
    )


@dataclass
class VideoBaselineResult:
    model_path: Path
    score_files: dict[str, Path]
    accuracy: dict[str, float]  # top-1 per scored split, on the videos it could decode
    failed: dict[str, str]  # video_id -> reason, for videos the baseline could not decode

    def summary(self) -> str:
        acc = ", ".join(f"{k} {v:.1%}" for k, v in self.accuracy.items())
        return (
            f"video baseline (stand-in video model): top-1 {acc}; "
            f"{len(self.failed)} undecodable videos; scores in "
            + ", ".join(str(p) for p in self.score_files.values())
        )


def train_video_baseline(
    root: str | Path,
    out: str | Path,
    classes: list[str] | None = None,
    train_split: str = "train",
    score_splits: Sequence[str] = ("val", "heldout"),
    executor: Executor | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> VideoBaselineResult:
    """Train the stand-in video classifier on ``root/train`` and score the other splits.

    Writes ``out/video_model.npz`` and, per split, ``out/video_SPLIT.csv``: a wide CSV with a
    ``filename`` column (``YTID_SSSSSS_EEEEEE.mp4``, no folder, as many tools write it) and one
    column of logits per class name: the same kind of file a user exports from their own model.
    Videos it cannot decode get no row, as with a real video model.
    """
    import pandas as pd

    root, out = Path(root), Path(out)
    items: list[tuple[str, str, str, str]] = []  # split, label, video_id, path
    for split in (train_split, *score_splits):
        folder = root / split
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*/*")):
            if path.is_file() and not path.name.startswith("."):
                rel = path.relative_to(root)
                items.append((split, rel.parts[1], rel.with_suffix("").as_posix(), str(path)))
    if classes is None:
        classes = sorted({lab for sp, lab, _, _ in items if sp == train_split})
    cls_index = {c: i for i, c in enumerate(classes)}
    tasks = [(vid, path) for _, _, vid, path in items]
    feats: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    with _executor(executor, num_workers) as ex:
        for res in map_batches(
            _features_batch, batched(tasks, 16), ex, desc="video features", progress=progress
        ):
            for vid, f, why in res:
                if f is None:
                    failed[vid] = why
                else:
                    feats[vid] = f
    train = [
        (vid, cls_index[lab]) for sp, lab, vid, _ in items if sp == train_split and vid in feats
    ]
    if not train:
        raise ValueError(f"no decodable training videos under {root / train_split}")
    x = np.stack([feats[v] for v, _ in train])
    y = np.asarray([k for _, k in train])
    model = fit_logistic(x, y, classes)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "video_model.npz"
    model.save(model_path)
    score_files: dict[str, Path] = {}
    accuracy: dict[str, float] = {}
    for split in score_splits:
        rows = [(vid, path, lab) for sp, lab, vid, path in items if sp == split and vid in feats]
        if not rows:
            continue
        logits = model.logits(np.stack([feats[v] for v, _, _ in rows]))
        df = pd.DataFrame(logits.astype(np.float32), columns=classes)
        df.insert(0, "filename", [Path(p).name for _, p, _ in rows])
        path = out / f"video_{split}.csv"
        with atomic_write(path) as tmp:
            df.to_csv(tmp, index=False, float_format="%.5f")
        score_files[split] = path
        truth = np.asarray([cls_index.get(lab, -1) for _, _, lab in rows])
        accuracy[split] = float(np.mean(logits.argmax(axis=1) == truth))
    write_json(
        out / "video_baseline.json",
        {"accuracy": accuracy, "failed": failed, "train_videos": len(train), "classes": classes},
    )
    return VideoBaselineResult(model_path, score_files, accuracy, failed)


# ----------------------------------------------------------------------------------------------
# `avfuse demo`


@dataclass(frozen=True)
class DemoConfig(Config):
    """Settings of ``avfuse demo`` (dataset size, demo-sized training) on top of a run config."""

    work: Path = field(
        default=Path("demo-work"), metadata={"help": "work folder of the demo", "flags": ("-o",)}
    )
    root: Path | None = field(
        default=None, metadata={"help": "where the dataset is generated (default WORK/dataset)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the generated dataset"})
    classes: int = field(
        default=len(CATALOGUE), metadata={"help": f"number of classes (1-{len(CATALOGUE)})"}
    )
    train_per_class: int = field(default=30, metadata={"help": "training videos per class"})
    val_per_class: int = field(default=10, metadata={"help": "validation videos per class"})
    heldout_per_class: int = field(
        default=10,
        metadata={
            "help": "held-out videos per class for choosing fusion weights "
            "(0: cross-validation on val instead)"
        },
    )
    seconds: float = field(default=3.5, metadata={"help": "mean clip length (+-0.5 s)"})
    size: int = field(default=64, metadata={"help": "frame width and height (pixels)"})
    fps: int = field(default=10, metadata={"help": "frames per second"})
    no_audio_fraction: float = field(
        default=0.03, metadata={"help": "share of videos per split without an audio track"}
    )
    short_fraction: float = field(
        default=0.03, metadata={"help": "share of videos per split shorter than 1 s"}
    )
    unreadable: int = field(default=2, metadata={"help": "unreadable training files"})
    epochs: int = field(default=15, metadata={"help": "audio model training epochs"})
    model: str = field(default="resnet", metadata={"help": "audio model architecture"})
    width: float = field(default=0.25, metadata={"help": "audio model width multiplier"})
    num_workers: int | None = field(
        default=None,
        metadata={"help": "processes for generation, extraction, features (default all cores)"},
    )
    run_config: Path | None = field(
        default=None,
        metadata={"help": "run config to start from (default: the packaged default_run.toml)"},
    )
    overrides: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "run config overrides KEY=VALUE, comma-separated, applied last "
            "(e.g. train.lr=0.003,fuse.method=logprob)"
        },
    )
    force: bool = field(default=False, metadata={"help": "regenerate and redo everything"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


@dataclass
class DemoResult:
    dataset: DatasetInfo
    video: VideoBaselineResult
    run: Any  # avfuse.pipeline.RunResult

    def summary(self) -> str:
        lines = [self.dataset.summary(), self.video.summary(), self.run.summary()]
        if self.run.report:
            lines.append(f"open {Path(self.run.report).with_suffix('.html')} to see the report")
        return "\n".join(lines)


def demo_run_config(cfg: DemoConfig, video_dir: Path) -> Any:
    """The :class:`avfuse.pipeline.RunConfig` the demo runs: the base file plus demo sizes."""
    from avfuse.config import apply_overrides
    from avfuse.pipeline import RunConfig, default_config_path, load_run_config

    base = load_run_config(cfg.run_config or default_config_path())
    work = Path(cfg.work)
    root = Path(cfg.root) if cfg.root else work / "dataset"
    heldout = cfg.heldout_per_class > 0
    workers = "" if cfg.num_workers is None else str(cfg.num_workers)
    sets = [
        f"root={json.dumps(str(root))}",
        f"work={json.dumps(str(work))}",
        f"train.epochs={cfg.epochs}",
        f"train.model={json.dumps(cfg.model)}",
        f"train.width={cfg.width}",
        # Tiny data: worker start-up would cost more than it saves.
        "train.num_workers=0",
        "train.batch_size=32",
        "train.base_batch_size=32",
        f"train.progress={str(cfg.progress).lower()}",
        f"extract.progress={str(cfg.progress).lower()}",
        f"features.progress={str(cfg.progress).lower()}",
        f"fuse.video_scores=[{json.dumps(str(video_dir / 'video_val.csv'))}]",
        f"fuse.weight_selection={json.dumps('heldout' if heldout else 'cv')}",
        "fuse.bootstrap=1000",
    ]
    if heldout:
        sets.append(f"fuse.heldout_video=[{json.dumps(str(video_dir / 'video_heldout.csv'))}]")
        # The best checkpoint is picked on held-out videos too: val stays untouched until
        # the report, so its audio-only figure is not optimistic.
        sets.append('train.val_split="heldout"')
    if workers:
        sets += [f"extract.num_workers={workers}", f"features.num_workers={workers}"]
    if cfg.force:
        sets.append('force=["all"]')
    run_cfg: RunConfig = apply_overrides(base, [*sets, *cfg.overrides])
    return run_cfg


# What `avfuse run` and the demo write into a work folder (removed by ``--force``).
_WORK_OUTPUTS = (
    "manifest.parquet",
    "classes.txt",
    "scan.toml",
    "extract.parquet",
    "extract.toml",
    "extract_failures.csv",
    "extract",
    "audio",
    "features.parquet",
    "features",
    "runs",
    "scores",
    "fusion",
    "figures",
    "report.md",
    "report.html",
    "pipeline.json",
    "run.toml",
    "video_model",
)


def _clean_work(work: Path) -> None:
    """Remove the demo's outputs from ``work`` (only names the pipeline writes)."""
    for name in _WORK_OUTPUTS:
        p = work / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def demo(cfg: DemoConfig) -> DemoResult:
    """Generate the demo dataset, train the stand-in video model, run every stage.

    Each step is skipped when its outputs exist for the same settings, so a second
    ``avfuse demo`` only redoes what changed.
    """
    from avfuse.pipeline import run

    work = Path(cfg.work)
    root = Path(cfg.root) if cfg.root else work / "dataset"
    per_split = {"train": cfg.train_per_class, "val": cfg.val_per_class}
    if cfg.heldout_per_class > 0:
        per_split["heldout"] = cfg.heldout_per_class
    if cfg.force:
        _clean_work(work)
    elif (root / DATASET_INFO).exists() and (work / "manifest.parquet").exists():
        old = read_json(root / DATASET_INFO).get("settings", {})
        if old.get("classes") != cfg.classes or old.get("seed") != cfg.seed:
            raise ValueError(
                f"{work} holds a demo run of another dataset (seed {old.get('seed')}, "
                f"{old.get('classes')} classes): pass --force to start it afresh, or another --work"
            )
    info = generate_dataset(
        root,
        seed=cfg.seed,
        classes=cfg.classes,
        per_split=per_split,
        seconds=cfg.seconds,
        size=cfg.size,
        fps=cfg.fps,
        no_audio_fraction=cfg.no_audio_fraction,
        short_fraction=cfg.short_fraction,
        unreadable=cfg.unreadable,
        num_workers=cfg.num_workers,
        force=cfg.force,
        progress=cfg.progress,
    )
    print(info.summary())

    video_dir = work / "video_model"
    stamp = video_dir / "video_baseline.json"
    dataset_settings = info.settings
    splits: list[str] = [s for s in ("val", "heldout") if s in per_split]
    video: VideoBaselineResult | None = None
    if stamp.exists() and not cfg.force:
        old = read_json(stamp)
        files: dict[str, Path] = {s: video_dir / f"video_{s}.csv" for s in splits}
        if old.get("dataset") == dataset_settings and all(p.exists() for p in files.values()):
            video = VideoBaselineResult(
                video_dir / "video_model.npz", files, old["accuracy"], old["failed"]
            )
    if video is None:
        video = train_video_baseline(
            root,
            video_dir,
            score_splits=splits,
            num_workers=cfg.num_workers,
            progress=cfg.progress,
        )
        data = read_json(stamp)
        data["dataset"] = dataset_settings
        write_json(stamp, data)
    print(video.summary())

    result = run(demo_run_config(cfg, video_dir))
    out = DemoResult(info, video, result)
    return out
