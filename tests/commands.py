"""Running avfuse commands from tests (in a subprocess or in-process) and reading the one-line
error a refusal prints."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest


def stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1, err
    return err[0]


REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    # A reader that opens a FIFO waits for a writer forever: the timeout turns that hang into
    # a failure instead of a stuck suite.
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)])),
        timeout=120,
    )


AVFUSE = [sys.executable, "-m", "avfuse"]


def avfuse_env(*front: Path) -> dict[str, str]:
    path = [str(p) for p in front] + [str(REPO / "src"), str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def hook_folder(tmp: Path, code: str) -> Path:
    """A folder with a ``sitecustomize.py``: ``code`` runs in every Python process started with
    it on ``PYTHONPATH`` (pool workers included)."""
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent(code))
    return hook


def run_avfuse(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [*AVFUSE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or avfuse_env(),
        timeout=300,
    )


def one_line_error(out: Any, code: int = 2) -> str:
    """The run failed with ``code`` and said why in exactly one line, without a traceback."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def env_alone(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    return dict(env, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), **extra)


def run_avfuse_alone(args: list[str], cwd: Path, **env: str) -> Any:
    return subprocess.run(
        [*AVFUSE, *args], capture_output=True, text=True, cwd=cwd, env=env_alone(**env), timeout=300
    )
