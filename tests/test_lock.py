"""One run per work folder: the lock file, its holder, torchrun ranks, and holders that died."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from avfuse.lock import WorkFolderBusyError, work_lock
from avfuse.workdir import LOCK_NAME
from tests.commands import avfuse_env, env_alone, one_line_error, run_avfuse, run_avfuse_alone
from tests.workfolders import outside_file, scanned_small, scanned_tones


def test_a_second_run_on_a_work_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    work = scanned_tones(tmp_path)
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
        env=avfuse_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        out = run_avfuse(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
        line = one_line_error(out)
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
    out = run_avfuse(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr


PRECIOUS = b"someone else's file\n"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_lock_file_linked_outside_is_refused_and_never_truncated(
    tmp_path: Path, kind: str
) -> None:
    work = scanned_small(tmp_path)
    victim = outside_file(tmp_path)
    (work / LOCK_NAME).unlink()
    if kind == "symlink":
        (work / LOCK_NAME).symlink_to(victim)
    else:
        os.link(victim, work / LOCK_NAME)
    line = one_line_error(run_avfuse_alone(["extract", str(work), "--num-workers", "0"], tmp_path))
    assert LOCK_NAME in line and "remove it" in line
    assert victim.read_bytes() == PRECIOUS
    assert not (work / "extract.parquet").exists()
    # The cause removed, a plain rerun runs.
    (work / LOCK_NAME).unlink()
    out = run_avfuse_alone(["extract", str(work), "--num-workers", "0", "--no-progress"], tmp_path)
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
    line = one_line_error(run_avfuse_alone(["extract", str(work)], tmp_path))
    assert line.endswith(
        f"lock file {work / LOCK_NAME} is {'a folder' if kind == 'folder' else 'not a regular file'}: remove it"
    )


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
        env=env_alone(**env),
        timeout=60,
    )


@contextmanager
def _held(work: Path, **env: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holds ``work``'s lock (with ``env``) for the duration of the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(work)],
        stdout=subprocess.PIPE,
        text=True,
        env=env_alone(**env),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_stray_rank_variable_does_not_skip_the_lock(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    with _held(work) as holder:
        for env in ({"RANK": "1"}, {"RANK": "3", "WORLD_SIZE": "4"}, {"RANK": "1", **_JOB}):
            # No job, or not the holder's job: the lock is taken as by anyone, and refused.
            out = _enter(work, **env)
            assert out.stdout.strip() == "" and "WorkFolderBusyError" in out.stderr, env
            assert str(holder.pid) in out.stderr


def test_the_other_ranks_of_a_torchrun_job_share_rank_0s_lock(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    with _held(work, RANK="0", **_JOB):
        out = _enter(work, RANK="1", **_JOB)
        assert out.stdout.strip() == "in", out.stderr
        # Anyone else is still refused.
        assert "WorkFolderBusyError" in _enter(work).stderr


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
        [sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, text=True, env=env_alone()
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
    with _held(work) as holder:
        with pytest.raises(WorkFolderBusyError) as info, work_lock(work):
            pass
        assert info.value.pid == holder.pid
