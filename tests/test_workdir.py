"""``avfuse.workdir`` owns every file and folder name a stage writes or reads.

The layouts are checked against the names existing work folders hold (renaming one would
orphan every folder written before), and every other module is parsed for string constants
that spell a path, so a new name has to be added to ``workdir.py``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from avfuse.workdir import (
    LOCK_NAME,
    FusionLayout,
    ScoreLayout,
    StoreLayout,
    VideoModelLayout,
    WorkDir,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "avfuse"


# --------------------------------------------------------------------------- the layouts


def test_layouts_keep_the_names_existing_work_folders_hold() -> None:
    w = WorkDir("w")
    expected = {
        w.manifest: "w/manifest.parquet",
        w.lock: "w/.avfuse.lock",
        w.features_parts: "w/features/parts",
        w.store_meta: "w/features/store.json",
        w.features_config: "w/features/config.toml",
        w.embeddings("e"): "w/embeddings/e",
        w.checkpoint("r", "last"): "w/runs/r/last.pt",
        w.scores("val"): "w/scores/audio_val.npz",
        ScoreLayout(w.scores("val")).metrics: "w/scores/audio_val.metrics.json",
        ScoreLayout(w.scores("test", "video")).per_class: "w/scores/video_test.per_class.csv",
        w.status_counts_plot: "w/figures/status_counts.png",
        w.training_curves_plot: "w/figures/training_curves.png",
        w.audio_errors_plot: "w/figures/audio_errors.png",
        w.video_model: "w/video_model",
        w.demo_dataset: "w/dataset",
    }
    for got, want in expected.items():
        assert got == Path(want)
    assert w.lock.name == LOCK_NAME


def test_store_layout() -> None:
    s = StoreLayout("w/embeddings/e")
    assert s.meta == Path("w/embeddings/e/store.json")
    assert s.index == Path("w/embeddings/e/index.parquet")
    assert s.shard("shard-a-00001.npy") == Path("w/embeddings/e/shards/shard-a-00001.npy")
    assert StoreLayout.shard_name("p1", 7) == "shard-p1-00007.npy"
    assert s.embed_config == Path("w/embeddings/e/embed.toml")


def test_store_layout_lists_only_shard_files(tmp_path: Path) -> None:
    s = StoreLayout(tmp_path)
    assert s.shard_files() == []  # no shards folder yet
    s.shards.mkdir()
    for name in ("shard-b-00000.npy", "shard-a-00000.npy", "notes.txt"):
        (s.shards / name).write_bytes(b"x")
    assert [p.name for p in s.shard_files()] == ["shard-a-00000.npy", "shard-b-00000.npy"]


def test_score_layout_places_sidecars_beside_any_score_file() -> None:
    s = ScoreLayout("out/audio_val.npz")
    assert s.metrics == Path("out/audio_val.metrics.json")
    assert s.per_class == Path("out/audio_val.per_class.csv")
    assert s.predict_config == Path("out/audio_val.predict.toml")
    assert s.evaluate_config == Path("out/audio_val.evaluate.toml")
    assert s.candidate("baseline") == Path("out/audio_val.baseline.npz")
    assert s.csv == Path("out/audio_val.csv")
    # A score file named without .npz keeps its whole name before the sidecar's suffix, and
    # its CSV replaces the last suffix (as written before these names moved here).
    other = ScoreLayout("out/my.scores")
    assert other.metrics == Path("out/my.scores.metrics.json")
    assert other.csv == Path("out/my.csv")


def test_fusion_and_video_model_layouts() -> None:
    f = FusionLayout("w/fusion")
    assert f.figures == Path("w/fusion/fusion.json") and f.figures.name == FusionLayout.MARKER
    assert f.config == Path("w/fusion/config.toml")
    assert f.scores("val") == Path("w/fusion/fused_val.npz")
    assert (f.report_md, f.report_html) == (
        Path("w/fusion/report.md"),
        Path("w/fusion/report.html"),
    )
    assert {p.name for p in (f.accuracy_plot, f.weight_curve_plot, f.class_gain_plot)} == {
        "accuracy.png",
        "weight_curve.png",
        "class_gain.png",
    }
    assert FusionLayout.excerpt(7) == "audio/changed_007.ogg"
    v = VideoModelLayout("w/video_model")
    assert v.model == Path("w/video_model/video_model.npz")
    assert v.scores("heldout") == Path("w/video_model/video_heldout.csv")
    assert v.stamp == Path("w/video_model/video_baseline.json")


# --------------------------------------------------------------------------- no path literals
#
# The rule, for every string constant of every module but workdir.py (docstrings excepted:
# they explain names in prose). An f-string is read as its literal text with ``{}`` for each
# value. A constant is a path literal when
#   A. it is one name-like token (letters, digits, ``_ - . * {}``, ``/``; no spaces) ending in
#      one of EXTENSIONS: ``"fusion.json"``, ``".metrics.json"``, ``"fused_{}.npz"``,
#      ``"*.npy"``. A bare suffix (``".json"``) compared with a file's suffix, or listed in a
#      tuple/list/set literal, recognises a format and names nothing: it is exempt;
#   B. it is one token with a ``/`` inside or at the end and a name in it: ``"runs/"``,
#      ``"audio/changed_{}"`` (values alone, ``f"{split}/{label}"`` or a glob ``"*/*"``, are
#      relative paths of the dataset, spelling no name);
#   C. it is an operand of ``/`` (a path join: ``store / "parts"``), whatever its text;
#   D. an f-string joins a value and a name of two or more characters starting with a letter:
#      ``f"{work}/classes.txt"``, ``f"{work}/runs"`` (a format version, ``f"{name}/2"``, or its
#      placeholder ``"{name}/N"`` names no file);
#   E. it is assigned to an UPPER_CASE name that some module joins with ``/``
#      (``SHARDS = "shards"`` ... ``root / SHARDS``).
# ALLOWED lists the constants that match but name nothing in a work folder, each with why.

EXTENSIONS = [
    "parquet",
    "json",
    "jsonl",
    "toml",
    "csv",
    "txt",
    "tsv",
    "pt",
    "pth",
    "npz",
    "npy",
    "html",
    "md",
    "lock",
    "png",
    "svg",
    "ogg",
    "pkl",
    "log",
    "safetensors",
    "arrow",
]
_EXT = "|".join(EXTENSIONS)
_NAME_WITH_EXT = re.compile(rf"^[\w.*{{}}/-]*\.(?:{_EXT})$")
_BARE_SUFFIX = re.compile(r"^\.\w+$")
_SLASHED = re.compile(r"^[\w.*{}-]+/[\w.*{}/-]*$")
_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")
_FSTRING_JOIN = re.compile(r"\{\}/[A-Za-z_][\w.*-]+")

TEMPORARY = (
    "the temporary beside a file or folder io writes crash-safely (any path, inside WORK or "
    "not): never a finished file, removed by io itself"
)
HF_FOLDER = "a Hugging Face model folder's own names (another tool's format, read only)"
ALLOWED: dict[tuple[str, str], str] = {
    ("ast_model.py", "config.json"): HF_FOLDER,
    ("ast_model.py", "model.safetensors"): HF_FOLDER,
    ("ast_model.py", "model.safetensors.index.json"): HF_FOLDER,
    ("ast_model.py", "preprocessor_config.json"): HF_FOLDER,
    ("excerpt.py", "audio/ogg"): "the MIME type of the excerpts",
    ("report.py", "audio/ogg"): "the MIME type of a report's sound players",
    ("report.py", "n/a"): "a table cell for a missing figure",
    ("evaluate.py", "n/a"): "a table cell for a missing figure",
    ("train.py", "train/loss_step"): "a TensorBoard scalar tag",
    ("train.py", "train/lr"): "a TensorBoard scalar tag",
    ("train.py", "epoch/{}"): "a TensorBoard scalar tag",
    ("video_scores.py", ".npy"): "numpy's own naming of the arrays inside an .npz file",
    ("runconfig.py", "default_run.toml"): "a data file of the package, beside its module",
    ("lock.py", "/proc/{}/stat"): "the kernel's process table",
    ("io.py", ".{}{}{}-{}{}"): TEMPORARY,
    ("io.py", ".{}{}{}-{}"): TEMPORARY,
    ("parallel.py", "/proc/{}/stat"): "the kernel's process table",
}


def _docstrings(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _joined_names(trees: list[ast.AST]) -> set[str]:
    """Names (variables, attributes) used as an operand of ``/`` anywhere in the package."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Name):
                        names.add(side.id)
                    elif isinstance(side, ast.Attribute):
                        names.add(side.attr)
    return names


