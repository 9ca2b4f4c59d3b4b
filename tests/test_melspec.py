"""The log-mel front end against a naive implementation written from the VGGish definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avfuse.config import load_config, save_config
from avfuse.melspec import FrontendConfig, frame_examples, log_mel, mel_matrix, num_frames

SR = 16000
VGGISH = FrontendConfig()


# --- the naive reference: explicit sums and loops, straight from the definition --------------


def naive_mel_weights(cfg: FrontendConfig) -> np.ndarray:
    """(n_fft//2+1, n_mels): triangles in the HTK mel domain, one band and one bin at a time."""

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    n_bins = cfg.n_fft // 2 + 1
    lo, hi = mel(cfg.fmin), mel(cfg.fmax)
    step = (hi - lo) / (cfg.n_mels + 1)
    weights = np.zeros((n_bins, cfg.n_mels))
    for band in range(cfg.n_mels):
        left, centre, right = lo + band * step, lo + (band + 1) * step, lo + (band + 2) * step
        for k in range(1, n_bins):  # the DC bin belongs to no band
            m = mel(k * (cfg.sample_rate / 2) / (n_bins - 1))
            rising = (m - left) / (centre - left)
            falling = (right - m) / (right - centre)
            weights[k, band] = max(0.0, min(rising, falling))
    return weights


def naive_log_mel(x: np.ndarray, cfg: FrontendConfig = VGGISH) -> np.ndarray:
    """(samples,) -> (frames, n_mels) with explicit DFT sums in float64."""
    x = np.asarray(x, dtype=np.float64)
    starts = []
    s = 0
    while s + cfg.win_length <= len(x):
        starts.append(s)
        s += cfg.hop_length
    n = np.arange(cfg.win_length)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.win_length)  # periodic Hann
    k = np.arange(cfg.n_fft // 2 + 1)
    # X[k] = sum_n x[n] w[n] exp(-2 pi i k n / n_fft): the 400 samples sit at the frame's start,
    # the remaining n_fft - 400 are zeros and add nothing to the sum.
    cos = np.cos(2 * np.pi * np.outer(n, k) / cfg.n_fft)
    sin = np.sin(2 * np.pi * np.outer(n, k) / cfg.n_fft)
    weights = naive_mel_weights(cfg)
    out = np.zeros((len(starts), cfg.n_mels))
    for t, start in enumerate(starts):
        frame = x[start : start + cfg.win_length] * window
        re, im = frame @ cos, -(frame @ sin)
        mag = np.sqrt(re * re + im * im)
        for band in range(cfg.n_mels):
            out[t, band] = math.log(float(np.sum(mag * weights[:, band])) + cfg.log_offset)
    return out


def chirp(seconds: float, f0: float = 60.0, f1: float = 7900.0, amp: float = 0.9) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t * t))).astype(
        np.float32
    )


