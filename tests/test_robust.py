"""Runs that lose nothing and fail cleanly: transient failures, a full disk, a damaged store,
outputs written together, a lost pipeline.json, a changed dataset, one run per work folder,
workers that end with their driver, and one-line errors from the CLI."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pytest

import avfuse.extract as extract_mod
import avfuse.features as features_mod
from avfuse.config import apply_overrides
from avfuse.extract import ExtractConfig, extract, load_audio
from avfuse.features import FeaturesConfig, compute_features
from avfuse.io import TMP_MARK, DiskFullError, atomic_dir, read_json, read_table
from avfuse.lock import WorkFolderBusyError, work_lock
from avfuse.manifest import ScanConfig, scan
from avfuse.pipeline import run
from avfuse.runconfig import RunConfig
from avfuse.store import CorruptStoreError, FeatureStore
from avfuse.workdir import StoreLayout
from tests.media import make_dataset, peak_frequency, write_tone_video

REPO = Path(__file__).resolve().parents[1]
AVFUSE = [sys.executable, "-m", "avfuse"]

LAYOUT = {
    "train": {"a": ["x1.mp4", "x2.mp4"], "b": ["y1.mp4", "y2.mp4"]},
    "val": {"a": ["v1.mp4"], "b": ["w1.mp4"]},
}
FREQ = {"a": 440.0, "b": 880.0}


def _dataset(root: Path) -> dict[str, Path]:
    return make_dataset(root, LAYOUT, duration=1.3, freq_of=FREQ)


def _scanned(tmp: Path, name: str = "work", data: str = "data") -> Path:
    if not (tmp / data).exists():
        _dataset(tmp / data)
    work = tmp / name
    scan(ScanConfig(root=tmp / data, work=work))
    return work


def _xcfg(work: Path, **kw: Any) -> ExtractConfig:
    return ExtractConfig(work=work, num_workers=0, progress=False, **kw)


def _fcfg(work: Path, **kw: Any) -> FeaturesConfig:
    return FeaturesConfig(work=work, num_workers=0, progress=False, **kw)


def _status(work: Path, table: str = "extract.parquet", col: str = "status") -> dict[str, str]:
    return read_table(work / table).set_index("video_id")[col].to_dict()


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _env(*front: Path) -> dict[str, str]:
    path = [str(p) for p in front] + [str(REPO / "src"), str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def _hook(tmp: Path, code: str) -> Path:
    """A folder with a ``sitecustomize.py``: ``code`` runs in every Python process started with
    it on ``PYTHONPATH`` (pool workers included)."""
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent(code))
    return hook


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [*AVFUSE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or _env(),
        timeout=300,
    )


def _one_line_error(out: Any, code: int = 2) -> str:
    """The run failed with ``code`` and said why in exactly one line, without a traceback."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


# ---------------------------------------------------------------- transient failures


def test_read_and_write_failures_are_error_and_retried_by_a_plain_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = _scanned(tmp_path)
    junk = tmp_path / "data" / "val" / "a" / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))  # content FFmpeg cannot decode
    work = _scanned(tmp_path)
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
    extract(_xcfg(work))
    status = _status(work)
    reasons = read_table(work / "extract.parquet").set_index("video_id")["reason"]
    assert status["train/a/x1"] == "error" and "Permission denied" in reasons["train/a/x1"]
    assert status["train/b/y1"] == "error" and "Input/output error" in reasons["train/b/y1"]
    assert status["val/a/junk"] == "unreadable"  # a decoding failure stays what it is
    assert status["train/a/x2"] == "ok"

    monkeypatch.undo()
    res = extract(_xcfg(work))
    assert res.processed == 2  # exactly the two failed videos, no --force
    status = _status(work)
    assert status["train/a/x1"] == status["train/b/y1"] == "ok"
    assert status["val/a/junk"] == "unreadable"
    y1 = load_audio(work / "audio" / "train" / "b" / "y1.flac")
    assert peak_frequency(y1, 16000) == pytest.approx(880.0, abs=5)


def test_full_disk_stops_extract_and_the_rerun_ends_as_a_clean_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean, work = _scanned(tmp_path, "clean"), _scanned(tmp_path, "work")
    extract(_xcfg(clean))
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
        extract(_xcfg(work, batch_size=2))
    assert calls["w"] == 3  # stopped at once: no later video was tried
    assert str(work / "audio" / "train") in str(info.value)
    assert not (work / "extract.parquet").exists()
    assert not [p for p in work.rglob("*") if TMP_MARK in p.name]

    monkeypatch.undo()  # space freed
    extract(_xcfg(work))
    pd.testing.assert_frame_equal(
        read_table(work / "extract.parquet"), read_table(clean / "extract.parquet")
    )
    assert _tree_bytes(work / "audio") == _tree_bytes(clean / "audio")


