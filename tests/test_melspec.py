"""The log-mel front ends: VGGish against a naive implementation written from its definition,
PANNs against torchlibrosa and librosa, AST against transformers' feature extractor."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import numpy as np
import pytest

from avfuse.config import load_config, save_config
from avfuse.melspec import (
    AST_MEAN,
    AST_STD,
    FrontendConfig,
    frame_examples,
    hertz_to_mel,
    log_mel,
    mel_matrix,
    mel_to_hertz,
    num_frames,
)

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


# -------------------------------------------------------------------------------- the AST front end


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(2 * SR) / SR
    return {
        "noise": (0.1 * rng.standard_normal(2 * SR)).astype(np.float32),
        "chirp": (0.9 * np.sin(2 * np.pi * (100 * t + 1500 * t**2))).astype(np.float32),
        # A DC offset: Kaldi removes each frame's mean, so it must not reach the low bands.
        "tone_on_dc": (0.5 + 0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        # Hard zeros in the middle hit the mel floor; the quiet tail sits just above it.
        "gap": np.concatenate(
            [0.3 * rng.standard_normal(8000), np.zeros(8000), 1e-4 * rng.standard_normal(8000)]
        ).astype(np.float32),
        "square": (0.8 * np.sign(np.sin(2 * np.pi * 997 * t[:12345]))).astype(np.float32),
        "one_frame": (0.2 * rng.standard_normal(559)).astype(np.float32),
        "two_frames": (0.2 * rng.standard_normal(560)).astype(np.float32),
    }


def _extractor(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> object:
    """transformers' ASTFeatureExtractor forced onto its numpy path (no torchaudio)."""
    pytest.importorskip("transformers")
    from transformers.models.audio_spectrogram_transformer import (
        feature_extraction_audio_spectrogram_transformer as fe_mod,
    )

    # The extractor picks torchaudio's Kaldi fbank when it is importable, at construction and
    # at call time: the numpy path is the one to match without torchaudio installed.
    monkeypatch.setattr(fe_mod, "is_speech_available", lambda: False)
    return fe_mod.ASTFeatureExtractor(max_length=4000, **kwargs)


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_transformers_numpy_path(monkeypatch: pytest.MonkeyPatch, normalize: bool) -> None:
    fe = _extractor(monkeypatch, do_normalize=normalize)
    cfg = FrontendConfig.ast() if normalize else FrontendConfig.ast(mean=0.0, std=0.0)
    for name, x in _signals().items():
        ref = fe(x, sampling_rate=SR, return_tensors="np")["input_values"][0]  # type: ignore[operator]
        ours = log_mel(x, cfg)
        n = num_frames(len(x), cfg)
        assert ours.shape == (n, 128), name
        assert n == 1 + (len(x) - 400) // 160
        # The extractor pads its (unnormalised) log-mel with zeros up to max_length.
        tail = ref[n:] * (2 * AST_STD) + AST_MEAN if normalize else ref[n:]
        assert np.all(tail == pytest.approx(0.0, abs=1e-5)), name
        # 1e-4 on the log-mel: on the normalised scale that is 1e-4 / (2 std).
        tol = 1e-4 / (2 * AST_STD) if normalize else 1e-4
        np.testing.assert_allclose(ours, ref[:n], atol=tol, rtol=0, err_msg=name)


def test_checkpoint_statistics_are_applied() -> None:
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    raw = log_mel(x, FrontendConfig.ast(mean=0.0, std=0.0))
    ours = log_mel(x, FrontendConfig.ast(mean=-3.0, std=2.5))
    np.testing.assert_allclose(ours, (raw + 3.0) / 5.0, atol=1e-5)


