"""The import rule: stages talk through WORK files and share code through library modules.

Parsed from the source (every ``import``, function-local ones included), so a new import that
breaks the layering fails here, not in a later refactoring.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "avfuse"

# The stages: each is one CLI subcommand over one public function. ``manifest`` is the spine
# every stage reads (its loaders), so it is the one stage others may import.
STAGES = {"manifest", "extract", "features", "train", "predict", "evaluate", "embed", "fuse"}
SPINE = {"manifest"}
# ``avfuse run``'s own modules: its config (which builds every stage's config) and its report
# sit beside the orchestrator, below it: they import no orchestrator but each other.
RUN_PARTS = {"runconfig", "run_report"}
ORCHESTRATORS = {"pipeline", "demo", "cli", "__main__"} | RUN_PARTS


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]  # a package (demo) counts as one module


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("avfuse.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 0 and node.module == "avfuse":
                found |= {a.name for a in node.names}
            elif node.level == 0 and node.module.startswith("avfuse."):
                found.add(node.module.split(".")[1])
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod = _module(path)
        graph.setdefault(mod, set()).update(_imports(path) - {mod})
    return graph


def test_every_module_is_placed() -> None:
    mods = set(_graph())
    assert mods >= STAGES and mods >= {"pipeline", "demo", "cli"} | RUN_PARTS
    library = mods - STAGES - ORCHESTRATORS
    # The floor the stages share: if one of these disappears the lists above are stale.
    assert library >= {
        "audio",
        "checkpoint",
        "scoring",
        "metrics",
        "fusion",
        "workdir",
        "io",
        "config",
        "fingerprint",
    }


def test_no_stage_imports_another_stage() -> None:
    bad = {
        f"{mod} imports {other}"
        for mod, deps in _graph().items()
        if mod in STAGES
        for other in deps
        if other in STAGES - SPINE or other in ORCHESTRATORS
    }
    assert not bad, sorted(bad)


def test_library_modules_import_no_stage_or_orchestrator() -> None:
    bad = {
        f"{mod} imports {other}"
        for mod, deps in _graph().items()
        if mod not in STAGES | ORCHESTRATORS
        for other in deps
        if other in (STAGES - SPINE) | ORCHESTRATORS
    }
    assert not bad, sorted(bad)


def test_the_run_config_and_report_import_no_orchestrator_above_them() -> None:
    bad = {
        f"{mod} imports {other}"
        for mod, deps in _graph().items()
        if mod in RUN_PARTS
        for other in deps
        if other in ORCHESTRATORS - RUN_PARTS
    }
    assert not bad, sorted(bad)
    # The config is read by the report, never the other way round.
    assert "run_report" not in _graph()["runconfig"]


def test_orchestrators_and_torch_free_stages_do_not_import_torch() -> None:
    """``avfuse run`` builds every stage's config on each run, most of which train nothing.

    torch alone is ~220 MB and 2 s of start-up: the modules that only build configs, read
    score files (a score dump of numpy arrays included) or do bookkeeping must not pull it in.
    """
    import subprocess
    import sys

    modules = ["avfuse.pipeline", "avfuse.cli", "avfuse.demo", "avfuse.fuse", "avfuse.evaluate"]
    modules += ["avfuse.runconfig", "avfuse.run_report", "avfuse.fingerprint"]
    modules += ["avfuse.extract", "avfuse.features", "avfuse.manifest", "avfuse.model_config"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out