def test_full_disk_stops_features_and_the_rerun_ends_as_a_clean_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean, work = _scanned(tmp_path, "clean"), _scanned(tmp_path, "work")
    for w in (clean, work):
        extract(_xcfg(w))
    small = {"shard_mb": 0.005, "batch_size": 2}  # a shard per video: several writes
    compute_features(_fcfg(clean, **small))
    real_save = np.save
    calls = {"n": 0}

    def filling_save(fh: Any, arr: Any, *a: Any, **k: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:
            fh.write(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(fh, arr, *a, **k)

    monkeypatch.setattr(np, "save", filling_save)
    with pytest.raises(DiskFullError, match="no space left") as info:
        compute_features(_fcfg(work, **small))
    assert str(StoreLayout(work / "features").shards) in str(info.value)
    assert calls["n"] == 3
    assert not (work / "features.parquet").exists()

    monkeypatch.undo()
    compute_features(_fcfg(work, **small))
    a, b = read_table(work / "features.parquet"), read_table(clean / "features.parquet")
    pd.testing.assert_frame_equal(a, b)
    sa, sb = FeatureStore(work / "features"), FeatureStore(clean / "features")
    assert sa.ids == sb.ids and len(sa.ids) == 6
    for v in sa.ids:
        np.testing.assert_array_equal(sa[v], sb[v])


# ---------------------------------------------------------------- the store checks itself


def test_truncated_shard_is_named_and_a_plain_rerun_repairs_it(tmp_path: Path) -> None:
    work = _scanned(tmp_path)
    extract(_xcfg(work))
    cfg = _fcfg(work, shard_mb=0.005, batch_size=2)
    compute_features(cfg)
    store = work / "features"
    before = FeatureStore(store)
    kept = {v: np.array(before[v]) for v in before.ids}
    index = read_table(store / "index.parquet")
    shard = str(index["shard"].iloc[0])
    in_shard = set(index.loc[index["shard"] == shard, "video_id"])
    path = StoreLayout(store).shard(shard)
    os.truncate(path, path.stat().st_size - 100)

    with pytest.raises(CorruptStoreError, match=shard) as info:
        FeatureStore(store)
    assert info.value.shards == [shard]

    res = compute_features(cfg)
    assert res.computed == len(in_shard)
    after = FeatureStore(store)
    assert sorted(after.ids) == sorted(kept)
    for v, x in kept.items():
        np.testing.assert_array_equal(after[v], x)
    assert not path.exists()


def test_nan_or_inf_features_make_the_video_an_error_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = _scanned(tmp_path)
    extract(_xcfg(work))
    real_load, real_mel = features_mod.load_audio, features_mod.log_mel
    last: dict[str, str] = {}

    def load(path: Any, *a: Any, **k: Any) -> np.ndarray:
        last["stem"] = Path(path).stem
        return real_load(path, *a, **k)

    def mel(x: np.ndarray, fe: Any) -> np.ndarray:
        out = real_mel(x, fe)
        if last["stem"] == "x1":
            out[5, 3] = np.nan
        if last["stem"] == "y2":
            out[0, 0] = np.inf
        return out

    monkeypatch.setattr(features_mod, "load_audio", load)
    monkeypatch.setattr(features_mod, "log_mel", mel)
    compute_features(_fcfg(work))
    table = read_table(work / "features.parquet").set_index("video_id")
    assert table.loc["train/a/x1", "feature_status"] == "error"
    assert table.loc["train/b/y2", "feature_status"] == "error"
    assert "NaN or infinite" in table.loc["train/a/x1", "feature_reason"]
    assert (table["feature_status"] == "ok").sum() == 4
    store = FeatureStore(work / "features")
    assert "train/a/x1" not in store and "train/b/y2" not in store
    assert all(np.isfinite(np.asarray(store[v], np.float32)).all() for v in store.ids)

    monkeypatch.undo()
    res = compute_features(_fcfg(work))
    assert res.computed == 2 and res.counts == {"ok": 6}


# ---------------------------------------------------------------- fuse writes together


def test_fuse_outputs_are_replaced_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import avfuse.fuse as fuse_mod
    from tests.test_fuse import cfg_for, make_work

    d = make_work(tmp_path, n=200, seed=3)
    out = tmp_path / "work" / "fusion"
    fuse_mod.fuse(cfg_for(d, method="mean", output=out, bootstrap=50))
    old = _tree_bytes(out)
    assert read_json(out / "fusion.json")["method"] == "mean"

    real_report = fuse_mod.write_fusion_report

    def dying_report(folder: Path, figures: dict[str, Any]) -> Any:
        real_report(folder, figures)  # every new file is written ...
        raise KeyboardInterrupt  # ... and the run is stopped before it returns

    monkeypatch.setattr(fuse_mod, "write_fusion_report", dying_report)
    with pytest.raises(KeyboardInterrupt):
        fuse_mod.fuse(cfg_for(d, method="logprob", output=out, bootstrap=50))
    assert _tree_bytes(out) == old  # no new fusion.json beside the old report
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []

    monkeypatch.undo()
    res = fuse_mod.fuse(cfg_for(d, method="logprob", output=out, bootstrap=50))
    assert read_json(out / "fusion.json")["method"] == "logprob"
    assert "`logprob`" in (out / "report.md").read_text("utf-8")
    assert res.fused_path.parent == out and res.fused_path.exists()


def test_a_kill_between_the_renames_brings_the_old_folder_back(tmp_path: Path) -> None:
    out = tmp_path / "fusion"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    # What a kill after moving the old folder aside and before moving the new one in leaves:
    os.rename(out, tmp_path / ".fusion.old-1-abc")
    (tmp_path / f".fusion{TMP_MARK}1-def").mkdir()
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("stop before the new folder is complete")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion"]


# ---------------------------------------------------------------- avfuse run bookkeeping


def _run_cfg(tmp: Path, *extra: str) -> RunConfig:
    return apply_overrides(
        RunConfig(root=tmp / "data", work=tmp / "work"),
        [
            "extract.num_workers=0",
            "extract.progress=false",
            "features.num_workers=0",
            "features.progress=false",
            "train.epochs=1",
            "train.width=0.25",
            "train.batch_size=4",
            "train.num_workers=0",
            "train.progress=false",
            "train.min_steps=0",  # bookkeeping is under test, not learning: one epoch
            *extra,
        ],
    )


def _statuses(res: Any) -> dict[str, str]:
    return {s.name: s.status for s in res.stages}


def test_corrupt_pipeline_json_is_reported_and_finished_stages_are_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _dataset(tmp_path / "data")
    cfg = _run_cfg(tmp_path, "stop_after='evaluate'")
    first = _statuses(run(cfg))
    assert first["train"] == "ran"
    work = tmp_path / "work"
    best = (work / "runs" / "audio" / "best.pt").stat().st_mtime_ns
    state = work / "pipeline.json"
    state.write_text(state.read_text()[:40])  # a write cut short

    with caplog.at_level("WARNING", logger="avfuse"):
        st = _statuses(run(cfg))
    assert any(str(state) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert [s for s, v in st.items() if v == "skipped"] == [
        "scan",
        "extract",
        "features",
        "train",
        "predict",
        "evaluate",
    ]
    assert (work / "runs" / "audio" / "best.pt").stat().st_mtime_ns == best  # not retrained
    assert read_json(state)["stages"]["train"]["state"] == "done"

    # Settings that differ from the saved ones are not reused.
    state.unlink()
    st = _statuses(run(apply_overrides(cfg, ["train.seed=5"])))
    assert st["features"] == "skipped" and st["train"] == "ran"


def test_a_changed_dataset_is_noticed_and_only_what_changed_is_redone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _dataset(data)
    cfg = _run_cfg(tmp_path, "stop_after='features'")
    work = tmp_path / "work"
    assert set(_statuses(run(cfg)).values()) == {"ran", "not run"}
    assert _statuses(run(cfg))["scan"] == "skipped"

    def rerun() -> dict[str, str]:
        st = _statuses(run(cfg))
        assert st["scan"] == st["extract"] == st["features"] == "ran", st
        return _status(work, "features.parquet", "feature_status")

    # Added.
    write_tone_video(data / "val" / "a" / "new.mp4", freq=440, duration=1.3, rate=16000, fps=2)
    status = rerun()
    assert status["val/a/new"] == "ok"
    assert "val/a/new" in FeatureStore(work / "features")

    # Deleted.
    (data / "train" / "a" / "x2.mp4").unlink()
    status = rerun()
    assert "train/a/x2" not in status and "train/a/x2" not in FeatureStore(work / "features")

    # Replaced in place: same name, other sound.
    before = np.array(FeatureStore(work / "features")["train/b/y1"], np.float32)
    y1 = data / "train" / "b" / "y1.mp4"
    y1.unlink()
    write_tone_video(y1, freq=220, duration=1.3, rate=16000, channels=1, fps=2)
    status = rerun()
    audio = load_audio(work / "audio" / "train" / "b" / "y1.flac")
    assert peak_frequency(audio, 16000) == pytest.approx(220, abs=5)
    after = np.array(FeatureStore(work / "features")["train/b/y1"], np.float32)
    assert before.shape[1] == after.shape[1] and not np.allclose(before[:10], after[:10])
    assert set(status.values()) == {"ok"}
    assert read_json(work / "pipeline.json")["dataset"]


# ---------------------------------------------------------------- one run per work folder


def test_a_second_run_on_a_work_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    work = _scanned(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom avfuse.lock import work_lock\n"
            "with work_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)",
            str(work),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        out = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
        line = _one_line_error(out)
        assert str(holder.pid) in line
        assert not (work / "extract.parquet").exists()  # refused before doing anything
        with pytest.raises(WorkFolderBusyError) as info, work_lock(work):
            pass
        assert info.value.pid == holder.pid
    finally:
        holder.kill()  # kill -9: no cleanup code runs
        holder.wait()
    # The kernel released the killed holder's lock: nothing blocks.
    with work_lock(work), work_lock(work):  # and it is re-entrant within a process
        pass
    out = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- workers end with the driver


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))):
            children.setdefault(st[0], []).append(int(entry))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            st = _proc_stat(c)
            if st:
                out[c] = st[2]
                todo.append(c)
    return out


def _alive(pid: int, start: str) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[1] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("stage", ["extract", "features"])
def test_sigkill_of_the_driver_ends_its_pool_workers(tmp_path: Path, stage: str) -> None:
    src = tmp_path / "data" / "train" / "a" / "c00.mp4"
    write_tone_video(src, duration=1.0, rate=16000, channels=1, fps=2)
    for i in range(1, 30):  # enough videos that the run is far from done when it is killed
        dst = tmp_path / "data" / "train" / "ab"[i % 2] / f"c{i:02d}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    work = _scanned(tmp_path)
    if stage == "features":
        extract(_xcfg(work))
    hook = _hook(
        tmp_path,
        """
        import time
        import avfuse.extract as e
        import avfuse.features as f
        def slow(orig):
            def run(*a, **k):
                time.sleep(0.3)
                return orig(*a, **k)
            return run
        e.decode_audio = slow(e.decode_audio)
        f.load_audio = slow(f.load_audio)
        """,
    )
    args = [stage, str(work), "--num-workers", "2", "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(
        [*AVFUSE, *args],
        env=_env(hook),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = work / stage / "parts" if stage == "extract" else work / "features" / "parts"
    deadline = time.monotonic() + 60
    kids: dict[int, str] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        kids = _descendants(proc.pid)
        if len(kids) >= 3 and any(parts.glob("part-*.parquet")):  # forkserver + 2 workers
            break
        time.sleep(0.05)
    assert len(kids) >= 3
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers get no signal
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p, s) for p, s in kids.items()):
        time.sleep(0.1)
    left = [p for p, s in kids.items() if _alive(p, s)]
    for p in left:  # never leave them behind, whatever the assert says
        os.kill(p, signal.SIGKILL)
    assert left == []


