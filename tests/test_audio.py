"""Decoding sound tracks (PyAV): formats, downmix, resampling, damaged files; writing and loading
extracted audio."""

from __future__ import annotations

import av
import numpy as np
import pytest

from avfuse.extract import decode_audio, load_audio, write_audio
from avfuse.io import TMP_MARK
from tests.media import AudioTrack, peak_frequency, rms, tone, write_media, write_tone_video

SR = 16000


def _assert_tone(
    x: np.ndarray, freq: float, seconds: float, amplitude: float, tol_s: float
) -> None:
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / SR - seconds) <= tol_s, len(x) / SR
    # Skip the edges: codec priming and resampler ramps.
    mid = x[len(x) // 10 : len(x) - len(x) // 10]
    assert abs(peak_frequency(mid, SR) - freq) < 2.5 * SR / len(mid) + 1
    assert rms(mid) == pytest.approx(amplitude / np.sqrt(2), rel=0.06)


@pytest.mark.parametrize(
    ("name", "codec", "rate", "channels", "decoded_codec"),
    [
        ("stereo44k.mp4", "aac", 44100, 2, "aac"),  # planar float
        ("five1_48k.mp4", "aac", 48000, 6, "aac"),
        ("mono8k.mp4", "aac", 8000, 1, "aac"),
        ("opus.mkv", "libopus", 48000, 2, "opus"),
        ("opus.webm", "libopus", 48000, 2, "opus"),
        ("vorbis.webm", "vorbis", 44100, 2, "vorbis"),
        ("mp3.avi", "libmp3lame", 44100, 2, "mp3float"),
        ("pcm16.avi", "pcm_s16le", 44100, 2, "pcm_s16le"),  # packed int16
        ("pcmf32_22k.mkv", "pcm_f32le", 22050, 2, "pcm_f32le"),  # packed float
        ("flac96k.mkv", "flac", 96000, 2, "flac"),
        ("u8_5ch.mkv", "pcm_u8", 11025, 6, "pcm_u8"),  # unsigned, offset 128
    ],
)
def test_decode_formats_give_the_tone(tmp_path, name, codec, rate, channels, decoded_codec) -> None:
    sig = np.tile(tone(440, 1.0, rate, 0.5), (channels, 1))
    if channels == 6:
        sig[3] = 0  # the LFE channel: AAC low-passes it, so leave it silent; mean = 5/6 level
    level = 0.5 * (5 / 6 if channels == 6 else 1)
    p = write_media(tmp_path / name, [AudioTrack(sig, rate, codec=codec)])
    res = decode_audio(p, SR)
    assert res.status == "ok", res.reason
    assert (res.codec, res.source_sample_rate, res.channels) == (decoded_codec, rate, channels)
    assert res.sample_rate == SR and res.n_audio_streams == 1
    assert res.stream_index == 1  # the video stream comes first in these files
    _assert_tone(res.samples, 440, 1.0, level, tol_s=0.08)


@pytest.mark.parametrize(("codec", "ext"), [("aac", ".mp4"), ("pcm_s16le", ".avi")])
def test_downmix_is_the_mean_of_channels(tmp_path, codec, ext) -> None:
    # aac decodes to planar float, pcm_s16le to packed int16: both paths are checked.
    left = tone(440, 1.0, 44100, 0.5)
    opposite = decode_audio(
        write_media(
            tmp_path / f"lr{ext}", [AudioTrack(np.stack([left, -left]), 44100, codec=codec)]
        )
    )
    assert rms(opposite.samples) < 2e-3  # L = -R cancels: mean, not a sum or left-only
    one_side = decode_audio(
        write_media(
            tmp_path / f"l0{ext}", [AudioTrack(np.stack([left, 0 * left]), 44100, codec=codec)]
        )
    )
    # Mean: half the amplitude (0.25). FFmpeg's float downmix 0.707*(L+R) would give 0.354.
    assert rms(one_side.samples) == pytest.approx(0.25 / np.sqrt(2), rel=0.03)


def test_51_downmix_level(tmp_path) -> None:
    # Tone on the front-left channel only, 6 channels: mean = amplitude / 6.
    sig = np.zeros((6, 48000), np.float32)
    sig[0] = tone(1000, 1.0, 48000, 0.6)
    res = decode_audio(write_media(tmp_path / "fl.mkv", [AudioTrack(sig, 48000, codec="flac")]))
    assert res.channels == 6
    assert rms(res.samples[1000:-1000]) == pytest.approx(0.1 / np.sqrt(2), rel=0.01)
    assert peak_frequency(res.samples, SR) == pytest.approx(1000, abs=2)


def test_resampling_keeps_frequency_and_length(tmp_path) -> None:
    p = write_tone_video(tmp_path / "a.mkv", freq=3000, duration=2.0, rate=44100, codec="pcm_s16le")
    for target in (8000, 16000, 22050):
        res = decode_audio(p, target)
        assert res.sample_rate == target
        assert len(res.samples) == pytest.approx(2 * target, abs=2)
        assert peak_frequency(res.samples, target) == pytest.approx(3000, abs=1)
    # A rate already at the target is passed through sample-exactly (s16 -> /32768).
    same = decode_audio(
        write_tone_video(tmp_path / "b.mkv", rate=16000, channels=1, codec="pcm_s16le"), 16000
    )
    expected = np.rint(tone(440, 1.0, 16000, 0.5) * 32767) / 32768  # swr's float->s16 rounding
    np.testing.assert_allclose(same.samples, expected, atol=1.5 / 32768)


def test_short_and_long_clips(tmp_path) -> None:
    short = decode_audio(write_tone_video(tmp_path / "short.mkv", duration=0.3, codec="pcm_s16le"))
    assert short.status == "ok"
    assert len(short.samples) == pytest.approx(0.3 * SR, abs=2)
    assert peak_frequency(short.samples, SR) == pytest.approx(440, abs=8)

    # 3 minutes: 440 Hz for the first half, 880 Hz for the second; mono 8 kHz PCM keeps it cheap.
    half = 90.0
    sig = np.concatenate([tone(440, half, 8000, 0.5), tone(880, half, 8000, 0.5)])
    p = write_media(
        tmp_path / "long.mkv",
        [AudioTrack(sig, 8000, codec="pcm_s16le", frame_samples=32768)],
        fps=1,
    )
    res = decode_audio(p)
    assert res.status == "ok"
    assert len(res.samples) == pytest.approx(180 * SR, abs=4)
    x = res.samples
    assert peak_frequency(x[10 * SR : 11 * SR], SR) == pytest.approx(440, abs=1)
    assert peak_frequency(x[100 * SR : 101 * SR], SR) == pytest.approx(880, abs=1)
    assert peak_frequency(x[-SR:], SR) == pytest.approx(880, abs=1)  # no drift at the end


def test_two_audio_streams_take_the_default(tmp_path) -> None:
    a = AudioTrack(np.stack([tone(440, 1, 44100)] * 2), 44100, codec="aac", default=False)
    b = AudioTrack(tone(880, 1, 48000)[None], 48000, codec="libopus", default=True)
    res = decode_audio(write_media(tmp_path / "two.mkv", [a, b]))
    assert res.n_audio_streams == 2
    assert res.stream_index == 2 and res.codec == "opus"
    assert peak_frequency(res.samples, SR) == pytest.approx(880, abs=2)
    # Without a default flag the first audio stream is taken.
    a0 = AudioTrack(a.signal, 44100, codec="aac", default=False)
    b0 = AudioTrack(b.signal, 48000, codec="libopus", default=False)
    first = decode_audio(write_media(tmp_path / "two0.mkv", [a0, b0]))
    assert first.stream_index == 1
    assert peak_frequency(first.samples, SR) == pytest.approx(440, abs=2)


def test_non_ascii_and_spaces_in_names(tmp_path) -> None:
    p = write_tone_video(tmp_path / "jüdo çlass" / "clip 日本 ñ.mp4", freq=660)
    res = decode_audio(p)
    assert res.status == "ok"
    assert peak_frequency(res.samples, SR) == pytest.approx(660, abs=2)


def test_bad_files_get_a_status_and_reason(tmp_path) -> None:
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 100)
    (tmp_path / "notes.txt").write_text("this is not a video either\n" * 100)
    noaudio = write_media(tmp_path / "noaudio.mp4", [], duration=1.0)
    for name in ("zero.mp4", "random.mp4", "text.mp4"):
        res = decode_audio(tmp_path / name)
        assert res.status == "unreadable", name
        assert res.reason and "\n" not in res.reason
        assert len(res.samples) == 0
    res = decode_audio(noaudio)
    assert (res.status, res.n_audio_streams) == ("no_audio", 0)
    assert "no audio stream" in res.reason and "video" in res.reason
    # FFmpeg opens a .txt as an ANSI-art "video": still no audio, never a crash.
    assert decode_audio(tmp_path / "notes.txt").status in ("no_audio", "unreadable")
    # A file that cannot be opened (here: gone) is a read failure, retried by a rerun.
    assert decode_audio(tmp_path / "absent.mp4").status == "error"


