"""Log-mel front-end throughput on one core, against what a user would otherwise run.

Same-shaped VGGish features (n_fft 512, hop 160, window 400, 64 HTK mel bands, 125-7500 Hz,
magnitude, log(mel + 0.01)) for the same 10 s clips, one thread for every library:

* ``avfuse log_mel``                      this project (float32 FFT, float64 for unsure frames)
* ``avfuse log_mel, batch``               the clips as one ``(clips, samples)`` array
* ``librosa.feature.melspectrogram``      ``center=False``, ``power=1``, ``htk=True``, then log
* plain scipy float32                     frames copied, ``scipy.fft.rfft(n=512)``, abs, dot, log

Figures are x-realtime per core (seconds of audio per second of compute), best of ``--repeats``
interleaved rounds, with the ratio to librosa. Compute is this process's CPU time: on a shared
machine wall time would count the neighbours' load too. With ``--videos N`` it also times end to end, on N
generated 10 s AAC mp4s: bare decode+resample (``avfuse.audio.decode_audio``) against
decode+resample+``log_mel`` (the ``features --from-video`` worker's work per file).

Usage: ``python -m benchmarks.bench_melspec [--clips 40] [--repeats 5] [--videos 20]``.
"""

# ruff: noqa: E402  (the thread settings below must precede the numeric imports)

from __future__ import annotations

import os

# One thread everywhere, before numpy/scipy load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.fft

from avfuse.melspec import FrontendConfig, log_mel, mel_matrix

ROOT = Path(__file__).resolve().parents[1]

SR = 16000
CFG = FrontendConfig()


def make_clips(n: int, seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * SR)) / SR
    clips = []
    for i in range(n):
        f0 = 100 + 50 * i
        x = 0.3 * np.sin(2 * np.pi * (f0 * t + 300 * t * t)) + 0.1 * rng.standard_normal(len(t))
        clips.append(x.astype(np.float32))
    return clips


def plain_scipy(x: np.ndarray, weights: np.ndarray, window: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * window
    mag = np.abs(scipy.fft.rfft(frames, n=512, axis=-1, workers=1))
    return np.log(mag @ weights + np.float32(0.01))


def run_librosa(x: np.ndarray) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(
        y=x,
        sr=SR,
        n_fft=512,
        hop_length=160,
        win_length=400,
        window="hann",
        center=False,
        power=1.0,
        n_mels=64,
        fmin=125.0,
        fmax=7500.0,
        htk=True,
        norm=None,
    )
    return np.log(mel + np.float32(0.01)).T


def best_time(fn: Callable[[], object], best: float) -> float:
    t0 = time.process_time()
    fn()
    return min(best, time.process_time() - t0)


def one_thread() -> contextlib.AbstractContextManager[object]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def bench_frontend(n_clips: int, repeats: int) -> None:
    clips = make_clips(n_clips, 10.0)
    batch = np.stack(clips)
    audio_s = n_clips * 10.0
    weights = mel_matrix().astype(np.float32)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)).astype(np.float32)
    methods: dict[str, Callable[[], object]] = {
        "avfuse log_mel (per clip)": lambda: [log_mel(x) for x in clips],
        "avfuse log_mel (one batch)": lambda: log_mel(batch),
        "plain scipy float32": lambda: [plain_scipy(x, weights, window) for x in clips],
    }
    try:
        import librosa  # noqa: F401

        methods["librosa melspectrogram"] = lambda: [run_librosa(x) for x in clips]
    except ImportError:
        print("librosa not installed: no librosa figure")
    # same shapes, and the same numbers up to librosa's centred window
    assert log_mel(clips[0]).shape == (998, 64) == plain_scipy(clips[0], weights, window).shape
    best = dict.fromkeys(methods, float("inf"))
    for fn in methods.values():  # warm-up: caches, plans, imports
        fn()
    for _ in range(repeats):  # interleaved, so a busy machine slows every method alike
        for name, fn in methods.items():
            best[name] = best_time(fn, best[name])
    ref = best.get("librosa melspectrogram")
    print(f"\nlog-mel front end, {n_clips} x 10 s clips, 1 thread, best of {repeats}")
    print(f"{'method':32s} {'x realtime':>12s} {'ms / 10 s':>10s} {'vs librosa':>11s}")
    for name, t in best.items():
        ratio = f"{ref / t:10.2f}x" if ref else "-"
        print(f"{name:32s} {audio_s / t:12,.0f} {1000 * t / n_clips:10.2f} {ratio:>11s}")


def bench_end_to_end(n_videos: int, repeats: int) -> None:
    from avfuse.audio import decode_audio
    from tests.media import AudioTrack, write_media

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n_videos):
            sig = (0.2 * rng.standard_normal((2, 441000))).astype(np.float32)
            p = Path(tmp) / f"v{i:03d}.mp4"
            write_media(p, [AudioTrack(sig, 44100, codec="aac", bit_rate=128_000)], fps=2)
            paths.append(p)

        def decode_only() -> None:
            for p in paths:
                decode_audio(p, SR)

        def decode_and_features() -> None:
            for p in paths:
                log_mel(decode_audio(p, SR).samples)

        decode_only()
        best = {"decode+resample": float("inf"), "decode+resample+log_mel": float("inf")}
        for _ in range(repeats):
            best["decode+resample"] = best_time(decode_only, best["decode+resample"])
            best["decode+resample+log_mel"] = best_time(
                decode_and_features, best["decode+resample+log_mel"]
            )
    base = best["decode+resample"]
    print(f"\nend to end, {n_videos} x 10 s AAC 44.1 kHz stereo mp4, 1 thread")
    for name, t in best.items():
        print(f"{name:32s} {n_videos / t:8.1f} files/s {t / base:8.2f}x the bare decode time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--videos", type=int, default=20, help="0 skips the end-to-end part")
    args = ap.parse_args()
    with one_thread():
        bench_frontend(args.clips, args.repeats)
        if args.videos:
            bench_end_to_end(args.videos, max(2, args.repeats // 2))


if __name__ == "__main__":
    main()
