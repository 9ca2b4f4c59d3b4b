"""Time sound-track extraction against what a user would otherwise write.

Generates a corpus (default: 100 ten-second H.264 + AAC 44.1 kHz stereo mp4s) in a temporary
folder, then times on the same files, side by side:

* ``avfuse decode_audio``   the decode+downmix+resample core, one process, no output written
* bare PyAV loop            ``av.open`` -> decode -> ``np.concatenate`` -> mean -> ``soxr``
* ``avfuse decode_audio + write_audio``  the same plus writing the FLAC file
* ``avfuse extract``        the whole stage (process pool start-up, FLAC written, records
                            logged) with 1 and 2 workers
* ``librosa.load``          ``librosa.load(path, sr=16000)`` (needs an audioread backend for mp4)
* ``ffmpeg`` subprocess      one ``ffmpeg -i X -ac 1 -ar 16000 Y.flac`` per file, if installed

Usage: ``python -m benchmarks.bench_extract [--files 100] [--seconds 10] [--size 320x240]``.
glibc's allocator thresholds are raised for this process (as avfuse's workers do) so that no
method pays for returning memory to the OS between files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import soxr

from avfuse.extract import (
    ExtractConfig,
    _extract_batch,
    _tune_malloc,
    decode_audio,
    extract,
    write_audio,
)
from avfuse.manifest import ScanConfig, scan
from avfuse.parallel import make_executor
from tests.media import AudioTrack, tone, write_media

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(root: Path, n: int, seconds: float, size: tuple[int, int], fps: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        f = 200 + 40 * (i % 20)
        left = tone(f, seconds, 44100, 0.3) + 0.05 * rng.standard_normal(round(seconds * 44100))
        right = tone(f * 1.5, seconds, 44100, 0.3)
        sig = np.stack([left, right]).astype(np.float32)
        p = root / "train" / f"class{i % 4}" / f"clip{i:04d}.mp4"
        write_media(
            p,
            [AudioTrack(sig, 44100, codec="aac", bit_rate=128_000, options={"aac_coder": "fast"})],
            video_codec="libx264",
            video_options={"preset": "ultrafast"},
            size=size,
            fps=fps,
        )
        paths.append(p)
    return paths


def ffmpeg_exe() -> str | None:
    """The static binary of the ``bench`` extra (``imageio-ffmpeg``), else one on PATH."""
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:
        return shutil.which("ffmpeg")


def bare_pyav(path: Path) -> np.ndarray:
    with av.open(str(path), options={"skip_frame": "all"}) as c:
        s = c.streams.audio[0]
        x = np.concatenate([f.to_ndarray() for f in c.decode(s)], axis=1)
        return soxr.resample(x.mean(axis=0), s.rate, 16000)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="320x240", help="video frame size WxH")
    ap.add_argument("--fps", type=int, default=15)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    _tune_malloc()

    with tempfile.TemporaryDirectory(prefix="avfuse-bench-") as tmp_s:
        tmp = Path(tmp_s)
        t_gen = time.perf_counter()
        paths = make_corpus(tmp / "data", args.files, args.seconds, (w, h), args.fps)
        n = len(paths)
        audio_s = n * args.seconds
        print(
            f"corpus: {n} x {args.seconds:g} s H.264 {w}x{h}@{args.fps} + AAC 44.1 kHz stereo "
            f"(generated in {time.perf_counter() - t_gen:.1f} s)"
        )
        bare_pyav(paths[0])  # warm caches / imports
        decode_audio(paths[0])

        rows: list[tuple[str, float | None, str]] = []
        rows.append(
            (
                "bare PyAV decode+mean+soxr (1 proc)",
                timed(lambda: [bare_pyav(p) for p in paths]),
                "",
            )
        )
        rows.append(
            ("avfuse decode_audio (1 proc)", timed(lambda: [decode_audio(p) for p in paths]), "")
        )
        out_dir = tmp / "flac"

        def decode_and_write() -> None:
            for i, p in enumerate(paths):
                write_audio(out_dir / f"{i}.flac", decode_audio(p).samples, 16000)

        rows.append(("avfuse decode_audio + write_audio (1 proc)", timed(decode_and_write), ""))
        startup: dict[int, float] = {}
        for workers in (1, 2):
            work = tmp / f"work{workers}"
            scan(ScanConfig(root=tmp / "data", work=work))
            cfg = ExtractConfig(work=work, num_workers=workers, progress=False, batch_size=16)
            t0 = time.perf_counter()
            with make_executor(workers) as ex:
                # Start the workers (and their imports) before timing: a one-off ~0.5-1 s that
                # a real run pays once for hours of audio. Reported separately below.
                warm = [ex.submit(_extract_batch, [], str(tmp), 16000, str(tmp / "x"))]
                warm += [ex.submit(_extract_batch, [], str(tmp), 16000, str(tmp / "x"))]
                [f.result() for f in warm]
                startup[workers] = time.perf_counter() - t0
                rows.append(
                    (
                        f"avfuse extract, {workers} proc (FLAC out)",
                        timed(lambda c=cfg, e=ex: extract(c, e)),  # type: ignore[misc]
                        "",
                    )
                )

        exe = ffmpeg_exe()
        if exe and not shutil.which("ffmpeg"):
            # librosa reads mp4 through audioread, which runs whatever `ffmpeg` is on PATH.
            (tmp / "bin").mkdir()
            (tmp / "bin" / "ffmpeg").symlink_to(exe)
            os.environ["PATH"] = f"{tmp / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        try:
            import librosa

            # Without soundfile support for mp4 it falls back to audioread, warning per file.
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)

            librosa.load(str(paths[0]), sr=16000)
            rows.append(
                (
                    "librosa.load(sr=16000)",
                    timed(lambda: [librosa.load(str(p), sr=16000) for p in paths]),
                    "",
                )
            )
        except Exception as exc:
            rows.append(("librosa.load(sr=16000)", None, f"failed: {type(exc).__name__}"))

        ffmpeg = ffmpeg_exe()
        if ffmpeg:
            out = tmp / "ff"
            out.mkdir()

            def run_ffmpeg() -> None:
                for i, p in enumerate(paths):
                    subprocess.run(
                        [ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(p), "-vn",
                         "-ac", "1", "-ar", "16000", str(out / f"{i}.flac")],
                        check=True,
                    )  # fmt: skip

            rows.append(("ffmpeg CLI subprocess per file (1 proc)", timed(run_ffmpeg), ""))
        else:
            rows.append(
                (
                    "ffmpeg CLI subprocess per file (1 proc)",
                    None,
                    "not installed: pip install 'avfuse[bench]'",
                )
            )

    ref = {name: t for name, t, _ in rows if t}
    bare = ref.get("bare PyAV decode+mean+soxr (1 proc)")
    ff = ref.get("ffmpeg CLI subprocess per file (1 proc)")
    print(
        f"\n{'method':44s} {'files/s':>9s} {'x realtime':>11s} {'vs bare PyAV':>13s} {'vs ffmpeg':>10s}"
    )
    for name, t, note in rows:
        if t is None:
            print(f"{name:44s} {note}")
            continue
        vs_bare = f"{bare / t:.2f}x" if bare else "-"
        vs_ff = f"{ff / t:.2f}x" if ff else "-"
        print(f"{name:44s} {n / t:9.1f} {audio_s / t:11.0f} {vs_bare:>13s} {vs_ff:>10s}")
    one, two = (
        ref.get("avfuse extract, 1 proc (FLAC out)"),
        ref.get("avfuse extract, 2 proc (FLAC out)"),
    )
    if one and two:
        print(f"\nscaling 1 -> 2 processes: {one / two:.2f}x")
    if startup:
        shown = ", ".join(f"{w} proc {t:.2f} s" for w, t in startup.items())
        print(f"worker pool start-up, paid once per run and not in the figures above: {shown}")
    print("(ratios > 1 mean faster than the reference; figures from one run)")


if __name__ == "__main__":
    main()
