"""Stage 1: decoding sound tracks (content, levels, bad files) and the resumable extract stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from avfuse.config import load_config
from avfuse.extract import (
    COLUMNS,
    ExtractConfig,
    decode_audio,
    extract,
    finished_settings,
    invalidate,
    is_done,
    load_audio,
    outputs,
    write_audio,
)
from avfuse.io import TMP_MARK, read_table
from avfuse.manifest import ScanConfig, scan
from tests.media import AudioTrack, peak_frequency, rms, tone, write_media, write_tone_video

REPO = Path(__file__).resolve().parents[1]
SR = 16000
AVFUSE = [sys.executable, "-m", "avfuse"]


def _assert_tone(
    x: np.ndarray, freq: float, seconds: float, amplitude: float, tol_s: float
) -> None:
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / SR - seconds) <= tol_s, len(x) / SR
    # Skip the edges: codec priming and resampler ramps.
    mid = x[len(x) // 10 : len(x) - len(x) // 10]
    assert abs(peak_frequency(mid, SR) - freq) < 2.5 * SR / len(mid) + 1
    assert rms(mid) == pytest.approx(amplitude / np.sqrt(2), rel=0.06)


# --- decode_audio on formats ---------------------------------------------------------------


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


# --- bad inputs -----------------------------------------------------------------------------


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


# --- writing and reading extracted audio ---------------------------------------------------


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


# --- the stage ------------------------------------------------------------------------------


def _dataset(root: Path) -> dict[str, tuple[str, float]]:
    """A small dataset with good and bad files; returns {video_id: (expected status, freq)}."""
    expect: dict[str, tuple[str, float]] = {}
    for split in ("train", "val"):
        for cls, f in (("abseiling", 440.0), ("playing ukulele", 660.0)):
            for i in range(2):
                p = root / split / cls / f"v{i}.mp4"
                write_tone_video(p, freq=f, duration=1.0, rate=44100, codec="aac")
                expect[f"{split}/{cls}/v{i}"] = ("ok", f)
    # Same stem in another class is another video.
    write_tone_video(root / "train" / "zumba" / "v0.webm", freq=880, rate=48000, codec="libopus")
    expect["train/zumba/v0"] = ("ok", 880.0)
    write_media(root / "val" / "zumba" / "silent film.mp4", [])
    expect["val/zumba/silent film"] = ("no_audio", 0)
    (root / "val" / "abseiling" / "empty.mp4").write_bytes(b"")
    expect["val/abseiling/empty"] = ("unreadable", 0)
    (root / "val" / "abseiling" / "noise.mkv").write_bytes(np.random.default_rng(2).bytes(4096))
    expect["val/abseiling/noise"] = ("unreadable", 0)
    write_tone_video(root / "val" / "zumba" / "ñandú 日本.avi", freq=550, codec="pcm_s16le")
    expect["val/zumba/ñandú 日本"] = ("ok", 550.0)
    return expect


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[str, tuple[str, float]]]:
    expect = _dataset(tmp_path / "data")
    work = tmp_path / "work"
    scan(ScanConfig(root=tmp_path / "data", work=work))
    return work, expect


def _check_outputs(
    work: Path, expect: dict[str, tuple[str, float]], fmt: str = "flac"
) -> pd.DataFrame:
    table = read_table(work / "extract.parquet")
    assert list(table.columns) == list(COLUMNS)
    assert sorted(table["video_id"]) == sorted(expect)
    for rec in table.itertuples(index=False):
        status, freq = expect[rec.video_id]
        assert rec.status == status, (rec.video_id, rec.reason)
        if status == "ok":
            assert rec.audio_path == f"audio/{rec.video_id}.{fmt}"
            x = load_audio(work / rec.audio_path)
            assert len(x) == rec.num_samples
            assert rec.duration_s == pytest.approx(len(x) / rec.sample_rate)
            assert peak_frequency(x, rec.sample_rate) == pytest.approx(freq, abs=3)
        else:
            assert rec.audio_path == "" and rec.reason
    outputs = sorted(p for p in (work / "audio").rglob("*") if p.is_file())
    assert not [p for p in outputs if TMP_MARK in p.name]
    assert len(outputs) == sum(s == "ok" for s, _ in expect.values())
    return table


def test_extract_stage(dataset) -> None:
    work, expect = dataset
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    table = _check_outputs(work, expect)
    assert res.processed == len(expect) and res.skipped == 0
    assert res.counts == {"ok": 10, "no_audio": 1, "unreadable": 2}
    failures = pd.read_csv(work / "extract_failures.csv")
    assert sorted(failures["video_id"]) == sorted(v for v, (s, _) in expect.items() if s != "ok")
    assert failures["reason"].notna().all()
    text = res.summary()
    assert "ok: 10" in text and "unreadable: 2" in text and "no_audio: 1" in text
    assert str(work / "extract_failures.csv") in text
    row = table.set_index("video_id").loc["train/abseiling/v0"]
    assert (row.codec, row.source_sample_rate, row.channels, row.sample_rate) == (
        "aac",
        44100,
        2,
        16000,
    )
    assert load_config(ExtractConfig, work / "extract.toml") == ExtractConfig(
        work=work, num_workers=0, progress=False
    )


def test_extract_resumes_and_force_redoes(dataset) -> None:
    work, expect = dataset
    cfg = ExtractConfig(work=work, num_workers=0, progress=False)
    extract(cfg)
    again = extract(cfg)
    assert (again.processed, again.skipped) == (0, len(expect))
    # A lost output and a temporary left by a killed writer: only that video is redone.
    lost = work / "audio" / "val" / "abseiling" / "v1.flac"
    lost.unlink()
    stale = lost.with_name(f".v0.flac{TMP_MARK}999-deadbeef.flac")
    stale.write_bytes(b"half a file")
    part_stale = work / "extract" / "parts" / f".part-x.parquet{TMP_MARK}1-2.parquet"
    part_stale.write_bytes(b"half a part")
    third = extract(cfg)
    assert (third.processed, third.skipped) == (1, len(expect) - 1)  # failures are final
    _check_outputs(work, expect)
    assert not stale.exists() and not part_stale.exists()
    forced = extract(ExtractConfig(work=work, num_workers=0, progress=False, force=True))
    assert (forced.processed, forced.skipped) == (len(expect), 0)
    _check_outputs(work, expect)


def test_invalidated_videos_are_decoded_again_and_nothing_else(dataset) -> None:
    """``invalidate`` is how the orchestrator has chosen videos redone (a replaced file): the
    next run decodes exactly those, and the table holds their fresh, complete records."""
    work, expect = dataset
    cfg = ExtractConfig(work=work, num_workers=0, progress=False)
    extract(cfg)
    chosen = ["train/abseiling/v1", "val/zumba/silent film"]
    assert invalidate(work, chosen, "the video file changed") == 2
    again = extract(cfg)
    assert (again.processed, again.skipped) == (2, len(expect) - 2)
    table = _check_outputs(work, expect)  # statuses as decoded, not the invalidation's error
    assert not table["reason"].str.contains("the video file changed").any()


def test_is_done_and_finished_settings_follow_the_files(dataset) -> None:
    work, _ = dataset
    cfg = ExtractConfig(work=work, num_workers=0, progress=False)
    assert outputs(cfg) == [work / "extract.parquet"]
    assert not is_done(cfg) and finished_settings(cfg) is None
    extract(cfg)
    assert is_done(cfg) and finished_settings(cfg) == cfg
    # Settings saved after the table: a later run started and may not have finished.
    saved = work / "extract.toml"
    later = (work / "extract.parquet").stat().st_mtime_ns + 10**9
    os.utime(saved, ns=(later, later))
    assert finished_settings(cfg) is None
    os.utime(saved, ns=(later - 2 * 10**9, later - 2 * 10**9))
    assert finished_settings(cfg) == cfg
    saved.write_text("sample_rate = [")  # unreadable settings vouch for nothing
    os.utime(saved, ns=(later - 2 * 10**9, later - 2 * 10**9))
    assert finished_settings(cfg) is None


def test_a_rerun_with_nothing_to_do_leaves_the_table_and_a_rescan_rewrites_it(dataset) -> None:
    """A finished rerun reads a few columns and writes nothing; a changed manifest recommits."""
    work, expect = dataset
    cfg = ExtractConfig(work=work, num_workers=0, progress=False)
    first = extract(cfg)
    table = work / "extract.parquet"
    before = (table.stat().st_mtime_ns, table.stat().st_ino, table.read_bytes())
    again = extract(cfg)
    assert (table.stat().st_mtime_ns, table.stat().st_ino, table.read_bytes()) == before
    assert (again.processed, again.skipped) == (0, len(expect))
    assert again.counts == first.counts and again.audio_s == pytest.approx(first.audio_s)
    # The full table is still there for whoever asks, for the selected videos only.
    pd.testing.assert_frame_equal(again.table, first.table)
    assert sorted(pd.read_csv(work / "extract_failures.csv")["video_id"]) == sorted(
        v for v, (st, _) in expect.items() if st != "ok"
    )
    # One video leaves the dataset: the table follows the new manifest.
    man = pd.read_parquet(work / "manifest.parquet")
    gone = "train/abseiling/v0"
    man[man["video_id"] != gone].to_parquet(work / "manifest.parquet", index=False)
    third = extract(cfg)
    assert table.stat().st_ino != before[1]
    assert gone not in set(pd.read_parquet(table)["video_id"])
    assert sum(third.counts.values()) == len(expect) - 1


def test_extract_refuses_a_different_rate_without_force(dataset) -> None:
    work, expect = dataset
    extract(ExtractConfig(work=work, num_workers=0, progress=False, splits=("train",)))
    with pytest.raises(ValueError, match="--force"):
        extract(ExtractConfig(work=work, num_workers=0, progress=False, sample_rate=8000))
    res = extract(
        ExtractConfig(
            work=work, num_workers=0, progress=False, sample_rate=8000, format="wav", force=True
        )
    )
    assert set(res.table["sample_rate"]) == {8000}
    _check_outputs(work, expect, fmt="wav")


def test_extract_split_filter_and_missing_file(dataset) -> None:
    work, expect = dataset
    gone = next((work.parent / "data" / "val" / "abseiling").glob("v1.mp4"))
    gone.unlink()
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False, splits=("val",)))
    assert set(res.table["video_id"]) == {v for v in expect if v.startswith("val/")}
    row = res.table.set_index("video_id").loc["val/abseiling/v1"]
    assert row.status == "missing" and "not found" in row.reason
    # A later run on the other split adds to the table instead of replacing it.
    extract(ExtractConfig(work=work, num_workers=0, progress=False, splits=("train",)))
    assert set(read_table(work / "extract.parquet")["video_id"]) == set(expect)
    with pytest.raises(ValueError, match="not in the manifest"):
        extract(ExtractConfig(work=work, num_workers=0, progress=False, splits=("tset",)))


def test_extract_with_worker_processes_matches_inline(dataset, tmp_path) -> None:
    work, expect = dataset
    extract(ExtractConfig(work=work, num_workers=2, progress=False, batch_size=2))
    pooled = _check_outputs(work, expect)
    inline_work = tmp_path / "work_inline"
    scan(ScanConfig(root=tmp_path / "data", work=inline_work))
    extract(ExtractConfig(work=inline_work, num_workers=0, progress=False))
    inline = read_table(inline_work / "extract.parquet")
    pd.testing.assert_frame_equal(pooled, inline)
    for rel in pooled["audio_path"]:
        if rel:
            assert (work / rel).read_bytes() == (inline_work / rel).read_bytes()


def test_workers_do_not_import_torch(dataset) -> None:
    work, _ = dataset
    code = textwrap.dedent(
        f"""
        import sys
        from avfuse.extract import _extract_batch
        tasks = [{{"video_id": "x", "path": {str(next((work.parent / "data").rglob("v0.mp4")))!r},
                  "audio_path": "audio/x.flac"}}]
        recs = _extract_batch(tasks, {str(work)!r}, 16000, {str(work / "parts-probe")!r})
        assert recs[0]["status"] == "ok", recs
        print("torch" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


def test_cli_extract_and_sigkill_then_resume(tmp_path) -> None:
    """Kill -9 an extraction mid-run (workers included); the rerun finishes with valid outputs."""
    expect: dict[str, tuple[str, float]] = {}
    for i in range(24):
        cls = f"class{i % 3}"
        f = 300.0 + 100 * (i % 3)
        write_tone_video(
            tmp_path / "data" / "train" / cls / f"c{i:02d}.mkv",
            freq=f,
            duration=1.0,
            codec="pcm_s16le",
            rate=16000,
            channels=1,
            video=False,
        )
        expect[f"train/{cls}/c{i:02d}"] = ("ok", f)
    work = tmp_path / "work"
    scan(ScanConfig(root=tmp_path / "data", work=work))
    # Slow every decode down (in the workers too) so the kill lands mid-run: a sitecustomize
    # patches avfuse.extract in every Python process started with this PYTHONPATH.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import time
            import avfuse.extract as e
            _orig = e.decode_audio
            def _slow(*a, **k):
                time.sleep(0.15)
                return _orig(*a, **k)
            e.decode_audio = _slow
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO / "src")]))
    cmd = [
        *AVFUSE,
        "extract",
        str(work),
        "--num-workers",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    parts = work / "extract" / "parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)  # let orphaned pool workers notice
    assert not (work / "extract.parquet").exists()  # killed before the end
    n_logged = len(pd.concat([read_table(p) for p in parts.glob("part-*.parquet")]))
    assert 0 < n_logged < len(expect)

    out = subprocess.run(
        [
            *AVFUSE,
            "extract",
            str(work),
            "--num-workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )
    assert out.returncode == 0, out.stderr
    assert f"{len(expect)} videos" in out.stdout and "ok: 24" in out.stdout
    assert f"{n_logged} already done" in out.stdout
    _check_outputs(work, expect)
    assert not [p for p in work.rglob("*") if TMP_MARK in p.name]


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


def test_an_unexpected_error_fails_one_video_not_the_batch(tmp_path, monkeypatch) -> None:
    import avfuse.extract as ex

    good = write_tone_video(tmp_path / "good.mkv", codec="pcm_s16le", video=False)
    odd = write_tone_video(tmp_path / "odd.mkv", codec="pcm_s16le", video=False)
    real = ex.decode_audio

    def flaky(path, sample_rate=SR, **kw):  # type: ignore[no-untyped-def]
        if Path(path).name == "odd.mkv":
            raise MemoryError("simulated decoder failure")
        return real(path, sample_rate, **kw)

    monkeypatch.setattr(ex, "decode_audio", flaky)
    tasks = [
        {"video_id": "a/good", "path": str(good), "audio_path": "audio/a/good.flac"},
        {"video_id": "a/odd", "path": str(odd), "audio_path": "audio/a/odd.flac"},
    ]
    recs = {
        r["video_id"]: r for r in ex._extract_batch(tasks, str(tmp_path), SR, str(tmp_path / "log"))
    }
    assert recs["a/good"]["status"] == "ok"
    assert recs["a/odd"]["status"] == "unreadable" and "simulated" in recs["a/odd"]["reason"]
