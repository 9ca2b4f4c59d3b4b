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

Other presets: ``FrontendConfig.avslowfast()`` (32/16 ms frames, 80 bands) and
``FrontendConfig.panns()`` (the PANNs / torchlibrosa front end of CNN14: 32 kHz, centred
1024-sample frames, power spectrum, librosa's Slaney mel filterbank, decibels) and
``FrontendConfig.ast()`` (the Audio Spectrogram Transformer's Kaldi fbank: per-frame mean
removal and pre-emphasis, 128 bands, ``ln(max(mel, eps))``, the checkpoint's normalisation).

Speed comes from framing by strides (no copy of the signal), one batched float32 real FFT per
chunk of frames (pocketfft via ``scipy.fft``, single-threaded, so worker processes do not
oversubscribe cores), the spectrum only of the FFT bins a mel band actually uses, and a sparse
mel product (each bin lies in at most two bands). Frames whose float32 error bound is too large
for one of their bands (near-silent bands next to a loud tone) are recomputed in float64, so
results agree with the float64 reference to better than 1e-4 on the log scale (typically 1e-6).
No BLAS is involved: the result is the same bit for bit whatever the number of threads.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.fft
import scipy.sparse

from avfuse.config import Config, config_hash, to_dict

# Kaldi's floor of the mel energies (std::numeric_limits<float>::epsilon()).
KALDI_EPS = float(np.finfo(np.float32).eps)
# The AudioSet log-mel statistics AST checkpoints were trained with (their feature extractor's
# defaults), used when a model folder states none.
AST_MEAN = -4.2677393
AST_STD = 4.5689974

# Frames per chunk: the chunk's FFT buffers (~0.5 MB) stay in L2 cache and memory stays bounded
# however long the recording is.
CHUNK_FRAMES = 256


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
    window: Literal["periodic_hann", "symmetric_hann", "povey"] = field(
        default="periodic_hann",
        metadata={
            "help": "analysis window: periodic Hann, symmetric Hann (Kaldi's 'hanning') or "
            "Kaldi's povey window (symmetric Hann to the power 0.85)"
        },
    )
    spectrum: Literal["magnitude", "power"] = field(
        default="magnitude", metadata={"help": "|X| (VGGish) or |X|^2 before the mel matrix"}
    )
    mel_scale: Literal["htk", "slaney"] = field(
        default="htk",
        metadata={
            "help": "mel scale: HTK (mel = 1127 ln(1 + f/700)) or Slaney's (linear to 1 kHz, "
            "then logarithmic; librosa's default)"
        },
    )
    example_frames: int = field(
        default=96, metadata={"help": "frames per model example (96 = 0.96 s)"}
    )
    # Fields added after stores were written: left out of the hash while at their default, so
    # the VGGish preset keeps its hash and existing stores stay valid.
    mel_triangles: Literal["mel", "hertz"] = field(
        default="mel",
        metadata={
            "omit_default": True,
            "help": "triangles linear in mel over the bin frequencies, DC row zeroed (VGGish "
            "reference) or linear in Hz between mel-spaced edges (librosa.filters.mel)",
        },
    )
    mel_norm: Literal["none", "slaney"] = field(
        default="none",
        metadata={
            "omit_default": True,
            "help": "band weights: peak 1, or divided by half the band's width in Hz "
            '(librosa norm="slaney": equal area)',
        },
    )
    center: bool = field(
        default=False,
        metadata={
            "omit_default": True,
            "help": "frame t centred on sample t*hop, the signal padded by n_fft//2 each side "
            "(librosa/torch.stft), instead of starting there (VGGish reference)",
        },
    )
    pad_mode: Literal["reflect", "constant"] = field(
        default="reflect",
        metadata={
            "omit_default": True,
            "help": "padding of a centred signal: mirror without repeating the edge, or zeros",
        },
    )
    log: Literal["offset", "db", "floor"] = field(
        default="offset",
        metadata={
            "omit_default": True,
            "help": "features: ln(mel + log_offset), 10 log10(max(mel, amin)) (decibels, "
            "reference 1, no top_db clipping) or ln(max(mel, amin)) (Kaldi fbank)",
        },
    )
    amin: float = field(
        default=1e-10,
        metadata={
            "omit_default": True,
            "help": 'floor of the mel energies when log = "db" or "floor"',
        },
    )
    remove_dc: bool = field(
        default=False,
        metadata={
            "omit_default": True,
            "help": "subtract each frame's mean before pre-emphasis and windowing (Kaldi)",
        },
    )
    preemphasis: float = field(
        default=0.0,
        metadata={
            "omit_default": True,
            "help": "per-frame pre-emphasis y[i] = x[i] - p x[i-1], y[0] = (1 - p) x[0] "
            "(Kaldi); 0 = off",
            "min": 0.0,
            "max": 1.0,
        },
    )
    norm_mean: float = field(
        default=0.0,
        metadata={
            "omit_default": True,
            "help": "features become (log-mel - norm_mean) / (2 norm_std) when norm_std > 0 "
            "(the AST checkpoints' dataset normalisation)",
        },
    )
    norm_std: float = field(
        default=0.0,
        metadata={"omit_default": True, "help": "see norm_mean; 0 = no normalisation", "min": 0.0},
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
        if self.amin <= 0:
            raise ValueError("amin must be > 0 (log of silence would be -inf)")
        # A value outside its Literal would otherwise fall through to some default branch.
        for name, tp in typing.get_type_hints(type(self)).items():
            if typing.get_origin(tp) is Literal and getattr(self, name) not in typing.get_args(tp):
                allowed = ", ".join(repr(a) for a in typing.get_args(tp))
                raise ValueError(
                    f"FrontendConfig.{name}={getattr(self, name)!r} is not one of {allowed}"
                )

    @classmethod
    def vggish(cls) -> FrontendConfig:
        """The VGGish / AudioSet preset (the default)."""
        return cls()

    @classmethod
    def avslowfast(cls) -> FrontendConfig:
        """32 ms / 16 ms frames, 80 bands (the AVSlowFast / mmaction2 audio setting)."""
        return cls(win_length=512, hop_length=256, n_fft=512, n_mels=80, example_frames=64)

    @classmethod
    def panns(cls) -> FrontendConfig:
        """The PANNs (``audioset_tagging_cnn``, torchlibrosa) front end of CNN14/CNN10.

        32 kHz, 1024-sample periodic Hann frames every 320 samples, centred with reflect
        padding, power spectrum, 64 Slaney-scale, Slaney-normalised mel bands (librosa's
        construction) from 50 to 14000 Hz, ``10 log10(max(mel, 1e-10))``. Examples are 100
        frames (1 s): the shortest clip kept. PANNs were trained on 10 s clips, but a 9.9 s
        Kinetics clip must not become ``too_short``; how much of a clip a model sees at once is
        the model's setting.
        """
        return cls(
            sample_rate=32000,
            win_length=1024,
            hop_length=320,
            n_fft=1024,
            n_mels=64,
            fmin=50.0,
            fmax=14000.0,
            spectrum="power",
            mel_scale="slaney",
            mel_triangles="hertz",
            mel_norm="slaney",
            center=True,
            pad_mode="reflect",
            log="db",
            amin=1e-10,
            example_frames=100,
        )

    @classmethod
    def ast(cls, mean: float = AST_MEAN, std: float = AST_STD) -> FrontendConfig:
        """The Audio Spectrogram Transformer's front end: Kaldi ``fbank`` as AST was trained on.

        16 kHz, 400-sample (25 ms) frames every 160 samples (10 ms), not centred (Kaldi's
        ``snip_edges``); per frame: mean removed, pre-emphasis 0.97, symmetric Hann window
        (Kaldi's ``hanning``, which AST uses instead of Kaldi's default povey window), no
        dither; 512-point power spectrum; 128 Kaldi mel triangles (HTK scale, linear in mel)
        from 20 Hz to Nyquist; ``ln(max(mel, float32 eps))``; then ``(x - mean) / (2 std)``
        with the checkpoint's dataset statistics (AudioSet's by default; see
        :func:`avfuse.ast.frontend_for`). Examples are 100 frames (1 s), the shortest clip
        kept; the model's window is the checkpoint's ``max_length`` (1024 frames = 10.24 s).
        """
        return cls(
            sample_rate=16000,
            win_length=400,
            hop_length=160,
            n_fft=512,
            n_mels=128,
            fmin=20.0,
            fmax=8000.0,
            window="symmetric_hann",
            spectrum="power",
            mel_scale="htk",
            mel_triangles="mel",
            log="floor",
            amin=KALDI_EPS,
            remove_dc=True,
            preemphasis=0.97,
            norm_mean=float(mean),
            norm_std=float(std),
            example_frames=100,
        )

    def silence_value(self) -> float:
        """The feature value of digital silence (an all-zero frame) under this front end."""
        if self.log == "offset":
            v = float(np.log(self.log_offset))
        elif self.log == "db":
            v = 10.0 * float(np.log10(self.amin))
        else:
            v = float(np.log(self.amin))
        if self.norm_std > 0:
            v = (v - self.norm_mean) / (2.0 * self.norm_std)
        return v

    def hash(self) -> str:
        """Stable hash of every parameter; stored with features and checked by training."""
        return config_hash(self)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def num_frames(self, num_samples: int) -> int:
        """Frames of a recording of ``num_samples`` samples (see :func:`num_frames`)."""
        return num_frames(num_samples, self)

    @property
    def window_frames(self) -> int:
        """Rows of the store per model example (what :class:`avfuse.store.EmbeddingSpec` also
        answers): ``example_frames``."""
        return self.example_frames

    @property
    def feature_dim(self) -> int:
        """Values per row of the store: ``n_mels``."""
        return self.n_mels

    @property
    def min_samples(self) -> int:
        """Shortest recording that yields one full example (15600 samples = 0.975 s)."""
        if self.center:
            n = (self.example_frames - 1) * self.hop_length + self.n_fft % 2
            return max(n, self.n_fft // 2 + 1)
        return self.win_length + (self.example_frames - 1) * self.hop_length


DEFAULT = FrontendConfig()


def num_frames(num_samples: int, cfg: FrontendConfig = DEFAULT) -> int:
    """Frames of a recording of ``N = num_samples`` samples.

    Not centred (VGGish): ``1 + (N - win) // hop``, or 0 when the recording is shorter than one
    frame. Centred: ``1 + N // hop`` (``n_fft`` even; librosa/torch.stft framing of the padded
    signal), or 0 when ``N <= n_fft // 2``: reflect padding needs more samples than it pads, and
    the same rule holds for zero padding so that the count never depends on ``pad_mode``.
    """
    if cfg.center:
        if num_samples <= cfg.n_fft // 2:
            return 0
        return 1 + (num_samples + 2 * (cfg.n_fft // 2) - cfg.n_fft) // cfg.hop_length
    if num_samples < cfg.win_length:
        return 0
    return 1 + (num_samples - cfg.win_length) // cfg.hop_length


# Slaney's mel scale (the Auditory Toolbox, librosa's default): one mel per 200/3 Hz up to 1 kHz
# (15 mel), then 27 mel per factor 6.4 in frequency.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOGSTEP = np.log(6.4) / 27.0


def hertz_to_mel(hz: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    """Hz to mel: HTK ``1127 ln(1 + f / 700)``, or Slaney's scale (``scale="slaney"``)."""
    f = np.asarray(hz, dtype=np.float64)
    if scale == "htk":
        return 1127.0 * np.log1p(f / 700.0)
    log_part = _SLANEY_BREAK_MEL + np.log(np.maximum(f, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / (
        _SLANEY_LOGSTEP
    )
    return np.where(f >= _SLANEY_BREAK_HZ, log_part, f / _SLANEY_HZ_PER_MEL)


def mel_to_hertz(mel: np.ndarray | float, scale: str = "htk") -> np.ndarray:
    """Inverse of :func:`hertz_to_mel`."""
    m = np.asarray(mel, dtype=np.float64)
    if scale == "htk":
        return 700.0 * np.expm1(m / 1127.0)
    log_part = _SLANEY_BREAK_HZ * np.exp(
        _SLANEY_LOGSTEP * (np.maximum(m, _SLANEY_BREAK_MEL) - _SLANEY_BREAK_MEL)
    )
    return np.where(m >= _SLANEY_BREAK_MEL, log_part, m * _SLANEY_HZ_PER_MEL)


def _window(cfg: FrontendConfig) -> np.ndarray:
    n = np.arange(cfg.win_length, dtype=np.float64)
    period = cfg.win_length if cfg.window == "periodic_hann" else max(cfg.win_length - 1, 1)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / period)
    return w**0.85 if cfg.window == "povey" else w


@functools.lru_cache(maxsize=16)
def _mel_matrix_cached(cfg: FrontendConfig) -> np.ndarray:
    n_bins = cfg.n_fft // 2 + 1
    bins_hz = np.linspace(0.0, cfg.sample_rate / 2.0, n_bins)
    scale = cfg.mel_scale
    edges = np.linspace(
        hertz_to_mel(cfg.fmin, scale), hertz_to_mel(cfg.fmax, scale), cfg.n_mels + 2
    )
    edges_hz = mel_to_hertz(edges, scale)
    if cfg.mel_triangles == "mel":
        bins, pts = hertz_to_mel(bins_hz, scale), edges
    else:
        bins, pts = bins_hz, edges_hz
    lower, center, upper = pts[:-2], pts[1:-1], pts[2:]
    rising = (bins[:, None] - lower) / (center - lower)
    falling = (upper - bins[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if cfg.mel_triangles == "mel":
        # The reference zeroes the DC row (the lowest band may otherwise catch DC, fmin == 0).
        weights[0, :] = 0.0
    if cfg.mel_norm == "slaney":
        weights *= 2.0 / (edges_hz[2:] - edges_hz[:-2])
    weights.setflags(write=False)
    return weights


def mel_matrix(cfg: FrontendConfig = DEFAULT) -> np.ndarray:
    """Mel weights of shape ``(n_fft // 2 + 1, n_mels)``, float64.

    The default is the VGGish reference's matrix; with ``mel_triangles="hertz"``,
    ``mel_scale="slaney"`` and ``mel_norm="slaney"`` it is ``librosa.filters.mel(...).T``.
    """
    return _mel_matrix_cached(cfg).copy()


@dataclass(frozen=True)
class _Plan:
    """What one front end needs per frame, computed once per config."""

    window: np.ndarray  # (win_length,) float64
    window32: np.ndarray  # (win_length,) float32
    lo: int  # FFT bins lo:hi are the ones some band uses
    hi: int
    weights_t: scipy.sparse.csr_matrix  # (n_mels, hi - lo) float32: the mel matrix, transposed
    inv_band_weight: np.ndarray  # (n_mels, 1) float32: 1 / each band's sum of weights


@functools.lru_cache(maxsize=16)
def _plan(cfg: FrontendConfig) -> _Plan:
    weights = _mel_matrix_cached(cfg)
    used = np.flatnonzero(weights.any(axis=1))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
    win = _window(cfg)
    band_weight = weights.sum(axis=0)
    # (an empty band has no error to bound: 1 / 0 = inf drops out of the minimum)
    inv_band_weight = np.divide(
        1.0, band_weight, out=np.full_like(band_weight, np.inf), where=band_weight > 0
    )
    plan = _Plan(
        window=win,
        window32=win.astype(np.float32),
        lo=lo,
        hi=hi,
        weights_t=scipy.sparse.csr_matrix(weights[lo:hi].T.astype(np.float32)),
        inv_band_weight=inv_band_weight.astype(np.float32)[:, None],
    )
    for a in (plan.window, plan.window32, plan.inv_band_weight):
        a.setflags(write=False)
    return plan


def _as_float(waveform: Any) -> np.ndarray:
    x = np.asarray(waveform)
    if x.dtype in (np.float32, np.float64):
        return x
    if np.issubdtype(x.dtype, np.integer):
        # PCM integers: scale to [-1, 1) as the VGGish reference does for int16 WAV files.
        return x.astype(np.float32) / np.float32(2 ** (8 * x.dtype.itemsize - 1))
    return x.astype(np.float32)


def _mel_sums(spec_t: np.ndarray, plan: _Plan) -> np.ndarray:
    """``(hi - lo, frames) -> (n_mels, frames)`` float32: the mel matrix applied.

    A sparse product: each bin lies in at most two triangles, so it does a tenth of a dense
    product's work. It also runs in one fixed order on one thread, where a BLAS product rounds
    differently with the number of threads it splits over (features computed in a worker and
    in the main process would differ in the last bit).
    """
    return np.asarray(plan.weights_t @ spec_t, dtype=np.float32)


# Float32 FFT error, per bin, is below _FFT_ERR * eps32 * ||windowed frame||_2: measured up to 16
# on noise, chirps, square waves and DC (both presets' sizes); 32 leaves a margin of two.
_FFT_ERR = 32.0 * float(np.finfo(np.float32).eps)
# Largest error bound accepted from the float32 FFT, relative to the log's argument
# (mel + log_offset, or max(mel, amin)): 1e-4 in ln (4.3e-4 dB), the worst error then half that.
_LOG_TOL = 1e-4


def _spectrum(frames: np.ndarray, plan: _Plan, cfg: FrontendConfig, buf: np.ndarray) -> Any:
    """``(frames, win_length) -> (hi - lo, frames)`` float32 magnitude or power (transposed),
    and ``(frames,)`` the squared norms of the windowed frames.

    ``buf``: ``(frames, n_fft)`` zero-padded FFT input of the dtype to compute in (only its
    first ``win_length`` columns are written). From float64, each component of the spectrum is
    rounded to float32, which is exact relative to the bin itself.
    """
    windowed = buf[:, : cfg.win_length]
    wide = buf.dtype == np.float64
    np.multiply(frames, plan.window if wide else plan.window32, out=windowed)
    sq = np.einsum("ij,ij->i", windowed, windowed)
    spec = scipy.fft.rfft(buf, axis=-1, workers=1)[:, plan.lo : plan.hi]
    if wide:
        spec = spec.astype(np.complex64)
    # Written transposed in one pass each: no temporary of the spectrum's layout to copy.
    spec_t = spec.T
    out = np.empty(spec_t.shape, dtype=np.float32)
    if cfg.spectrum == "magnitude":
        np.abs(spec_t, out=out)  # hypot: no squaring, so no float32 overflow or underflow
    else:
        np.square(spec_t.real, out=out)
        out += np.square(spec_t.imag)
    return out, sq


def _unsure_frames(sq: np.ndarray, scale: np.ndarray, plan: _Plan, spectrum: str) -> np.ndarray:
    """Frames whose float32-FFT error bound is too large for some band: ``(k,)`` indices.

    ``sq``: ``(frames,)`` squared norms of the windowed frames; ``scale``: ``(n_mels, frames)``
    the log's arguments (``mel + log_offset`` or ``max(mel, amin)``, both ``>= mel``).
    """
    # In float32, every bin of a frame is off by at most err (that frame's). A band of weight
    # sum W is then off by at most W err (magnitude), or 2 err sqrt(W mel) + W err^2 (power:
    # |X + d|^2 - |X|^2 <= 2 |X| |d| + |d|^2, and sum w |X| <= sqrt(W sum w |X|^2)). Both
    # bounds, relative to scale, are largest in the band where scale / W is smallest: q.
    err = _FFT_ERR * np.sqrt(sq)
    q = (scale * plan.inv_band_weight).min(axis=0).astype(np.float64)
    if spectrum == "magnitude":
        unsure = err > _LOG_TOL * q
    else:
        unsure = 2 * err * np.sqrt(q) + err * err > _LOG_TOL * q
    return np.flatnonzero(unsure)


def _log(scale: np.ndarray, cfg: FrontendConfig) -> None:
    """``scale`` (the log's argument, see :func:`_scale`) -> the features, in place."""
    if cfg.log == "db":
        np.log10(scale, out=scale)
        scale *= np.float32(10.0)
    else:
        np.log(scale, out=scale)
    if cfg.norm_std > 0:
        scale -= np.float32(cfg.norm_mean)
        scale *= np.float32(1.0 / (2.0 * cfg.norm_std))


def _scale(mel: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """The log's argument, in place: ``mel + log_offset`` or ``max(mel, amin)``."""
    if cfg.log == "offset":
        mel += np.float32(cfg.log_offset)
    else:
        np.maximum(mel, np.float32(cfg.amin), out=mel)
    return mel


def _condition(block: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """Kaldi's per-frame steps before the window: ``(k, win_length) -> (k, win_length)``.

    Mean removal, then pre-emphasis with the frame's first sample scaled by ``1 - p`` (Kaldi
    has no sample before it). Done in float64 so the float64 recomputation of unsure frames
    starts from the same exact values; without either step the strided view passes through.
    """
    if not cfg.remove_dc and cfg.preemphasis == 0:
        return block
    y = block.astype(np.float64)
    if cfg.remove_dc:
        y -= y.mean(axis=1, keepdims=True)
    if cfg.preemphasis:
        p = cfg.preemphasis
        y[:, 1:] -= p * y[:, :-1]  # the right side is evaluated first: no overlap issue
        y[:, 0] *= 1.0 - p
    return y


def _log_mel_1d(x: np.ndarray, cfg: FrontendConfig, out: np.ndarray, chunk: int) -> None:
    """Fill ``out`` (frames, n_mels) float32 with the log-mel of the 1-D signal ``x``."""
    plan = _plan(cfg)
    total = out.shape[0]
    if total == 0:
        return
    x = np.ascontiguousarray(x)
    start0 = 0
    if cfg.center:
        x = np.pad(x, cfg.n_fft // 2, mode=cfg.pad_mode)
        # The window sits in the middle of its n_fft-sample frame (librosa's get_window padding);
        # where the windowed samples then sit in the FFT buffer changes only the phase.
        start0 = (cfg.n_fft - cfg.win_length) // 2
    frames = np.lib.stride_tricks.as_strided(
        x[start0:],
        shape=(total, cfg.win_length),
        strides=(cfg.hop_length * x.strides[0], x.strides[0]),
        writeable=False,
    )
    # The FFT runs in float32, ~1.6x faster than in float64. Its rounding error (~1e-7 of the
    # frame's energy) is harmless in loud bands, but log(mel + 0.01) magnifies it to ~1e-3 in the
    # near-silent bands of a frame holding a full-scale tone: frames whose error bound is too
    # large for some band are recomputed in float64. The mel sums add non-negative terms, so
    # float32 keeps them exact to float32 precision relative to themselves.
    buf = np.zeros((min(chunk, total), cfg.n_fft), dtype=np.float32)
    for start in range(0, total, chunk):
        block = _condition(frames[start : start + chunk], cfg)
        spec, sq = _spectrum(block, plan, cfg, buf[: len(block)])
        scale = _scale(_mel_sums(spec, plan), cfg)
        redo = _unsure_frames(sq, scale, plan, cfg.spectrum)
        if len(redo):
            wide = np.zeros((len(redo), cfg.n_fft), dtype=np.float64)
            scale[:, redo] = _scale(
                _mel_sums(_spectrum(block[redo], plan, cfg, wide)[0], plan), cfg
            )
        _log(scale, cfg)
        out[start : start + len(block)] = scale.T


def _check_shape(x: np.ndarray, cfg: FrontendConfig) -> None:
    if x.ndim == 0:
        raise ValueError("waveform must have a samples axis: (..., samples)")
    if x.ndim >= 2 and x.shape[-1] < cfg.win_length and x.shape[-2] > x.shape[-1]:
        # (samples, channels) audio read channels-last: every "recording" would be a handful of
        # samples long, giving zero frames for each of thousands of rows instead of an error.
        raise ValueError(
            f"waveform of shape {x.shape} looks like (samples, channels): log_mel takes "
            f"(..., samples) with samples last; pass waveform.T (or one channel) instead"
        )


def log_mel(
    waveform: Any, cfg: FrontendConfig = DEFAULT, *, chunk_frames: int = CHUNK_FRAMES
) -> np.ndarray:
    """Log-mel features: ``(..., samples) -> (..., frames, n_mels)`` float32.

    ``frames`` is :func:`num_frames` of the sample count: with the VGGish preset
    ``1 + (samples - win_length) // hop_length`` (0 when shorter than one frame), the reference
    framing, no centring, no padding. A 1-D waveform shorter than one frame gives 0 frames; a
    2-D or higher array whose last axis is shorter than one frame and shorter than the axis
    before it is refused (``ValueError``): it is almost surely ``(samples, channels)``.

    Float32 and float64 input agree with the float64 reference to better than 1e-4 on the log
    scale (typically 1e-6; see the module notes); integer input is read as PCM and scaled to
    [-1, 1). Memory beyond the output is bounded by ``chunk_frames``. The FFT is single-threaded
    and the mel sums use no BLAS, so the result is the same bit for bit on any number of
    threads; parallelism comes from workers.
    """
    x = _as_float(waveform)
    _check_shape(x, cfg)
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
