"""Inputs that used to hang extract or stick: a FIFO or device in place of a video, a file that
decodes without end, and a file read while it was still being written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import avfuse.extract as extract_mod
from avfuse.extract import ExtractConfig, extract, load_audio
from avfuse.io import read_table
from avfuse.manifest import ScanConfig, scan
from tests.media import peak_frequency, write_tone_video

REPO = Path(__file__).resolve().parents[1]
AVFUSE = [sys.executable, "-m", "avfuse"]


def _video(path: Path, freq: float, duration: float = 1.5) -> Path:
    return write_tone_video(path, freq=freq, duration=duration, rate=16000, channels=1, fps=2)


def _dataset(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    victim = _video(root / "train" / "b" / "y.mp4", 880.0)
    work = tmp / "w"
    scan(ScanConfig(root=root, work=work))
    return work, victim


def _records(work: Path) -> dict[str, tuple[str, str]]:
    t = read_table(work / "extract.parquet")
    return {v: (s, r) for v, s, r in zip(t["video_id"], t["status"], t["reason"], strict=True)}


def _cli_extract(work: Path) -> subprocess.CompletedProcess[str]:
    # In a child with a timeout: a hang fails the test instead of stopping the suite.
    return subprocess.run(
        [*AVFUSE, "extract", str(work), "--num-workers", "0", "--no-progress"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)])),
        timeout=180,
    )


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_in_place_of_a_video_is_unreadable_not_a_hang(
    tmp_path: Path, kind: str
) -> None:
    work, victim = _dataset(tmp_path)
    real = victim.read_bytes()
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    else:
        victim.symlink_to("/dev/zero")
    out = _cli_extract(work)
    assert out.returncode == 0, out.stderr
    status, reason = _records(work)["train/b/y"]
    assert status == "unreadable"
    assert ("FIFO" if kind == "fifo" else "character device") in reason
    assert _records(work)["train/a/x"][0] == "ok"
    # The video back in its place: a plain rerun extracts it.
    victim.unlink()
    victim.write_bytes(real)
    out = _cli_extract(work)
    assert out.returncode == 0, out.stderr
    assert _records(work)["train/b/y"][0] == "ok"
    audio = load_audio(work / "audio" / "train" / "b" / "y.flac")
    assert peak_frequency(audio, 16000) == pytest.approx(880, abs=10)


def test_decoding_has_a_time_limit_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, _ = _dataset(tmp_path)
    assert extract_mod.decode_time_limit(10**9) > extract_mod.decode_time_limit(10**6) > 0
    # No time at all: every file is past its limit at the first packet.
    monkeypatch.setattr(extract_mod, "DECODE_BASE_S", 0.0)
    monkeypatch.setattr(extract_mod, "DECODE_S_PER_MB", 0.0)
    extract(ExtractConfig(work=work, num_workers=0, progress=False))
    for status, reason in _records(work).values():
        assert status == "unreadable" and "time limit" in reason


def test_a_file_read_while_still_being_written_is_redone_once_complete(tmp_path: Path) -> None:
    work, victim = _dataset(tmp_path)
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 3])  # the download is a third done
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    extract(ExtractConfig(work=work, num_workers=0, progress=False))
    first, _ = _records(work)["train/b/y"]
    assert first != "ok"
    victim.write_bytes(whole)  # the download finished
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert (res.processed, res.skipped) == (1, 1)
    assert _records(work)["train/b/y"][0] == "ok"
    audio = load_audio(work / "audio" / "train" / "b" / "y.flac")
    assert peak_frequency(audio, 16000) == pytest.approx(880, abs=10)
    # Unchanged since: nothing is redone.
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert (res.processed, res.skipped) == (0, 2)


def _wav(path: Path, seconds: float, freq: float = 440.0) -> None:
    import wave

    import numpy as np

    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def test_a_file_that_changed_between_scan_and_extract_is_redone_when_it_changes_again(
    tmp_path: Path,
) -> None:
    """A download that decodes cleanly at every stage (WAV): scanned at 0.2 s, extracted at
    0.5 s, complete at 1.5 s. Its record is ``ok``, but the file it came from is not the one
    scanned, and it changed since: a plain rerun redoes it."""
    root = tmp_path / "data"
    clip = root / "train" / "a" / "x.wav"
    _wav(clip, 0.2)
    _wav(root / "train" / "b" / "y.wav", 1.0, 880.0)
    work = tmp_path / "w"
    scan(ScanConfig(root=root, work=work))
    _wav(clip, 0.5)
    extract(ExtractConfig(work=work, num_workers=0, progress=False))
    t = read_table(work / "extract.parquet").set_index("video_id")
    assert t.loc["train/a/x", "status"] == "ok" and t.loc["train/a/x", "num_samples"] == 8000
    # Unchanged since it was read: a rerun redoes nothing, though the manifest is older.
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert (res.processed, res.skipped) == (0, 2)
    _wav(clip, 1.5)
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert (res.processed, res.skipped) == (1, 1)
    assert len(load_audio(work / "audio" / "train" / "a" / "x.flac")) == 24000
