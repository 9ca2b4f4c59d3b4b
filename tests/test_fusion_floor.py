"""Fusion's layering: numerics in a pure library module, the stage on top of library modules."""

from __future__ import annotations

import ast
from pathlib import Path

import avfuse

SRC = Path(avfuse.__file__).parent
LIBRARY = {"config", "io", "manifest", "labels", "scores", "video_scores", "fusion", "report"}
LIBRARY |= {"workdir", "metrics", "audio", "excerpt"}


def _avfuse_imports(module: str) -> set[str]:
    """The ``avfuse.X`` modules that ``avfuse.<module>`` imports, by parsing its source."""
    tree = ast.parse((SRC / f"{module}.py").read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "avfuse":
                out |= {a.name for a in node.names}
            elif node.module.startswith("avfuse."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("avfuse.")}
    return out


def test_fuse_stage_imports_only_library_modules() -> None:
    imported = _avfuse_imports("fuse")
    assert "fusion" in imported and "report" in imported
    assert imported <= LIBRARY, sorted(imported - LIBRARY)


def test_fusion_numerics_import_only_the_shared_metrics() -> None:
    # metrics is pure NumPy too: one top-k implementation for train, evaluate and fuse;
    # registry (the method table) is plain Python.
    assert _avfuse_imports("fusion") <= {"metrics", "registry"}
    assert "def true_rank" not in (SRC / "fusion.py").read_text(encoding="utf-8")


def test_fusion_functions_fit_on_one_screen() -> None:
    long = []
    for module in ("fuse", "fusion", "report", "video_scores"):
        tree = ast.parse((SRC / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 105:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, long
