"""Command line: each subcommand builds one config dataclass and calls one public function.

Options come from the config dataclass's fields (see :mod:`avfuse.config`); any key, nested ones
included, can also be given as ``--set key=value``, and a whole config as ``--config FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avfuse import __version__
from avfuse.config import add_arguments, apply_overrides, from_arguments, read_mapping
from avfuse.io import TerminalSafeFormatter, terminal_safe
from avfuse.lock import work_lock
from avfuse.workdir import WorkDir

# subcommand -> (module, config class, function, one-line help); a config class named with its
# module ("avfuse.runconfig.RunConfig") lives outside the function's module.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "scan": ("avfuse.manifest", "ScanConfig", "scan", "index a dataset into WORK/manifest.parquet"),
    "extract": ("avfuse.extract", "ExtractConfig", "extract", "decode every sound track to FLAC"),
    "features": (
        "avfuse.features",
        "FeaturesConfig",
        "compute_features",
        "compute log-mel features into the feature store",
    ),
    "embed": ("avfuse.embed", "EmbedConfig", "embed", "write pretrained embeddings per video"),
    "train": ("avfuse.train", "TrainConfig", "train", "train the audio classifier"),
    "predict": ("avfuse.predict", "PredictConfig", "predict", "write per-video audio scores"),
    "evaluate": ("avfuse.evaluate", "EvaluateConfig", "evaluate", "metrics of a score file"),
    "fuse": ("avfuse.fuse", "FuseConfig", "fuse", "fuse audio and video scores, write a report"),
    "run": (
        "avfuse.pipeline",
        "avfuse.runconfig.RunConfig",
        "run",
        "run every stage from one config file",
    ),
    "demo": ("avfuse.demo", "DemoConfig", "demo", "generate the built-in dataset and run it"),
}


def _load(name: str) -> tuple[type, Any]:
    module, cls_name, fn_name, _ = COMMANDS[name]
    cls_module, _, cls_name = cls_name.rpartition(".")
    mod = importlib.import_module(module)
    return getattr(importlib.import_module(cls_module or module), cls_name), getattr(mod, fn_name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; options are generated only for ``command`` (imports stay lazy)."""
    parser = argparse.ArgumentParser(prog="avfuse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"avfuse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="TOML/YAML/JSON file with this command's settings")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override any key, nested ones too (e.g. --set train.epochs=5)",
        )
        # A usage error names this subcommand's usage, not the top-level one (see main).
        p.set_defaults(subparser=p)
        if name == command:
            cls, _fn = _load(name)
            add_arguments(p, cls)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    ns, extra = parser.parse_known_args(argv)
    if extra:
        # argparse hands options a subcommand does not know back to the top-level parser,
        # whose usage line says nothing about the subcommand's options.
        ns.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        # Log lines quote file and class names from the data: no escape sequence of theirs
        # reaches the terminal.
        if type(handler.formatter) is logging.Formatter:
            handler.setFormatter(TerminalSafeFormatter(handler.formatter._fmt))
    cls, fn = _load(ns.command)
    try:
        base = read_mapping(ns.config) if ns.config else None
        cfg: Any = from_arguments(cls, ns, base)
        cfg = apply_overrides(cfg, ns.set)
    except (TypeError, ValueError, OSError) as exc:
        # A value the config refuses names the field and what it may be: that one line is
        # the whole message, as for errors the stage raises.
        print(f"avfuse {ns.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    log = logging.getLogger("avfuse")
    try:
        check_command(ns.command, cfg)
        with _work_lock(ns.command, cfg):
            result = fn(cfg)
    except KeyboardInterrupt:
        log.debug("interrupted", exc_info=True)
        print(
            f"avfuse {ns.command}: interrupted; {_RESUME.get(ns.command, _RERUN)}", file=sys.stderr
        )
        return 130
    except CLEAN_ERRORS as exc:
        # Bad input, a refused combination, a full disk, a busy work folder: the message says
        # what to do; a traceback would only hide it (``-v`` shows it).
        log.debug("failed", exc_info=True)
        print(f"avfuse {ns.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    summary = getattr(result, "summary", None)
    if callable(summary):
        print(terminal_safe(summary()))
    return 0


# What a rerun does after Ctrl-C. Training continues only when asked: a plain rerun starts
# the run afresh (a changed recipe must not silently continue an old one).
_RERUN = "finished work is kept and a rerun resumes"
_RESUME = {
    "train": "the last checkpoint is kept: rerun the same command with --resume to continue "
    "from it (without --resume the run starts afresh)",
    "predict": "nothing was written; rerun to score again",
}

# What a user can fix: reported as one line and exit code 2. ``OSError`` covers a full disk
# (:class:`avfuse.io.DiskFullError`), permissions and paths that are files; ``ValueError``
# covers corrupt checkpoints, foreign score files and refused settings; ``RuntimeError``
# covers a busy work folder, a missing GPU and stages refusing an inconsistent state.
CLEAN_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace folded, control characters escaped);
    its type if it has none."""
    return terminal_safe(" ".join(str(exc).split())) or type(exc).__name__


def check_command(command: str, cfg: Any) -> None:
    """Refuse settings that cannot work before any stage starts (one clear line each)."""
    work = getattr(cfg, "work", None)
    if work is not None and Path(work).exists() and not Path(work).is_dir():
        raise NotADirectoryError(f"work folder {work} is a file, not a folder")
    if work is not None and command not in CREATE_WORK and not Path(work).is_dir():
        raise FileNotFoundError(
            f"work folder {work} does not exist: run `avfuse scan ROOT -o {work}` first"
        )
    if work is not None and command not in CREATE_WORK and not _is_work_folder(Path(work)):
        # A mistyped path to someone's existing folder must not get a lock file planted in it.
        raise FileNotFoundError(
            f"{work} is not an avfuse work folder (no {WorkDir(work).manifest.name}): run "
            f"`avfuse scan ROOT -o {work}` first"
        )
    for section in (cfg, *(getattr(cfg, name, None) for name in ("train", "predict"))):
        device = getattr(section, "device", None)
        if isinstance(device, str) and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"device={device} requested but no CUDA device is available "
                    "(use --device cpu or auto)"
                )


def _is_work_folder(work: Path) -> bool:
    """Whether a scan wrote ``work`` (its manifest) or an avfuse command locked it before."""
    return WorkDir(work).manifest.exists() or WorkDir(work).lock.exists()


# The commands that may create their work folder; every other one refuses a missing folder
# (a mistyped path must not leave a new folder behind).
CREATE_WORK = ("scan", "run", "demo")


def _work_lock(command: str, cfg: Any) -> contextlib.AbstractContextManager[Any]:
    work = getattr(cfg, "work", None)
    if work is None:
        return contextlib.nullcontext()
    return work_lock(work, create=command in CREATE_WORK)


if __name__ == "__main__":
    sys.exit(main())
