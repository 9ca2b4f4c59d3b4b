"""The import rule: stages talk through WORK files and share code through library modules.

Parsed from the source (every ``import``, function-local ones included), so a new import that
breaks the layering fails here, not in a later refactoring.
"""

from __future__ import annotations

import ast
import re
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


# ------------------------------------------------------------------------- tests mirror the package

TESTS = Path(__file__).resolve().parent
# Modules with no code of their own to test: the package marker and ``python -m avfuse``
# (which only calls ``avfuse.cli.main``).
NO_CODE = {"__init__", "__main__"}
# Test files that are about the package as a whole rather than one module: this one holds the
# rules between modules (imports, layering, sizes).
CROSS_MODULE = {"test_layering"}


def test_tests_mirror_the_package() -> None:
    """One ``tests/test_<module>.py`` per module (a package such as ``demo`` is one module), and
    every test file is a module's, an end-to-end one (``test_e2e_*``) or listed above."""
    modules = {_module(p) for p in SRC.rglob("*.py")} - NO_CODE
    files = {p.stem for p in TESTS.glob("test_*.py")}
    missing = sorted(f"tests/test_{m}.py" for m in modules if f"test_{m}" not in files)
    assert not missing, f"modules without their test file: {missing}"
    stray = sorted(
        f"tests/{f}.py"
        for f in files
        if f.removeprefix("test_") not in modules
        and not f.startswith("test_e2e_")
        and f not in CROSS_MODULE
    )
    assert not stray, (
        f"test files named after no module (name them test_<module> or test_e2e_*): {stray}"
    )


def test_readme_and_design_name_every_module() -> None:
    """The README's module list (Development) and docs/design.md's module map stay true."""
    repo = SRC.parents[1]
    modules = {_module(p) for p in SRC.rglob("*.py")} - NO_CODE
    readme = (repo / "README.md").read_text(encoding="utf-8")
    listing = readme[readme.index("## Development") :].split("\n## ")[0]
    design = (repo / "docs" / "design.md").read_text(encoding="utf-8")
    unlisted = sorted(m for m in modules if f"{m}.py" not in listing and f"{m}/" not in listing)
    assert not unlisted, f"modules the README's Development list does not name: {unlisted}"
    unmapped = sorted(m for m in modules if f"`{m}`" not in design and f"`{m}/`" not in design)
    assert not unmapped, f"modules docs/design.md's module map does not name: {unmapped}"


def test_the_layers_drawn_in_the_design_are_these_lists() -> None:
    """docs/design.md draws the layers (``## Layers``): one label per layer at the start of a
    line, then its modules (continuation lines indented). The drawing names the same modules
    as the lists above, so the picture cannot drift from the rule this file checks."""
    design = (SRC.parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    drawing = design.split("## Layers", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    labels = ("CLI", "orchestrator", "stages", "library floor")
    layers: dict[str, set[str]] = {label: set() for label in labels}
    modules = {_module(p) for p in SRC.rglob("*.py")}
    current = ""
    for line in drawing.splitlines():
        current = next((lb for lb in labels if line.startswith(lb)), current)
        rest = line[len(current) :] if line.startswith(current) else line
        names = set(re.findall(r"[a-z_]+", rest)) - {"v"}  # "v": an arrow head
        assert names <= modules, f"the drawing names what is no module: {sorted(names - modules)}"
        if current:
            layers[current] |= names
    assert layers["stages"] == STAGES
    assert layers["CLI"] | layers["orchestrator"] == ORCHESTRATORS - NO_CODE
    assert layers["library floor"] == modules - STAGES - ORCHESTRATORS - NO_CODE
