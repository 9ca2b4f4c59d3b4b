"""The PANNs front end against torchlibrosa and librosa; front-end options, hashes, refusals."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest

from avfuse.config import load_config, save_config
from avfuse.melspec import (
    FrontendConfig,
    hertz_to_mel,
    log_mel,
    mel_matrix,
    mel_to_hertz,
    num_frames,
)

PANNS = FrontendConfig.panns()
SR = 32000


def noise_and_tones(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
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
    got = log_mel(np.zeros(SR, np.float32), PANNS)
    np.testing.assert_allclose(got, -100.0, atol=1e-4)  # 10 log10(1e-10)
    quieter = log_mel(np.zeros(SR, np.float32), dataclasses.replace(PANNS, amin=1e-5))
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


def test_run_extracts_at_the_front_ends_rate() -> None:
    from avfuse.runconfig import RunConfig, stage_configs

    cfg = RunConfig(root=Path("data"), work=Path("w"))
    assert stage_configs(cfg).extract.sample_rate == 16000
    panns = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, frontend=PANNS))
    assert stage_configs(panns).extract.sample_rate == 32000
    clash = dataclasses.replace(panns, extract=dataclasses.replace(cfg.extract, sample_rate=22050))
    with pytest.raises(ValueError, match="sample_rate"):
        stage_configs(clash)


def test_panns_is_exact_in_near_silent_bands() -> None:
    librosa = pytest.importorskip("librosa")
    # A loud pure tone leaves most bands near silence, where float32 FFT rounding would show as
    # whole decibels; the float64 reference (librosa on float64) says what they must be.
    t = np.arange(2 * SR) / SR
    x = (0.9 * np.sin(2 * np.pi * 997.0 * t)).astype(np.float32)
    spec = librosa.stft(
        x.astype(np.float64), n_fft=1024, hop_length=320, window="hann", pad_mode="reflect"
    )
    want = 10 * np.log10(np.maximum((np.abs(spec) ** 2).T @ mel_matrix(PANNS), 1e-10))
    got = log_mel(x, PANNS)
    assert want.min() < -60  # (bands far below the tone's)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_options_reach_the_features_config_from_the_command_line() -> None:
    from avfuse.config import apply_overrides
    from avfuse.features import FeaturesConfig

    base = FeaturesConfig(work=Path("w"))
    cfg = apply_overrides(base, ["frontend.center=true", 'frontend.mel_scale="slaney"'])
    assert cfg.frontend.center and cfg.frontend.mel_scale == "slaney"
    assert cfg.frontend.hash() == FrontendConfig(center=True, mel_scale="slaney").hash()
    with pytest.raises(ValueError, match="mel_norm"):
        apply_overrides(base, ['frontend.mel_norm="area"'])
