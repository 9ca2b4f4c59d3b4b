"""Extraction on a real Dask cluster (2 worker processes on loopback), and a worker dying."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from avfuse.extract import ExtractConfig, ExtractResult, extract
from avfuse.io import TMP_MARK, read_table
from avfuse.manifest import ScanConfig, scan
from tests.media import write_media, write_tone_video
from tests.test_extract import _check_outputs

distributed = pytest.importorskip("distributed")


def _slow_decode(delay: float) -> None:
    """Run on every worker: make each decode take ``delay`` s longer, so a kill lands mid-run."""
    import avfuse.extract as e

    orig = getattr(e, "_unpatched_decode_audio", e.decode_audio)
    e._unpatched_decode_audio = orig  # type: ignore[attr-defined]

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        return orig(*args, **kwargs)

    e.decode_audio = slow


def _dataset(root: Path, n: int = 10) -> dict[str, tuple[str, float]]:
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


def test_cluster_extraction_equals_local(cluster, client, tmp_path) -> None:
    expect = _dataset(tmp_path / "data")
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
    expect = _dataset(tmp_path / "data", n=16)
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
