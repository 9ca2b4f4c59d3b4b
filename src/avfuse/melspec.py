"""VGGish-compatible log-mel front end, vectorised with NumPy/SciPy.

The default preset reproduces the AudioSet/VGGish reference front end (``mel_features.py`` of
the ``tensorflow/models`` ``research/audioset`` code) exactly:

* 16 kHz mono input, frames of 400 samples (25 ms) every 160 samples (10 ms), **no centring or
  padding**: ``frames = 1 + (N - 400) // 160`` (zero frames when ``N < 400``);
* periodic Hann window, FFT length 512 (257 bins), **magnitude** spectrum, the 400 windowed
  samples at the start of the 512-point frame (``torch.stft``/librosa centre the window instead,
  which shifts it by 56 samples);
* 64 HTK-mel triangles (``mel = 1127 ln(1 + f / 700)``) between 125 and 7500 Hz built in the mel
  domain over the bin frequencies ``linspace(0, 8000, 257)``, peak 1, no area normalisation, the
  DC bin's row forced to zero;
* ``log(mel + 0.01)``; examples are 96 frames (0.96 s) of 64 bands.

Speed comes from framing by strides (no copy of the signal), one batched real FFT per chunk of
frames (pocketfft via ``numpy.fft``, single-threaded, so worker processes do not oversubscribe
cores), the magnitude only of the FFT bins a mel band actually uses, and one float32 matrix
multiply per chunk. The FFT runs in float64 so that results agree with the float64 reference to
~1e-6 on the log scale even in near-silent bands next to a loud tone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.fft

from avfuse.config import Config, config_hash, to_dict

# numpy >= 2 ships pocketfft's C++ code too, and its float64 rfft runs ~10 % faster here than
# scipy's for 512-point rows; both are single-threaded as called.
if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
    _rfft: Callable[[np.ndarray], np.ndarray] = functools.partial(np.fft.rfft, axis=-1)
else:  # pragma: no cover - numpy 1.x
    _rfft = functools.partial(scipy.fft.rfft, axis=-1, workers=1)

# Frames per chunk: the chunk's FFT buffers (~0.5 MB) stay in L2 cache and memory stays bounded
# however long the recording is.
CHUNK_FRAMES = 128


@dataclass(frozen=True)
class FrontendConfig(Config):
    """Parameters of the log-mel front end; the default is the VGGish / AudioSet preset."""

    sample_rate: int = field(default=16000, metadata={"help": "input sample rate (Hz)"})
    win_length: int = field(default=400, metadata={"help": "frame length in samples (25 ms)"})
    hop_length: int = field(default=160, metadata={"help": "frame hop in samples (10 ms)"})
    n_fft: int = field(default=512, metadata={"help": "FFT length (>= win_length)"})
    n_mels: int = field(default=64, metadata={"help": "number of mel bands"})
    fmin: float = field(default=125.0, metadata={"help": "lower edge of the lowest band (Hz)"})
    fmax: float = field(default=7500.0, metadata={"help": "upper edge of the highest band (Hz)"})
    log_offset: float = field(default=0.01, metadata={"help": "features are log(mel + offset)"})
    window: Literal["periodic_hann", "symmetric_hann"] = field(
        default="periodic_hann", metadata={"help": "analysis window"}
    )
    spectrum: Literal["magnitude", "power"] = field(
        default="magnitude", metadata={"help": "|X| (VGGish) or |X|^2 before the mel matrix"}
    )
    mel_scale: Literal["htk"] = field(
        default="htk", metadata={"help": "mel scale: HTK, mel = 1127 ln(1 + f/700)"}
    )
    example_frames: int = field(
        default=96, metadata={"help": "frames per model example (96 = 0.96 s)"}
    )

    def __post_init__(self) -> None:
        if self.n_fft < self.win_length:
            raise ValueError(f"n_fft={self.n_fft} is shorter than win_length={self.win_length}")
        if min(self.win_length, self.hop_length, self.n_mels, self.example_frames) < 1:
            raise ValueError("win_length, hop_length, n_mels and example_frames must be >= 1")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}"
            )
        if self.log_offset <= 0:
            raise ValueError("log_offset must be > 0 (log of silence would be -inf)")

    @classmethod
    def vggish(cls) -> FrontendConfig:
        """The VGGish / AudioSet preset (the default)."""
        return cls()

    @classmethod
    def avslowfast(cls) -> FrontendConfig:
        """32 ms / 16 ms frames, 80 bands (the AVSlowFast / mmaction2 audio setting)."""
        return cls(win_length=512, hop_length=256, n_fft=512, n_mels=80, example_frames=64)

    def hash(self) -> str:
        """Stable hash of every parameter; stored with features and checked by training."""
        return config_hash(self)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def num_frames(self, num_samples: int) -> int:
        """Frames of a recording of ``num_samples`` samples (reference framing, no padding)."""
        return num_frames(num_samples, self)

    @property
    def min_samples(self) -> int:
        """Shortest recording that yields one full example (15600 samples = 0.975 s)."""
        return self.win_length + (self.example_frames - 1) * self.hop_length


DEFAULT = FrontendConfig()


def num_frames(num_samples: int, cfg: FrontendConfig = DEFAULT) -> int:
    """``1 + (N - win) // hop`` frames, or 0 when the recording is shorter than one frame."""
    if num_samples < cfg.win_length:
        return 0
    return 1 + (num_samples - cfg.win_length) // cfg.hop_length


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def _window(cfg: FrontendConfig) -> np.ndarray:
    n = np.arange(cfg.win_length, dtype=np.float64)
    period = cfg.win_length if cfg.window == "periodic_hann" else max(cfg.win_length - 1, 1)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / period)