def noise(n: int, amp: float = 0.5, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# --- tests -----------------------------------------------------------------------------------


def test_mel_matrix_is_the_reference_construction() -> None:
    w = mel_matrix()
    assert w.shape == (257, 64)
    np.testing.assert_allclose(w, naive_mel_weights(VGGISH), atol=1e-12)
    assert not w[0].any()  # DC row
    # Peak 1 without area normalisation: every band's largest weight is close to 1 (the centre
    # falls between bins), never above.
    assert w.max() <= 1.0 and w.max(axis=0).min() > 0.5
    # No weight outside 125..7500 Hz.
    freqs = np.linspace(0, 8000, 257)
    assert not w[(freqs <= 125) | (freqs >= 7500)].any()


@pytest.mark.parametrize(
    "name, signal",
    [
        ("noise", noise(SR)),
        ("quiet noise", noise(SR, amp=1e-3, seed=1)),
        ("chirp", chirp(1.0)),
        ("loud low chirp", chirp(0.6, 30.0, 1500.0, amp=1.0)),
        ("silence", np.zeros(SR, np.float32)),
        ("tone + dc", (0.3 + 0.6 * np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)).astype("f4")),
    ],
)
def test_matches_naive_reference(name: str, signal: np.ndarray) -> None:
    got = log_mel(signal)
    want = naive_log_mel(signal)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (1 + (len(signal) - 400) // 160, 64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)


def test_silence_is_log_offset() -> None:
    np.testing.assert_allclose(log_mel(np.zeros(2000, np.float32)), np.log(0.01), atol=1e-7)


@pytest.mark.parametrize("n", [0, 1, 399, 400, 401, 559, 560, 561, 719, 720, 15599, 15600, 15761])
def test_frame_boundaries(n: int) -> None:
    x = noise(n, seed=n)
    got = log_mel(x)
    want = naive_log_mel(x)
    expected_frames = 0 if n < 400 else 1 + (n - 400) // 160
    assert got.shape == (expected_frames, 64) == want.shape
    assert num_frames(n) == expected_frames
    if expected_frames:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_ten_seconds_give_998_frames() -> None:
    # torch.stft / librosa with the window centred in the FFT frame would give 997.
    assert log_mel(np.zeros(10 * SR, np.float32)).shape == (998, 64)


def test_chunking_does_not_change_values() -> None:
    x = chirp(2.0)
    whole = log_mel(x, chunk_frames=10_000)
    # (the matrix product may round differently for other chunk shapes: float32 precision)
    np.testing.assert_allclose(log_mel(x, chunk_frames=7), whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(log_mel(x, chunk_frames=1), whole, rtol=0, atol=1e-6)


def test_batch_equals_each_item() -> None:
    rng = np.random.default_rng(3)
    batch = (0.3 * rng.standard_normal((3, 2, 5000))).astype(np.float32)
    batch[1, 0] = chirp(5000 / SR)
    batch[2, 1] = 0.0
    out = log_mel(batch)
    assert out.shape == (3, 2, 1 + (5000 - 400) // 160, 64)
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(out[i, j], log_mel(batch[i, j]))
    # a non-contiguous view of the batch gives the same numbers
    np.testing.assert_array_equal(log_mel(batch[:, 1])[1], log_mel(batch[1, 1].copy()))


def test_float32_and_float64_inputs_agree() -> None:
    x64 = 0.5 * np.random.default_rng(4).standard_normal(2 * SR) + chirp(2.0)
    a = log_mel(x64)
    b = log_mel(x64.astype(np.float32))
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a, naive_log_mel(x64), rtol=0, atol=1e-4)


def test_int16_input_is_scaled_like_the_reference() -> None:
    pcm = (noise(4000) * 32767).astype(np.int16)
    np.testing.assert_allclose(
        log_mel(pcm), naive_log_mel(pcm.astype(np.float64) / 32768.0), atol=1e-4
    )


def test_short_recordings_are_reported_not_padded() -> None:
    cfg = VGGISH
    assert cfg.min_samples == 15600  # 0.975 s
    short = log_mel(noise(15599))
    assert short.shape == (95, 64)
    assert frame_examples(short, 96).shape == (0, 96, 64)
    exact = log_mel(noise(15600))
    ex = frame_examples(exact, 96)
    assert ex.shape == (1, 96, 64)
    np.testing.assert_array_equal(ex[0], exact)


def test_frame_examples_slices() -> None:
    seq = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    ex = frame_examples(seq, 96, hop=48)
    assert ex.shape == (1 + (300 - 96) // 48, 96, 4)
    for i in range(len(ex)):
        np.testing.assert_array_equal(ex[i], seq[48 * i : 48 * i + 96])


def test_avslowfast_preset_matches_naive() -> None:
    cfg = FrontendConfig.avslowfast()
    assert (cfg.win_length, cfg.hop_length, cfg.n_mels) == (512, 256, 80)
    x = chirp(0.5) + noise(SR // 2, amp=0.05)
    got = log_mel(x, cfg)
    assert got.shape == (1 + (len(x) - 512) // 256, 80)
    np.testing.assert_allclose(got, naive_log_mel(x, cfg), rtol=0, atol=1e-4)


def test_hash_is_stable_and_distinguishes_presets(tmp_path) -> None:
    a, b = FrontendConfig(), FrontendConfig.vggish()
    assert a.hash() == b.hash() and len(a.hash()) == 16
    assert a.hash() != FrontendConfig.avslowfast().hash()
    assert a.hash() != FrontendConfig(log_offset=0.001).hash()
    save_config(a, tmp_path / "fe.toml")
    assert load_config(FrontendConfig, tmp_path / "fe.toml").hash() == a.hash()


def test_invalid_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_fft"):
        FrontendConfig(n_fft=256)
    with pytest.raises(ValueError, match="fmax"):
        FrontendConfig(fmax=9000.0)


def test_agrees_with_librosa_stft_when_framing_is_aligned() -> None:
    librosa = pytest.importorskip("librosa")
    x = noise(SR, seed=7) + chirp(1.0)
    # librosa centres the 400-sample window in the 512-sample frame (56 samples in); without
    # centring its frame t starts at 160 t, so our framing of x[56:] is the same analysis.
    spec = librosa.stft(
        x.astype(np.float64),
        n_fft=512,
        hop_length=160,
        win_length=400,
        window="hann",
        center=False,
    )
    theirs = np.log(np.abs(spec).T @ mel_matrix() + 0.01)
    ours = log_mel(x[56:])
    # librosa needs 512 samples for its last frame, the reference only 400: one frame more here.
    assert ours.shape == (len(theirs) + 1, 64)
    ours = ours[: len(theirs)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
