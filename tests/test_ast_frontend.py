"""The AST (Kaldi fbank) front end against transformers' ASTFeatureExtractor, numpy path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avfuse.melspec import AST_MEAN, AST_STD, FrontendConfig, log_mel, num_frames

SR = 16000


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
