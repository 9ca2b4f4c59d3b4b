"""The extract stage: resumable, parallel (processes or a Dask cluster), safe after kill -9 and a
full disk; every input has a fate (FIFOs, files still being written, the time limit), and nothing
is written outside WORK."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pytest

import avfuse.extract as extract_mod
from avfuse.config import load_config
from avfuse.extract import (
    COLUMNS,
    ExtractConfig,
    ExtractResult,
    extract,
    finished_settings,
    invalidate,
    is_done,
    load_audio,
    outputs,
)
from avfuse.io import TMP_MARK, DiskFullError, csv_uncell, read_table, write_table
from avfuse.manifest import ScanConfig, scan, write_class_list
from tests.media import peak_frequency, write_media, write_tone_video
from tests.test_io import _assert_inert, _cells
from tests.test_manifest import _files_outside, _video
from tests.workfolders import extract_cfg, scanned_tones, stage_status, tree_bytes

try:
    import distributed
except ImportError:  # optional: only the tests that need it are skipped
    distributed = None

needs_distributed = pytest.mark.skipif(distributed is None, reason="needs distributed")

REPO = Path(__file__).resolve().parents[1]
SR = 16000
AVFUSE = [sys.executable, "-m", "avfuse"]


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


# -------------------------------------------------------------------------------- on a Dask cluster


def _slow_decode(delay: float) -> None:
    """Run on every worker: make each decode take ``delay`` s longer, so a kill lands mid-run."""
    import avfuse.extract as e

    orig = getattr(e, "_unpatched_decode_audio", e.decode_audio)
    e._unpatched_decode_audio = orig  # type: ignore[attr-defined]

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        return orig(*args, **kwargs)

    e.decode_audio = slow


def _cluster_dataset(root: Path, n: int = 10) -> dict[str, tuple[str, float]]:
    expect: dict[str, tuple[str, float]] = {}
    for i in range(n):
        cls = f"class {i % 2}"
        f = 400.0 + 200 * (i % 2)
        write_tone_video(root / "train" / cls / f"c{i:02d}.mkv", freq=f, duration=0.6, codec="pcm_s16le", rate=22050, channels=2, video=False)  # fmt: skip
        expect[f"train/{cls}/c{i:02d}"] = ("ok", f)
    write_media(root / "train" / "class 0" / "novoice.mp4", [])
    expect["train/class 0/novoice"] = ("no_audio", 0)
    (root / "train" / "class 1" / "broken.mp4").write_bytes(b"\x00" * 100)
    expect["train/class 1/broken"] = ("unreadable", 0)
    return expect


@needs_distributed
def test_cluster_extraction_equals_local(cluster, client, tmp_path) -> None:
    expect = _cluster_dataset(tmp_path / "data")
    local, remote = tmp_path / "local", tmp_path / "remote"
    scan(ScanConfig(root=tmp_path / "data", work=local))
    scan(ScanConfig(root=tmp_path / "data", work=remote))
    extract(ExtractConfig(work=local, num_workers=0, progress=False))
    with distributed.get_task_stream(client) as stream:
        res = extract(
            ExtractConfig(
                work=remote, scheduler=cluster.scheduler_address, batch_size=2, progress=False
            )
        )
    assert res.processed == len(expect)
    table = _check_outputs(remote, expect)
    pd.testing.assert_frame_equal(table, read_table(local / "extract.parquet"))
    for rel in table["audio_path"]:
        if rel:
            assert (remote / rel).read_bytes() == (local / rel).read_bytes()
    # The batches really ran on the cluster and were spread over both workers.
    assert {t["worker"] for t in stream.data} == set(client.scheduler_info()["workers"])


def test_cluster_survives_a_worker_killed_mid_run(cluster, client, tmp_path) -> None:
    expect = _cluster_dataset(tmp_path / "data", n=16)
    work = tmp_path / "work"
    scan(ScanConfig(root=tmp_path / "data", work=work))
    client.run(_slow_decode, 0.25)
    pids = client.run(os.getpid)
    cfg = ExtractConfig(
        work=work, scheduler=cluster.scheduler_address, batch_size=1, progress=False
    )
    out: dict[str, ExtractResult | BaseException] = {}

    def run() -> None:
        try:
            out["res"] = extract(cfg)
        except BaseException as exc:  # surfaced by the assertion below
            out["res"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    parts = work / "extract" / "parts"
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        busy = {w: ks for w, ks in client.processing().items() if ks}
        if len(list(parts.glob("part-*.parquet"))) >= 2 and busy:
            victim = next(iter(busy))
        time.sleep(0.02)
    assert victim is not None, "the run never got going"
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    res = out["res"]
    assert isinstance(res, ExtractResult), res
    assert pids[victim] not in client.run(os.getpid).values()  # it really died (and restarted)
    assert len(list(parts.glob("part-*.parquet"))) < len(expect) + 3  # no runaway retries
    table = _check_outputs(work, expect)  # every video once, right status, valid audio
    assert table["video_id"].is_unique
    assert not [p for p in work.rglob("*") if TMP_MARK in p.name]
    # A rerun resumes: nothing left to do.
    again = extract(cfg)
    assert (again.processed, again.skipped) == (0, len(expect))


# --------------------------------------------------------------- CSV files a spreadsheet cannot run


def test_extract_failures_and_scan_warnings_are_inert(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_tone_video(root / "train" / "a" / "x.mp4", duration=0.5, rate=16000, channels=1, fps=2)
    bad = root / "=1+1" / "a" / "@evil.mp4"  # a split named like a formula
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a video at all" * 100)
    (root / "+loose.mp4").write_bytes(b"x")  # outside any split: a scan warning
    work = tmp_path / "w"
    scan(ScanConfig(root=tmp_path / "data", work=work, splits=()))
    warn = work / "scan_warnings.csv"
    assert any(Path(c).name == "+loose.mp4" for c in map(csv_uncell, _cells(warn)))
    _assert_inert(warn)
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert res.counts.get("unreadable") == 1
    failures = work / "extract_failures.csv"
    _assert_inert(failures)
    ids = [csv_uncell(v) for v in pd.read_csv(failures, keep_default_na=False)["video_id"]]
    assert ids == ["=1+1/a/@evil"]


# --------------------------------------------------------------- inputs that are not finished files


def _input_video(path: Path, freq: float, duration: float = 1.5) -> Path:
    return write_tone_video(path, freq=freq, duration=duration, rate=16000, channels=1, fps=2)


def _scanned_pair(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "data"
    _input_video(root / "train" / "a" / "x.mp4", 440.0)
    victim = _input_video(root / "train" / "b" / "y.mp4", 880.0)
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
    work, victim = _scanned_pair(tmp_path)
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
    work, _ = _scanned_pair(tmp_path)
    assert extract_mod.decode_time_limit(10**9) > extract_mod.decode_time_limit(10**6) > 0
    # No time at all: every file is past its limit at the first packet.
    monkeypatch.setattr(extract_mod, "DECODE_BASE_S", 0.0)
    monkeypatch.setattr(extract_mod, "DECODE_S_PER_MB", 0.0)
    extract(ExtractConfig(work=work, num_workers=0, progress=False))
    for status, reason in _records(work).values():
        assert status == "unreadable" and "time limit" in reason


def test_a_file_read_while_still_being_written_is_redone_once_complete(tmp_path: Path) -> None:
    work, victim = _scanned_pair(tmp_path)
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


# --------------------------------------------------------------- transient failures and a full disk


def test_read_and_write_failures_are_error_and_retried_by_a_plain_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = scanned_tones(tmp_path)
    junk = tmp_path / "data" / "val" / "a" / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))  # content FFmpeg cannot decode
    work = scanned_tones(tmp_path)
    x1 = str(tmp_path / "data" / "train" / "a" / "x1.mp4")
    real_open, real_write = av.open, extract_mod.write_audio

    def refusing_open(path: Any, *a: Any, **k: Any) -> Any:
        if str(path) == x1:
            raise PermissionError(errno.EACCES, "Permission denied", x1)
        return real_open(path, *a, **k)

    def failing_write(path: Path, *a: Any, **k: Any) -> Path:
        if Path(path).stem == "y1":
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_write(path, *a, **k)

    monkeypatch.setattr(av, "open", refusing_open)
    monkeypatch.setattr(extract_mod, "write_audio", failing_write)
    extract(extract_cfg(work))
    status = stage_status(work)
    reasons = read_table(work / "extract.parquet").set_index("video_id")["reason"]
    assert status["train/a/x1"] == "error" and "Permission denied" in reasons["train/a/x1"]
    assert status["train/b/y1"] == "error" and "Input/output error" in reasons["train/b/y1"]
    assert status["val/a/junk"] == "unreadable"  # a decoding failure stays what it is
    assert status["train/a/x2"] == "ok"

    monkeypatch.undo()
    res = extract(extract_cfg(work))
    assert res.processed == 2  # exactly the two failed videos, no --force
    status = stage_status(work)
    assert status["train/a/x1"] == status["train/b/y1"] == "ok"
    assert status["val/a/junk"] == "unreadable"
    y1 = load_audio(work / "audio" / "train" / "b" / "y1.flac")
    assert peak_frequency(y1, 16000) == pytest.approx(880.0, abs=5)


def test_full_disk_stops_extract_and_the_rerun_ends_as_a_clean_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean, work = scanned_tones(tmp_path, "clean"), scanned_tones(tmp_path, "work")
    extract(extract_cfg(clean))
    real_open = av.open
    calls = {"w": 0}

    def filling_open(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if mode == "w":
            calls["w"] += 1
            if calls["w"] >= 3:  # the disk fills up mid-run, mid-file
                Path(path).write_bytes(b"fLaC\0\0\0")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(av, "open", filling_open)
    with pytest.raises(DiskFullError) as info:
        extract(extract_cfg(work, batch_size=2))
    assert calls["w"] == 3  # stopped at once: no later video was tried
    assert str(work / "audio" / "train") in str(info.value)
    assert not (work / "extract.parquet").exists()
    assert not [p for p in work.rglob("*") if TMP_MARK in p.name]

    monkeypatch.undo()  # space freed
    extract(extract_cfg(work))
    pd.testing.assert_frame_equal(
        read_table(work / "extract.parquet"), read_table(clean / "extract.parquet")
    )
    assert tree_bytes(work / "audio") == tree_bytes(clean / "audio")


# -------------------------------------------------------------------- a manifest with duplicate ids


def test_extract_refuses_a_manifest_with_duplicate_ids(tmp_path: Path) -> None:
    import pandas as pd

    from avfuse.io import read_table, write_table

    root = tmp_path / "data"
    _video(root / "train" / "a" / "x.mp4", 440.0)
    _video(root / "train" / "a" / "y.mp4", 700.0)
    work = tmp_path / "w"
    scan(ScanConfig(root=root, work=work))
    man = read_table(work / "manifest.parquet")
    man.loc[1, "video_id"] = man.loc[0, "video_id"]  # what an older scan could write
    write_table(pd.DataFrame(man), work / "manifest.parquet")
    with pytest.raises(ValueError, match=r"manifest\.parquet lists video ids twice"):
        extract(ExtractConfig(work=work, num_workers=0, progress=False))


# ------------------------------------------------------------------ nothing is written outside WORK


def test_extract_never_writes_outside_work(tmp_path: Path) -> None:
    """A manifest edited by hand (scan would refuse the id) still cannot place files."""
    src = write_tone_video(tmp_path / "src" / "v.mp4", duration=0.5)
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    ids = ["../../../escaped", "train/a/fine"]
    write_table(
        pd.DataFrame(
            {
                "video_id": ids,
                "split": ["train", "train"],
                "label": ["a", "a"],
                "label_index": [0, 0],
                "path": [str(src), str(src)],
                "size_bytes": [src.stat().st_size] * 2,
                "scan_status": ["found", "found"],
            }
        ),
        work / "manifest.parquet",
    )
    write_class_list(work / "classes.txt", ["a"])
    before = _files_outside(tmp_path, work)
    res = extract(ExtractConfig(work=work, num_workers=0, progress=False))
    assert _files_outside(tmp_path, work) == before
    table = res.table.set_index("video_id")
    assert table.loc["train/a/fine", "status"] == "ok"
    assert (work / "audio/train/a/fine.flac").is_file()
    assert table.loc["../../../escaped", "status"] != "ok"
    assert "leaves" in table.loc["../../../escaped", "reason"]
