"""The work folder is avfuse's and nothing else: no write follows a link out of it, a missing
folder is refused, the lock cannot be skipped by a stray variable, and a dead holder's lock is
taken over with a warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from avfuse.io import PathEscapeError, RecordLog, atomic_write, write_json
from avfuse.lock import WorkFolderBusyError, work_lock
from avfuse.manifest import ScanConfig, scan
from avfuse.workdir import LOCK_NAME
from tests.media import make_dataset

REPO = Path(__file__).resolve().parents[1]
AVFUSE = [sys.executable, "-m", "avfuse"]
LAYOUT = {"train": {"a": ["x1.mp4"], "b": ["y1.mp4"]}, "val": {"a": ["v1.mp4"]}}
PRECIOUS = b"someone else's file\n"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    return dict(env, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), **extra)


def _cli(args: list[str], cwd: Path, **env: str) -> Any:
    return subprocess.run(
        [*AVFUSE, *args], capture_output=True, text=True, cwd=cwd, env=_env(**env), timeout=300
    )


def _one_line_error(out: Any) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def _scanned(tmp: Path) -> Path:
    make_dataset(tmp / "data", LAYOUT, duration=0.6)
    work = tmp / "work"
    with work_lock(work, create=True):
        scan(ScanConfig(root=tmp / "data", work=work))
    return work


def _victim(tmp: Path, name: str = "victim.txt") -> Path:
    p = tmp / "outside" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(PRECIOUS)
    return p


# ---------------------------------------------------------------- no write leaves WORK


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_lock_file_linked_outside_is_refused_and_never_truncated(
    tmp_path: Path, kind: str
) -> None:
    work = _scanned(tmp_path)
    victim = _victim(tmp_path)
    (work / LOCK_NAME).unlink()
    if kind == "symlink":
        (work / LOCK_NAME).symlink_to(victim)
    else:
        os.link(victim, work / LOCK_NAME)
    line = _one_line_error(_cli(["extract", str(work), "--num-workers", "0"], tmp_path))
    assert LOCK_NAME in line and "remove it" in line
    assert victim.read_bytes() == PRECIOUS
    assert not (work / "extract.parquet").exists()
    # The cause removed, a plain rerun runs.
    (work / LOCK_NAME).unlink()
    out = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert victim.read_bytes() == PRECIOUS


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_file_that_is_not_a_file_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    work = tmp_path / "w"
    work.mkdir()
    if kind == "folder":
        (work / LOCK_NAME).mkdir()
    else:
        os.mkfifo(work / LOCK_NAME)
    line = _one_line_error(_cli(["extract", str(work)], tmp_path))
    assert line.endswith(
        f"lock file {work / LOCK_NAME} is {'a folder' if kind == 'folder' else 'not a regular file'}: remove it"
    )


def test_outputs_linked_outside_are_replaced_not_written_through(tmp_path: Path) -> None:
    work = _scanned(tmp_path)
    victims = {}
    for name in ("extract.parquet", "extract_failures.csv", "extract.toml", "manifest.parquet"):
        victims[name] = _victim(tmp_path, name + ".victim")
        (work / name).unlink(missing_ok=True)
        (work / name).symlink_to(victims[name])
    # scan rewrites the manifest; extract its table, failures and settings.
    out = _cli(["scan", str(tmp_path / "data"), "-o", str(work)], tmp_path)
    assert out.returncode == 0, out.stderr
    out = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    for name, victim in victims.items():
        assert victim.read_bytes() == PRECIOUS, name
        assert not (work / name).is_symlink() and (work / name).stat().st_size > 0


def test_a_folder_linked_outside_the_work_folder_is_never_written_into(tmp_path: Path) -> None:
    work = _scanned(tmp_path)
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (work / "scores").symlink_to(outside, target_is_directory=True)
    with work_lock(work), pytest.raises(PathEscapeError) as info:
        write_json(work / "scores" / "x.json", {"a": 1})
    assert "x.json" in str(info.value) and "leads out of the work folder" in str(info.value)
    assert list(outside.iterdir()) == []
    # The audio folder of extract: refused before anything is written or deleted there.
    (work / "audio").symlink_to(outside, target_is_directory=True)
    planted = outside / "train" / "a" / ".x1.flac.tmp-1-deadbeef.flac"  # looks like ours
    planted.parent.mkdir(parents=True)
    planted.write_bytes(PRECIOUS)
    line = _one_line_error(_cli(["extract", str(work), "--num-workers", "0"], tmp_path))
    assert "leads out of the work folder" in line and "audio" in line
    assert [p for p in outside.rglob("*") if p.is_file()] == [planted]
    assert planted.read_bytes() == PRECIOUS
    # A record log whose folder links out is not cleared through the link.
    parts = outside / "parts"
    parts.mkdir()
    (parts / "part-1.parquet").write_bytes(PRECIOUS)
    (work / "extract").mkdir(exist_ok=True)
    (work / "extract" / "parts").symlink_to(parts, target_is_directory=True)
    with work_lock(work), pytest.raises(PathEscapeError):
        RecordLog(work / "extract" / "parts").clear()
    assert (parts / "part-1.parquet").read_bytes() == PRECIOUS
    (work / "extract" / "parts").unlink()
    (work / "audio").unlink()
    out = _cli(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(list((work / "audio").rglob("*.flac"))) == 3


def test_a_temporary_name_planted_in_advance_is_not_followed(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    target = tmp_path / "w" / "out.json"
    target.parent.mkdir()
    # Plant every name atomic_write could pick by patching its randomness to a known value.
    import uuid

    class _Fixed:
        hex = "0" * 32

    real = uuid.uuid4
    uuid.uuid4 = lambda: _Fixed()  # type: ignore[assignment,return-value]
    try:
        tmp_name = target.with_name(f".out.json.tmp-{os.getpid()}-00000000.json")
        tmp_name.symlink_to(victim)
        with pytest.raises(FileExistsError):
            write_json(target, {"a": 1})
    finally:
        uuid.uuid4 = real  # type: ignore[assignment]
    assert victim.read_bytes() == PRECIOUS
    assert tmp_name.is_symlink()  # not ours: left alone
    with atomic_write(target) as tmp:
        assert tmp.stat().st_size == 0 and not tmp.is_symlink()
        tmp.write_text("{}")
    assert target.read_text() == "{}"


@pytest.mark.parametrize("command", ["extract", "features", "train", "predict", "evaluate"])
def test_stages_refuse_a_missing_work_folder_and_create_nothing(
    tmp_path: Path, command: str
) -> None:
    work = tmp_path / "typo" / "deep" / "work"
    line = _one_line_error(_cli([command, str(work)], tmp_path))
    assert str(work) in line and "does not exist" in line
    assert not (tmp_path / "typo").exists()


def test_scan_creates_its_work_folder(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", LAYOUT, duration=0.6)
    work = tmp_path / "new" / "work"
    out = _cli(["scan", str(tmp_path / "data"), "-o", str(work)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (work / "manifest.parquet").is_file()


# ---------------------------------------------------------------- the lock and RANK


_HOLD = (
    "import sys, time\nfrom avfuse.lock import work_lock\n"
    "with work_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)"
)
_ENTER = (
    "import sys\nfrom avfuse.lock import work_lock\nwith work_lock(sys.argv[1]):\n    print('in')"
)
_JOB = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


def _enter(work: Path, **env: str) -> Any:
    return subprocess.run(
        [sys.executable, "-c", _ENTER, str(work)],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=60,
    )


def test_a_stray_rank_variable_does_not_skip_the_lock(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(work)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for env in ({"RANK": "1"}, {"RANK": "3", "WORLD_SIZE": "4"}, {"RANK": "1", **_JOB}):
            # No job, or not the holder's job: the lock is taken as by anyone, and refused.
            out = _enter(work, **env)
            assert out.stdout.strip() == "" and "WorkFolderBusyError" in out.stderr, env
            assert str(holder.pid) in out.stderr
    finally:
        holder.kill()
        holder.wait()


def test_the_other_ranks_of_a_torchrun_job_share_rank_0s_lock(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    rank0 = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(work)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(RANK="0", **_JOB),
    )
    try:
        assert rank0.stdout is not None and rank0.stdout.readline().strip() == "locked"
        out = _enter(work, RANK="1", **_JOB)
        assert out.stdout.strip() == "in", out.stderr
        # Anyone else is still refused.
        assert "WorkFolderBusyError" in _enter(work).stderr
    finally:
        rank0.kill()
        rank0.wait()


# ---------------------------------------------------------------- a dead holder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_record_of_a_dead_process_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    dead = _dead_pid()
    (work / LOCK_NAME).write_text(f"{dead}\n")
    with caplog.at_level(logging.WARNING, logger="avfuse.lock"), work_lock(work):
        assert (work / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert any(str(dead) in r.getMessage() for r in caplog.records), caplog.text
    # A clean release leaves nothing to warn about.
    assert (work / LOCK_NAME).read_text() == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="avfuse.lock"), work_lock(work):
        pass
    assert not caplog.records


def test_a_lock_kept_by_an_orphaned_child_of_a_dead_run_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The holder dies (abort) while a forked worker that inherited the descriptor lives on."""
    work = tmp_path / "w"
    work.mkdir()
    code = (
        "import os, sys, time\nfrom avfuse.lock import work_lock\n"
        "with work_lock(sys.argv[1]):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(120)\n"
        "        os._exit(0)\n"
        "    print(child, flush=True)\n"
        "    os._exit(134)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    assert parent.stdout is not None
    orphan = int(parent.stdout.readline())
    parent.wait()
    try:
        with caplog.at_level(logging.WARNING, logger="avfuse.lock"), work_lock(work):
            assert (work / LOCK_NAME).read_text().split()[0] == str(os.getpid())
            # Held: a second process is refused.
            assert "WorkFolderBusyError" in _enter(work).stderr
        assert any(str(parent.pid) in r.getMessage() for r in caplog.records), caplog.text
    finally:
        os.kill(orphan, 9)


def test_a_live_holder_is_obeyed(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(work)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkFolderBusyError) as info, work_lock(work):
            pass
        assert info.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