_PATH_METHODS = {"with_name", "with_suffix", "with_stem", "joinpath", "join"}


def _names_a_path(node: ast.AST, parents: dict[int, ast.AST]) -> bool:
    """``node`` is an argument of ``p.with_name(...)``, ``p.with_suffix(...)``,
    ``p.joinpath(...)`` or ``os.path.join(...)``, or a term of a ``+`` inside one."""
    parent = parents.get(id(node))
    while isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Add):
        node, parent = parent, parents.get(id(parent))
    if not isinstance(parent, ast.Call) or node not in parent.args:
        return False
    f = parent.func
    if not isinstance(f, ast.Attribute) or f.attr not in _PATH_METHODS:
        return False
    if f.attr == "join":  # str.join is not a path join
        return ast.unparse(f.value) == "os.path"
    return True


def _why(text: str, node: ast.AST, parents: dict[int, ast.AST], joined: set[str]) -> str:
    parent = parents.get(id(node))
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div):
        return "joined with /"
    if isinstance(parent, (ast.Assign, ast.AnnAssign)):
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        if any(isinstance(t, ast.Name) and _UPPER.match(t.id) and t.id in joined for t in targets):
            return "a constant some module joins with /"
    if text and _names_a_path(node, parents):
        return "a name given to a path method"
    if isinstance(node, ast.JoinedStr) and _FSTRING_JOIN.search(text):
        return "an f-string joining a value and a name"
    if _NAME_WITH_EXT.match(text):
        if _BARE_SUFFIX.match(text) and isinstance(
            parent, (ast.Compare, ast.Tuple, ast.List, ast.Set)
        ):
            return ""
        return "a file name"
    # Values alone joined (``f"{split}/{label}"``, a glob ``"*/*"``) spell no name.
    if _SLASHED.match(text) and re.search(r"[A-Za-z]", text.replace("{}", "")):
        return "a path with a folder"
    return ""