def test_silence_value_is_the_feature_of_zeros() -> None:
    zeros = np.zeros(SR, dtype=np.float32)
    for cfg in (FrontendConfig.ast(), FrontendConfig(), FrontendConfig.panns()):
        feats = log_mel(np.zeros(cfg.sample_rate, dtype=np.float32), cfg)
        assert np.allclose(feats, cfg.silence_value(), atol=1e-5), cfg
    # Kaldi's floor is float32 epsilon: ln(2^-23), then AudioSet's normalisation.
    assert FrontendConfig.ast().silence_value() == pytest.approx(
        (-23 * np.log(2) - AST_MEAN) / (2 * AST_STD)
    )
    assert log_mel(zeros, FrontendConfig.ast()).shape == (98, 128)


def test_kaldi_window_options() -> None:
    povey = FrontendConfig(window="povey")
    hann = FrontendConfig(window="symmetric_hann")
    # Only values away from their defaults enter the hash: the VGGish preset keeps its own.
    assert FrontendConfig().hash() == FrontendConfig(remove_dc=False, preemphasis=0.0).hash()
    assert len({povey.hash(), hann.hash(), FrontendConfig().hash()}) == 3
    with pytest.raises(ValueError):
        FrontendConfig(preemphasis=1.5)


def test_zero_padding_uses_the_kaldi_floor(tmp_path: Path) -> None:
    from avfuse.data import NormStats, WindowDataset
    from avfuse.store import FeatureStore
    from tests.synthetic import write_store

    fe = FrontendConfig.ast(mean=-3.0, std=2.0)
    write_store(tmp_path, fe, {"a": np.ones((40, 128))})
    store = FeatureStore(tmp_path)
    ds = WindowDataset(store, ["a"], [0], NormStats.identity(128), 100, short_clips="zeros")
    # What an all-zero recording's frames hold: the padding of a short clip is silence.
    zeros = log_mel(np.zeros(SR, dtype=np.float32), fe)
    np.testing.assert_allclose(ds[(0, 0)][0].numpy()[40:], float(zeros[0, 0]), atol=1e-5)


# ------------------------------------------------------------------------------ the PANNs front end


PANNS = FrontendConfig.panns()
PANNS_SR = 32000


def noise_and_tones(seconds: float, sr: int = PANNS_SR, seed: int = 0) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.1 * rng.standard_normal(len(t))
    for f, a in ((220.0, 0.3), (1250.0, 0.2), (6100.0, 0.1), (11000.0, 0.05)):
        x += a * np.sin(2 * np.pi * f * t)
    return x.astype(np.float32)


def test_panns_preset_is_what_panns_uses() -> None:
    c = PANNS
    assert (c.sample_rate, c.win_length, c.hop_length, c.n_fft) == (32000, 1024, 320, 1024)
    assert (c.n_mels, c.fmin, c.fmax) == (64, 50.0, 14000.0)
    assert (c.spectrum, c.mel_scale, c.mel_triangles, c.mel_norm) == (
        "power",
        "slaney",
        "hertz",
        "slaney",
    )
    assert (c.center, c.pad_mode, c.log, c.amin) == (True, "reflect", "db", 1e-10)
    assert c.example_frames == 100  # 1 s: shorter clips are too_short