@functools.lru_cache(maxsize=16)
def _mel_matrix_cached(cfg: FrontendConfig) -> np.ndarray:
    n_bins = cfg.n_fft // 2 + 1
    bins_mel = hertz_to_mel(np.linspace(0.0, cfg.sample_rate / 2.0, n_bins))
    edges = np.linspace(hertz_to_mel(cfg.fmin), hertz_to_mel(cfg.fmax), cfg.n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # The reference zeroes the DC row (the lowest band may otherwise catch DC when fmin == 0).
    weights[0, :] = 0.0
    weights.setflags(write=False)
    return weights


def mel_matrix(cfg: FrontendConfig = DEFAULT) -> np.ndarray:
    """Mel weights of shape ``(n_fft // 2 + 1, n_mels)``, float64, as the VGGish reference."""
    return _mel_matrix_cached(cfg).copy()


@functools.lru_cache(maxsize=16)
def _plan(cfg: FrontendConfig) -> tuple[np.ndarray, np.ndarray, int, int]:
    """float64 window, the non-zero rows ``lo:hi`` of the mel matrix (float32), lo, hi."""
    weights = _mel_matrix_cached(cfg)
    used = np.flatnonzero(weights.any(axis=1))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
    sub = np.ascontiguousarray(weights[lo:hi], dtype=np.float32)
    win = _window(cfg)
    sub.setflags(write=False)
    win.setflags(write=False)
    return win, sub, lo, hi


def _as_float(waveform: Any) -> np.ndarray:
    x = np.asarray(waveform)
    if x.dtype in (np.float32, np.float64):
        return x
    if np.issubdtype(x.dtype, np.integer):
        # PCM integers: scale to [-1, 1) as the VGGish reference does for int16 WAV files.
        return x.astype(np.float32) / np.float32(2 ** (8 * x.dtype.itemsize - 1))
    return x.astype(np.float32)


def _log_mel_1d(x: np.ndarray, cfg: FrontendConfig, out: np.ndarray, chunk: int) -> None:
    """Fill ``out`` (frames, n_mels) float32 with the log-mel of the 1-D signal ``x``."""
    win, weights, lo, hi = _plan(cfg)
    total = out.shape[0]
    if total == 0:
        return
    x = np.ascontiguousarray(x)
    frames = np.lib.stride_tricks.as_strided(
        x,
        shape=(total, cfg.win_length),
        strides=(cfg.hop_length * x.strides[0], x.strides[0]),
        writeable=False,
    )
    # The window and the FFT run in float64: in float32 the FFT's rounding error (~1e-7 of the
    # frame's energy) leaks into its near-silent bands, which log(mel + 0.01) magnifies to ~1e-3
    # for a full-scale tone or chirp; pocketfft's float64 transform costs ~1.3x its float32 one.
    # Magnitudes are then exact to float32 precision relative to themselves, and the mel sums
    # (non-negative terms) stay so in a float32 matmul.
    buf = np.zeros((min(chunk, total), cfg.n_fft), dtype=np.float64)
    mag = np.empty((buf.shape[0], hi - lo), dtype=np.float32)
    for start in range(0, total, chunk):
        m = min(chunk, total - start)
        b = buf[:m]
        # Window straight into the zero-padded FFT buffer.
        np.multiply(frames[start : start + m], win, out=b[:, : cfg.win_length])
        spec = _rfft(b)[:, lo:hi]
        mg = mag[:m]
        # Rounding each component to float32 is exact relative to the bin itself, and |z| of
        # complex64 is twice as fast as of complex128.
        spec32 = spec.astype(np.complex64)
        if cfg.spectrum == "magnitude":
            np.abs(spec32, out=mg)
        else:
            np.add(np.square(spec32.real), np.square(spec32.imag), out=mg)
        dest = out[start : start + m]
        np.matmul(mg, weights, out=dest)
        dest += np.float32(cfg.log_offset)
        np.log(dest, out=dest)


def log_mel(
    waveform: Any, cfg: FrontendConfig = DEFAULT, *, chunk_frames: int = CHUNK_FRAMES
) -> np.ndarray:
    """Log-mel features: ``(..., samples) -> (..., frames, n_mels)`` float32.

    ``frames = 1 + (samples - win_length) // hop_length`` (0 when shorter than one frame): the
    reference framing, no centring, no padding. Float32 and float64 input are both windowed
    and transformed in float64 (results agree with the float64 reference to ~1e-6 on the log
    scale); integer input is read as PCM and scaled to [-1, 1). Memory beyond the output is
    bounded by ``chunk_frames``. The FFT is single-threaded: parallelism comes from workers.
    """
    x = _as_float(waveform)
    if x.ndim == 0:
        raise ValueError("waveform must have a samples axis: (..., samples)")
    lead, n = x.shape[:-1], x.shape[-1]
    t = num_frames(n, cfg)
    out = np.empty((*lead, t, cfg.n_mels), dtype=np.float32)
    if out.size == 0:
        return out
    flat_in = x.reshape(-1, n)
    flat_out = out.reshape(-1, t, cfg.n_mels)
    for i in range(flat_in.shape[0]):
        _log_mel_1d(flat_in[i], cfg, flat_out[i], max(1, int(chunk_frames)))
    return out


def frame_examples(logmel: np.ndarray, length: int = 96, hop: int | None = None) -> np.ndarray:
    """Cut a sequence into whole examples: ``(frames, n_mels) -> (n, length, n_mels)``.

    ``n = 1 + (frames - length) // hop`` (``hop`` defaults to ``length``); a sequence shorter
    than ``length`` gives ``n = 0``, never a zero-padded example. Returns a read-only view.
    """
    hop = length if hop is None else hop
    if logmel.ndim != 2:
        raise ValueError(f"expected (frames, n_mels), got shape {logmel.shape}")
    t, m = logmel.shape
    n = 0 if t < length else 1 + (t - length) // hop
    s0, s1 = logmel.strides
    return np.lib.stride_tricks.as_strided(
        logmel, shape=(n, length, m), strides=(hop * s0, s0, s1), writeable=False
    )


__all__ = [
    "DEFAULT",
    "FrontendConfig",
    "frame_examples",
    "hertz_to_mel",
    "log_mel",
    "mel_matrix",
    "num_frames",
]