def _path_literals(modules: dict[str, str]) -> Iterator[str]:
    """``module:line: 'text' (why)`` for each path literal of ``{module: source}``."""
    trees = {name: ast.parse(src, filename=name) for name, src in modules.items()}
    joined = _joined_names(list(trees.values()))
    for name, tree in trees.items():
        docs = _docstrings(tree)
        parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        inside_fstring = {
            id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values
        }
        for node in ast.walk(tree):
            text = _text(node)
            if text is None or id(node) in docs or id(node) in inside_fstring:
                continue
            why = _why(text, node, parents, joined)
            if why and (Path(name).name, text) not in ALLOWED:
                yield f"{name}:{node.lineno}: {text!r} ({why})"


def _package_sources() -> dict[str, str]:
    return {
        str(p.relative_to(SRC)): p.read_text("utf-8")
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "workdir.py"
    }


def test_no_module_but_workdir_spells_a_path() -> None:
    found = list(_path_literals(_package_sources()))
    assert not found, "spell these through avfuse.workdir:\n" + "\n".join(found)


def test_every_allowed_literal_is_still_there() -> None:
    """A stale allowance would let the name back in unnoticed."""
    present: set[tuple[str, str]] = set()
    for name, src in _package_sources().items():
        for node in ast.walk(ast.parse(src)):
            text = _text(node)
            if text is not None:
                present.add((Path(name).name, text))
    assert set(ALLOWED) <= present, sorted(set(ALLOWED) - present)


@pytest.mark.parametrize(
    "source",
    [
        'p = work / "fusion.json"',
        'p = store / "parts"',
        'p = out.with_name(out.name.removesuffix(".npz") + ".metrics.json")',
        'p = folder.glob("*.npy")',
        'p = f"audio/changed_{i:03d}.ogg"',
        'msg = f"missing {work}/classes.txt"',
        'rel = f"runs/{name}"',
        'SHARDS = "shards"\ndef f(root):\n    return root / SHARDS',
        'name = f"fused_{split}.npz"',
        'LOCK = ".avfuse.lock"',
        'aside = part.with_name(part.name + ".corrupt")',
        'p = os.path.join(work, "audio")',
    ],
)
def test_the_rule_catches_path_spellings(source: str) -> None:
    assert list(_path_literals({"m.py": source}))


@pytest.mark.parametrize(
    "source",
    [
        '"""Writes ``WORK/fusion/fusion.json``."""',
        'HELP = "score file (default WORK/scores/audio_SPLIT.npz)"',
        'ok = path.suffix == ".json"',
        'ok = path.suffix in (".yaml", ".yml", ".json")',
        'AUDIO = (".wav", ".flac", ".ogg")',
        'log.info("wrote %s", out)',
        'tag = "a b/c"',
        'stem = rel.with_suffix("")',
        'fmt = f"{FORMAT_NAME}/2"',
        'line = ", ".join(names)',
    ],
)
def test_the_rule_leaves_prose_and_format_checks_alone(source: str) -> None:
    assert not list(_path_literals({"m.py": source}))


_BAD_NAMES = ["../../outside", "/tmp/elsewhere", "a/b", "..", ".hidden", "", "a\x1b[2J", "x" * 200]


@pytest.mark.parametrize("bad", _BAD_NAMES)
def test_run_and_embedding_names_never_leave_their_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    from avfuse.cli import main
    from avfuse.workdir import WorkDir

    work = tmp_path / "deep" / "w"
    work.mkdir(parents=True)
    (work / "manifest.parquet").touch()
    for call in (lambda: WorkDir(work).run(bad), lambda: WorkDir(work).embeddings(bad)):
        with pytest.raises(ValueError, match="name"):
            call()
    for args in (["train", str(work), "--name", bad], ["predict", str(work), "--run-name", bad]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "invalid run name" in err[0], err
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["w"]
    assert WorkDir(work).run("ñame-2.b") == work / "runs" / "ñame-2.b"