def test_panns_matches_torchlibrosa_to_a_thousandth_of_a_db() -> None:
    torch = pytest.importorskip("torch")
    stft = pytest.importorskip("torchlibrosa.stft")
    x = noise_and_tones(10.0)
    spectrogram = stft.Spectrogram(
        n_fft=1024,
        hop_length=320,
        win_length=1024,
        window="hann",
        center=True,
        pad_mode="reflect",
        freeze_parameters=True,
    )
    logmel = stft.LogmelFilterBank(
        sr=32000,
        n_fft=1024,
        n_mels=64,
        fmin=50,
        fmax=14000,
        ref=1.0,
        amin=1e-10,
        top_db=None,
        freeze_parameters=True,
    )
    with torch.no_grad():
        want = logmel(spectrogram(torch.from_numpy(x)[None]))[0, 0].numpy()
    got = log_mel(x, PANNS)
    assert got.shape == want.shape == (1 + len(x) // 320, 64) == (1001, 64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_slaney_filterbank_is_librosas() -> None:
    librosa = pytest.importorskip("librosa")
    want = librosa.filters.mel(
        sr=32000, n_fft=1024, n_mels=64, fmin=50.0, fmax=14000.0, dtype=np.float64
    )
    np.testing.assert_allclose(mel_matrix(PANNS), want.T, rtol=1e-9, atol=1e-12)
    # htk=True, norm=None is the same construction on the HTK scale
    cfg = FrontendConfig(mel_triangles="hertz")
    want = librosa.filters.mel(
        sr=16000, n_fft=512, n_mels=64, fmin=125.0, fmax=7500.0, htk=True, norm=None
    )
    np.testing.assert_allclose(mel_matrix(cfg), want.T, rtol=1e-5, atol=1e-7)


def test_mel_scales_are_librosas() -> None:
    librosa = pytest.importorskip("librosa")
    hz = np.array([0.0, 50.0, 700.0, 999.0, 1000.0, 1001.0, 4000.0, 14000.0, 16000.0])
    np.testing.assert_allclose(hertz_to_mel(hz, "slaney"), librosa.hz_to_mel(hz), rtol=1e-12)
    mel = np.linspace(0.0, 60.0, 31)
    np.testing.assert_allclose(mel_to_hertz(mel, "slaney"), librosa.mel_to_hz(mel), rtol=1e-12)
    np.testing.assert_allclose(mel_to_hertz(hertz_to_mel(hz)), hz, rtol=1e-12, atol=1e-9)


def test_mel_scale_slaney_moves_the_vggish_bands() -> None:
    librosa = pytest.importorskip("librosa")
    # The VGGish construction (triangles in the mel domain) on Slaney's scale: each band peaks
    # at its centre frequency on that scale.
    cfg = FrontendConfig(mel_scale="slaney", n_fft=4096)
    centres = librosa.mel_frequencies(64 + 2, fmin=125.0, fmax=7500.0, htk=False)[1:-1]
    freqs = np.linspace(0.0, 8000.0, 4096 // 2 + 1)
    peaks = freqs[mel_matrix(cfg).argmax(axis=0)]
    np.testing.assert_allclose(peaks, centres, atol=8000.0 / 2048)
    assert not np.allclose(mel_matrix(cfg), mel_matrix(FrontendConfig(n_fft=4096)), atol=0.1)


def test_centred_framing_matches_librosa_stft() -> None:
    librosa = pytest.importorskip("librosa")
    # win_length < n_fft: librosa centres the window in its frame, then the frame on 160 t.
    x = noise_and_tones(1.01, sr=16000, seed=3)
    for pad_mode in ("reflect", "constant"):
        cfg = FrontendConfig(center=True, pad_mode=pad_mode, spectrum="power")
        spec = librosa.stft(
            x.astype(np.float64),
            n_fft=512,
            hop_length=160,
            win_length=400,
            window="hann",
            center=True,
            pad_mode=pad_mode,
        )
        want = np.log((np.abs(spec) ** 2).T @ mel_matrix(cfg) + 0.01)
        got = log_mel(x, cfg)
        assert got.shape == want.shape == (1 + len(x) // 160, 64) and num_frames(len(x), cfg)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=pad_mode)


@pytest.mark.parametrize("n", [0, 1, 512, 513, 31679, 31680, 319999, 320000])
def test_centred_frame_counts(n: int) -> None:
    want = 0 if n <= 512 else 1 + n // 320
    assert num_frames(n, PANNS) == want
    assert log_mel(np.zeros(n, np.float32), PANNS).shape == (want, 64)
    assert PANNS.min_samples == 31680  # 99 hops: one 100-frame example
    assert num_frames(PANNS.min_samples, PANNS) == PANNS.example_frames == 100
    assert num_frames(PANNS.min_samples - 1, PANNS) == 99
    odd = FrontendConfig(center=True, n_fft=513, win_length=400)
    assert num_frames(odd.min_samples, odd) == 96 > num_frames(odd.min_samples - 1, odd)


def test_db_log_of_silence_is_the_floor() -> None:
    got = log_mel(np.zeros(PANNS_SR, np.float32), PANNS)
    np.testing.assert_allclose(got, -100.0, atol=1e-4)  # 10 log10(1e-10)
    quieter = log_mel(np.zeros(PANNS_SR, np.float32), dataclasses.replace(PANNS, amin=1e-5))
    np.testing.assert_allclose(quieter, -50.0, atol=1e-4)


def test_existing_store_hashes_are_unchanged(tmp_path: Path) -> None:
    # The hashes stores written before the newer fields carry: they must keep matching.
    assert FrontendConfig().hash() == "18170aa7b64f523b"
    assert FrontendConfig.avslowfast().hash() == "0effaf43237d873e"
    added = {
        "mel_triangles": "hertz",
        "mel_norm": "slaney",
        "center": True,
        "pad_mode": "constant",
        "log": "db",
        "amin": 1e-5,
        "mel_scale": "slaney",
    }
    hashes = {FrontendConfig(**{k: v}).hash() for k, v in added.items()}  # type: ignore[arg-type]
    assert len(hashes) == len(added) and FrontendConfig().hash() not in hashes
    save_config(PANNS, tmp_path / "fe.toml")
    back = load_config(FrontendConfig, tmp_path / "fe.toml")
    assert back == PANNS and back.hash() == PANNS.hash() != FrontendConfig().hash()


def test_unknown_choices_are_refused_by_name() -> None:
    hints = typing.get_type_hints(FrontendConfig)
    literal = [k for k, tp in hints.items() if typing.get_origin(tp) is typing.Literal]
    assert {
        "window",
        "spectrum",
        "mel_scale",
        "mel_triangles",
        "mel_norm",
        "pad_mode",
        "log",
    } <= set(literal)
    for name in literal:
        allowed = typing.get_args(hints[name])
        with pytest.raises(ValueError, match=name) as err:
            FrontendConfig(**{name: "bogus"})
        assert all(repr(a) in str(err.value) for a in allowed)
    with pytest.raises(ValueError, match="amin"):
        FrontendConfig(amin=0.0)


def test_channels_last_audio_is_refused() -> None:
    stereo = np.zeros((16000, 2), np.float32)
    with pytest.raises(ValueError, match="samples, channels"):
        log_mel(stereo)
    assert log_mel(stereo.T).shape == (2, 98, 64)
    # a 1-D recording shorter than a frame is simply frameless, and so is a batch of them
    assert log_mel(np.zeros(300, np.float32)).shape == (0, 64)
    assert log_mel(np.zeros((3, 300), np.float32)).shape == (3, 0, 64)


def test_result_does_not_depend_on_the_blas_thread_count() -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x = noise_and_tones(3.0, sr=16000, seed=5)
    for cfg in (FrontendConfig(), PANNS):
        with threadpoolctl.threadpool_limits(1):
            one = log_mel(x, cfg)
        with threadpoolctl.threadpool_limits(2):
            two = log_mel(x, cfg)
        np.testing.assert_array_equal(one, two)


def test_panns_is_exact_in_near_silent_bands() -> None:
    librosa = pytest.importorskip("librosa")
    # A loud pure tone leaves most bands near silence, where float32 FFT rounding would show as
    # whole decibels; the float64 reference (librosa on float64) says what they must be.
    t = np.arange(2 * PANNS_SR) / PANNS_SR
    x = (0.9 * np.sin(2 * np.pi * 997.0 * t)).astype(np.float32)
    spec = librosa.stft(
        x.astype(np.float64), n_fft=1024, hop_length=320, window="hann", pad_mode="reflect"
    )
    want = 10 * np.log10(np.maximum((np.abs(spec) ** 2).T @ mel_matrix(PANNS), 1e-10))
    got = log_mel(x, PANNS)
    assert want.min() < -60  # (bands far below the tone's)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