# ---------------------------------------------------------------- clean errors


@pytest.fixture(scope="module")
def featured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder through features; split ``heldout`` holds only an undecodable file."""
    tmp = tmp_path_factory.mktemp("clean")
    _dataset(tmp / "data")
    junk = tmp / "data" / "heldout" / "a" / "junk.mp4"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(np.random.default_rng(1).bytes(3000))
    work = _scanned(tmp)
    extract(_xcfg(work))
    compute_features(_fcfg(work))
    return work


def _copy(work: Path, dst: Path) -> Path:
    shutil.copytree(work, dst)
    return dst


CleanCase = Callable[[Path, Path], list[str]]


@pytest.mark.parametrize(
    ("name", "make_args", "needle"),
    [
        ("output is a file", lambda w, t: ["scan", str(t / "d"), "-o", str(t / "f")], "file"),
        (
            "foreign npz",
            lambda w, t: ["evaluate", str(w), "--scores", str(t / "foreign.npz")],
            "foreign.npz",
        ),
        (
            "split typo (train)",
            lambda w, t: ["train", str(w), "--train-split", "trian", "--no-progress"],
            "val",
        ),
        (
            "split typo (evaluate)",
            lambda w, t: ["evaluate", str(w), "--scores", str(t / "s.npz"), "--split", "vall"],
            "train",
        ),
        (
            "split without usable videos",
            lambda w, t: ["train", str(w), "--train-split", "heldout", "--no-progress"],
            "heldout",
        ),
        (
            "corrupt --init",
            lambda w, t: ["train", str(w), "--init", str(t / "bad.pt"), "--no-progress"],
            "",
        ),
        (
            "corrupt checkpoint",
            lambda w, t: ["predict", str(w), "--checkpoint", str(t / "bad.pt")],
            "",
        ),
        (
            "negative tolerance",
            lambda w, t: [
                "fuse",
                str(w),
                "--video-scores",
                str(t / "foreign.npz"),
                "--tolerance",
                "-1",
            ],
            "tolerance",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_code_2(
    featured: Path, tmp_path: Path, name: str, make_args: CleanCase, needle: str
) -> None:
    work = _copy(featured, tmp_path / "work")
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("not a folder")
    np.savez(tmp_path / "foreign.npz", logits=np.zeros((3, 2)), names=np.array(["a", "b"]))
    from avfuse.scores import ScoreFile

    ids = np.array(["val/a/v1", "val/b/w1"])
    ScoreFile(ids, ["a", "b"], np.eye(2, dtype=np.float32), np.ones(2), np.array(["ok"] * 2)).save(
        tmp_path / "s.npz"
    )
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04" + os.urandom(500))  # a cut-off zip
    out = _cli(make_args(work, tmp_path), tmp_path)
    line = _one_line_error(out)
    assert line.startswith("avfuse ") and "error" in line
    assert needle in line


def test_verbose_shows_the_traceback(featured: Path, tmp_path: Path) -> None:
    out = _cli(["-v", "train", str(featured), "--train-split", "trian"], tmp_path)
    assert out.returncode == 2 and "Traceback" in out.stderr


@pytest.mark.skipif(
    subprocess.run(
        [sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]
    ).returncode
    != 0,
    reason="a GPU is present",
)
def test_cuda_without_a_gpu_is_one_line(featured: Path, tmp_path: Path) -> None:
    out = _cli(["train", str(featured), "--device", "cuda", "--no-progress"], tmp_path)
    assert "CUDA" in _one_line_error(out)


def test_full_disk_from_the_cli_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    work = _scanned(tmp_path)
    hook = _hook(
        tmp_path,
        """
        import errno
        import av
        _open = av.open
        def full(path, mode="r", *a, **k):
            if mode == "w":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return _open(path, mode, *a, **k)
        av.open = full
        """,
    )
    out = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path, _env(hook))
    line = _one_line_error(out)
    assert "no space left" in line and str(work / "audio") in line
    assert "rerun" in line


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_ctrl_c_exits_130_and_a_rerun_resumes(tmp_path: Path, workers: str) -> None:
    work = _scanned(tmp_path)
    hook = _hook(
        tmp_path,
        """
        import time
        import avfuse.extract as e
        _orig = e.decode_audio
        _calls = [0]
        def slow(*a, **k):
            # Each process decodes its first video quickly and then stalls, so
            # the interrupt always lands with videos left, whatever the pool.
            _calls[0] += 1
            time.sleep(0.4 if _calls[0] == 1 else 8.0)
            return _orig(*a, **k)
        e.decode_audio = slow
        """,
    )
    args = ["extract", str(work), "--num-workers", workers, "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(
        [*AVFUSE, *args],
        env=_env(hook),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A suite started in the background (`make test &`) inherits an ignored SIGINT, which
        # Python then keeps ignoring: give the run the terminal's default, as a user's shell does.
        preexec_fn=_default_sigint,
    )
    parts = work / "extract" / "parts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(parts.glob("part-*.parquet")):
        assert proc.poll() is None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the run
    _, err = proc.communicate(timeout=60)
    out = subprocess.CompletedProcess(args, proc.returncode, "", err)
    assert "rerun resumes" in _one_line_error(out, 130)
    done = len(pd.concat([read_table(p) for p in parts.glob("part-*.parquet")]))
    assert 0 < done < 6  # the workers stopped too, not only the driver
    again = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert again.returncode == 0 and f"{done} already done" in again.stdout
