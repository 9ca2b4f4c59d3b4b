"""Generate small test media with PyAV: tones in mp4/mkv/webm/avi with aac/mp3/opus/vorbis/pcm.

Importable by every test file (``from tests.media import tone, write_media, AudioTrack``) and as
fixtures from ``tests/conftest.py``. Nothing is downloaded; every file is synthesised.

Signals are float arrays shaped ``(channels, samples)`` in [-1, 1]. PyAV's encoder converts them
to whatever sample format the codec wants (planar ``fltp`` for AAC/MP3/Vorbis, packed ``s16`` for
PCM, ...), so the decoder under test sees the formats real files carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# What each container is usually paired with.
DEFAULT_CODECS = {
    ".mp4": ("aac", "mpeg4"),
    ".m4v": ("aac", "mpeg4"),
    ".mov": ("aac", "mpeg4"),
    ".mkv": ("libopus", "mpeg4"),
    ".webm": ("libopus", "libvpx"),
    ".avi": ("libmp3lame", "mpeg4"),
}

LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 6: "5.1", 8: "7.1"}


def tone(
    freq: float, duration: float, rate: int, amplitude: float = 0.5, phase: float = 0.0
) -> np.ndarray:
    """A sine tone, ``(samples,)`` float32."""
    n = round(duration * rate)
    t = np.arange(n, dtype=np.float64) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


@dataclass
class AudioTrack:
    """One audio stream to write: ``signal`` is ``(channels, samples)`` (or ``(samples,)``)."""

    signal: np.ndarray
    rate: int
    codec: str | None = None  # None: the container's usual codec
    bit_rate: int | None = None
    default: bool | None = None  # disposition flag; None leaves the muxer's choice
    frame_samples: int = 4096  # size of the frames handed to the encoder
    options: dict[str, str] | None = None  # encoder options, e.g. {"aac_coder": "fast"}

    @property
    def channels(self) -> np.ndarray:
        sig = np.asarray(self.signal, dtype=np.float32)
        return sig[None, :] if sig.ndim == 1 else sig


def _add_audio(out: av.container.OutputContainer, track: AudioTrack, codec: str) -> av.AudioStream:
    sig = track.channels
    layout = LAYOUTS[sig.shape[0]]
    # FFmpeg's native Vorbis encoder is flagged experimental.
    options = {"strict": "experimental"} if codec == "vorbis" else {}
    options.update(track.options or {})
    stream = out.add_stream(codec, rate=track.rate, layout=layout, options=options)
    if track.bit_rate:
        stream.bit_rate = track.bit_rate
    if track.default is not None:
        stream.disposition = av.stream.Disposition.default if track.default else 0
    return stream  # type: ignore[return-value]


def _audio_frames(track: AudioTrack) -> list[av.AudioFrame]:
    sig = np.ascontiguousarray(track.channels, dtype=np.float32)
    layout = LAYOUTS[sig.shape[0]]
    frames = []
    for start in range(0, sig.shape[1], track.frame_samples):
        chunk = np.ascontiguousarray(sig[:, start : start + track.frame_samples])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = track.rate
        frame.pts = start
        frame.time_base = Fraction(1, track.rate)
        frames.append(frame)
    return frames


def write_media(
    path: str | Path,
    tracks: Sequence[AudioTrack] = (),
    video: bool = True,
    video_codec: str | None = None,
    duration: float | None = None,
    size: tuple[int, int] = (64, 48),
    fps: int = 5,
    container_format: str | None = None,
    container_options: dict[str, str] | None = None,
    video_options: dict[str, str] | None = None,
) -> Path:
    """Write a media file with the given audio tracks and (optionally) a small video stream.

    ``duration`` of the video defaults to the longest audio track (1 s without audio).
    ``container_format`` forces the muxer (e.g. ``"mp4"`` for a file named ``.bin``);
    ``video_options`` go to the video encoder (e.g. ``{"preset": "ultrafast"}`` for libx264).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    default_audio, default_video = DEFAULT_CODECS.get(ext, ("aac", "mpeg4"))
    if duration is None:
        lengths = [t.channels.shape[1] / t.rate for t in tracks]
        duration = max(lengths) if lengths else 1.0
    out = av.open(str(path), "w", format=container_format, options=container_options or {})
    try:
        vstream = None
        if video:
            vstream = out.add_stream(
                video_codec or default_video, rate=fps, options=video_options or {}
            )
            vstream.width, vstream.height = size
            vstream.pix_fmt = "yuv420p"
        astreams = [_add_audio(out, t, t.codec or default_audio) for t in tracks]
        # Encode in time order so the muxer interleaves as a real file would.
        events: list[tuple[float, int, object]] = []
        for i, t in enumerate(tracks):
            for fr in _audio_frames(t):
                events.append((float(fr.pts) / t.rate, i, fr))
        if vstream is not None:
            w, h = size
            n_video = max(1, round(duration * fps))
            for k in range(n_video):
                img = np.full((h, w, 3), (k * 7) % 256, dtype=np.uint8)
                vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                vf.pts = k
                vf.time_base = Fraction(1, fps)
                events.append((k / fps, -1, vf))
        events.sort(key=lambda e: (e[0], e[1]))
        for _, i, fr in events:
            stream = vstream if i < 0 else astreams[i]
            assert stream is not None
            for packet in stream.encode(fr):  # type: ignore[arg-type]
                out.mux(packet)
        for s in ([vstream] if vstream is not None else []) + astreams:
            for packet in s.encode(None):
                out.mux(packet)
    finally:
        out.close()
    return path


def write_tone_video(
    path: str | Path,
    freq: float = 440.0,
    duration: float = 1.0,
    rate: int = 44100,
    channels: int = 2,
    codec: str | None = None,
    amplitude: float = 0.5,
    video: bool = True,
    **kwargs: object,
) -> Path:
    """A video whose audio is the same tone on every channel."""
    sig = np.tile(tone(freq, duration, rate, amplitude), (channels, 1))
    return write_media(
        path,
        [AudioTrack(sig, rate, codec=codec)],
        video=video,
        **kwargs,  # type: ignore[arg-type]
    )


def peak_frequency(x: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the largest FFT bin of ``x`` (Hann window), for content checks."""
    x = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


def make_dataset(
    root: str | Path,
    layout: dict[str, dict[str, list[str]]],
    duration: float = 0.5,
    freq_of: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Write ``root/SPLIT/CLASS/NAME`` tone videos; returns ``{video_id: path}``.

    ``layout``: ``{split: {class: [file names with extension]}}``; a class's tone frequency is
    taken from ``freq_of`` (default 440 Hz).
    """
    root = Path(root)
    out: dict[str, Path] = {}
    for split, classes in layout.items():
        for cls, names in classes.items():
            for name in names:
                p = root / split / cls / name
                f = (freq_of or {}).get(cls, 440.0)
                write_tone_video(p, freq=f, duration=duration, rate=16000, channels=1, fps=2)
                out[f"{split}/{cls}/{Path(name).stem}"] = p
    return out


def write_level_video(
    path: str | Path, signal: np.ndarray, rate: int = 16000, codec: str = "pcm_s16le"
) -> Path:
    """A small video whose mono sound track is ``signal`` (``(samples,)``), losslessly coded by
    default so that levels and lengths survive exactly (muted tracks, -90 dBFS hiss, short
    clips)."""
    return write_media(path, [AudioTrack(np.asarray(signal, np.float32), rate, codec=codec)], fps=2)