def test_audio_stream_without_samples_is_empty_audio(tmp_path) -> None:
    p = write_media(
        tmp_path / "e.mkv",
        [AudioTrack(np.zeros((2, 0), np.float32), 44100, codec="aac")],
        duration=1.0,
    )
    res = decode_audio(p)
    assert res.status == "empty_audio"
    assert res.n_audio_streams == 1 and res.reason


@pytest.mark.parametrize(("ext", "options"), [(".mp4", {"movflags": "faststart"}), (".mkv", None)])
def test_truncated_file_is_partial_with_the_audio_before_the_damage(tmp_path, ext, options) -> None:
    full = write_tone_video(
        tmp_path / f"full{ext}", duration=4.0, codec="aac", container_options=options
    )
    data = full.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    res = decode_audio(cut)
    assert res.status == "partial", res.reason
    assert "\n" not in res.reason and res.reason
    assert 1.0 < res.duration_s < 3.5
    assert peak_frequency(res.samples, SR) == pytest.approx(440, abs=2)
    assert rms(res.samples[SR // 10 : -SR // 10]) == pytest.approx(0.5 / np.sqrt(2), rel=0.06)


@pytest.mark.parametrize("suffix", [".flac", ".wav"])
def test_write_then_load_audio_round_trip(tmp_path, suffix) -> None:
    rng = np.random.default_rng(1)
    x = (0.3 * rng.standard_normal(12345)).astype(np.float32)
    x[0] = 1.5  # clipped, not wrapped around
    p = write_audio(tmp_path / f"a{suffix}", x, 16000)
    y = load_audio(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    expected = np.clip(np.rint(x * 32768), -32768, 32767) / 32768
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    with av.open(str(p)) as c:
        s = c.streams.audio[0]
        assert (s.rate, s.codec_context.channels) == (16000, 1)
    assert len(load_audio(p, sample_rate=8000)) == pytest.approx(12345 / 2, abs=2)
    assert not [q for q in tmp_path.iterdir() if TMP_MARK in q.name]


def test_load_audio_refuses_a_file_without_audio(tmp_path) -> None:
    (tmp_path / "x.flac").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"empty_audio|unreadable"):
        load_audio(tmp_path / "x.flac")


def test_decoding_in_threads_keeps_files_apart(tmp_path) -> None:
    # Dask workers may run several batches in threads of one process: buffers must not be shared.
    from concurrent.futures import ThreadPoolExecutor

    freqs = [300.0, 500.0, 700.0, 900.0, 1100.0, 1300.0]
    paths = [
        write_tone_video(
            tmp_path / f"{int(f)}.mkv", freq=f, duration=2.0, codec="pcm_s16le", video=False
        )
        for f in freqs
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: decode_audio(p), paths * 3))
    for res, f in zip(results, freqs * 3, strict=True):
        assert len(res.samples) == 2 * SR
        assert peak_frequency(res.samples, SR) == pytest.approx(f, abs=1)
        assert rms(res.samples) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
