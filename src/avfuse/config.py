"""Frozen configuration dataclasses: TOML round trip, CLI flags, overrides, stable hashes.

Every stage of avfuse is configured by one frozen dataclass. This module knows how to

* turn such a dataclass into a plain dict and back (``to_dict`` / ``from_dict``),
* save it as TOML and load it again (``save_config`` / ``load_config``),
* derive ``argparse`` flags from its fields (``add_arguments`` / ``from_arguments``),
* apply ``key.sub=value`` overrides (``apply_overrides``),
* hash it stably (``config_hash``).

A field's help text lives in its metadata (``field(metadata={"help": ...})``), so the CLI and
the documentation come from one place. Metadata keys understood here:

``help``        help text
``positional``  the field is a positional CLI argument
``flags``       extra option strings, e.g. ``("-o",)``
``cli``         ``False`` hides the field from the CLI (still settable with ``--set``)
``omit_default`` ``True`` leaves the field out of ``to_dict`` (so of files and hashes) while it
                holds its default: a field added later keeps the hashes of earlier configs
``min``/``max`` inclusive bounds of a number field, checked with the ``Literal`` values
``above``       exclusive lower bound (a width multiplier must be > 0, and 0 is not a size)
``legacy``      ``{old value: new value}`` applied when a config is made or read (files,
                checkpoints, code), so a setting whose type changed keeps old uses working

A field naming an entry of a :class:`Registry` (a model, a fusion method, a score format) is
typed ``Annotated[str, OneOf(REGISTRY)]``: it is checked, offered as CLI choices and
documented like a ``Literal`` whose values are the registry's names at that moment, so a new
entry needs no second list.

Config classes derive from :class:`Config`, which checks every field when an instance is made
(directly, by ``dataclasses.replace`` or by :func:`from_dict`): a ``Literal`` field must hold one
of its values, a bounded number must lie within its bounds, and no number may be NaN or
infinite (``nan`` passes every ``<``/``>`` check). ``true`` is not the integer 1. A wrong value
is an error naming the field and what it may be, never a setting that is silently ignored.

Config files are read by :func:`read_mapping`, which bounds what a small file can make it
allocate: the file size, the nesting depth, and YAML aliases (refused: a few hundred bytes of
nested aliases expand to gigabytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import tomli_w
import yaml

from avfuse.io import atomic_write, require_regular_file
from avfuse.registry import OneOf

T = TypeVar("T")


def _one_of(tp: Any) -> OneOf | None:
    """The :class:`OneOf` of an ``Annotated[str, OneOf(...)]`` type, else ``None``."""
    if get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, OneOf)), None)
    return None


def allowed_values(tp: Any) -> tuple[Any, ...]:
    """The values a field of type ``tp`` allows (``Literal``, ``OneOf``; also ``X | None`` and
    ``tuple[X, ...]``) as they are now; empty for a field of another type."""
    values, _ = _literal_values(tp)
    return tuple(values)


def num_workers_field() -> Any:
    """The ``num_workers`` field every parallel stage shares."""
    return dataclasses.field(
        default=None,
        metadata={
            "min": 0,
            "help": "worker processes (default: all cores; 0: run in this process)",
        },
    )


def scheduler_field() -> Any:
    """The ``scheduler`` field of the stages that can run on a Dask cluster."""
    return dataclasses.field(
        default=None,
        metadata={"help": "Dask scheduler address (tcp://host:8786) to run on a cluster"},
    )


class Config:
    """Base of the config dataclasses: every field is checked when an instance is made.

    A subclass's own ``__post_init__`` runs after the check, so its cross-field rules see values
    that are each valid.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_after_check", False):
            return

        def __post_init__(self: Any) -> None:
            _apply_legacy(self)
            check_fields(self)
            own(self)

        __post_init__._after_check = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        _apply_legacy(self)
        check_fields(self)


def _apply_legacy(cfg: Any) -> None:
    """Replace old-typed values of ``legacy`` fields (``channels_last=False`` -> ``"off"``), so
    code written against the old type keeps working, as old files do through :func:`from_dict`."""
    for f in dataclasses.fields(cfg):
        table = f.metadata.get("legacy")
        if table is not None:
            value = getattr(cfg, f.name)
            new = _renamed(table, value)
            if new is not value:
                object.__setattr__(cfg, f.name, new)


def _literal_values(tp: Any) -> tuple[tuple[Any, ...] | OneOf, bool]:
    """The values a ``Literal`` or ``OneOf`` field (or ``X | None``, ``tuple[X, ...]``) allows.

    Returns ``(values, per_item)``; ``values`` is empty for a field of another type, and a
    :class:`OneOf` itself (consulted on each use: a registry may grow) for a registry field.
    """
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return get_args(tp), False
    one_of = _one_of(tp)
    if one_of is not None:
        return one_of, False
    if origin is tuple:
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if len(args) == 1:
            values, _ = _literal_values(args[0])
            if values:
                return values, True
    return (), False


_Check = tuple[str, tuple[Any, ...] | OneOf, bool, Any, Any, Any, bool]


@functools.cache
def _field_checks(cls: type) -> tuple[_Check, ...]:
    # Resolved once per class: type hints are the costly part.
    hints = field_types(cls)
    checks = []
    for f in dataclasses.fields(cls):
        allowed, per_item = _literal_values(hints.get(f.name))
        lo, hi, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("above")
        base, _ = _unwrap_optional(hints.get(f.name))
        numeric = base in (int, float)
        if allowed or numeric or lo is not None or hi is not None or above is not None:
            checks.append((f.name, allowed, per_item, lo, hi, above, numeric))
    return tuple(checks)


def _choices(allowed: tuple[Any, ...] | OneOf) -> str:
    return ", ".join(repr(a) for a in allowed)


def check_fields(cfg: Any) -> None:
    """Raise ``ValueError`` naming the field if a value is outside its ``Literal`` or bounds."""
    name = type(cfg).__name__
    checks = _field_checks(type(cfg))  # type: ignore[arg-type]
    for field_name, allowed, per_item, lo, hi, above, numeric in checks:
        value = getattr(cfg, field_name)
        if value is None:
            continue
        if numeric and isinstance(value, bool):
            raise ValueError(f"{name}.{field_name}: {value!r} is a boolean, not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}.{field_name}: {value!r} is not a finite number")
        if allowed:
            items = value if per_item and isinstance(value, tuple | list) else (value,)
            bad = [v for v in items if v not in allowed]
            if bad:
                raise ValueError(
                    f"{name}.{field_name}: {bad[0]!r} is not one of {_choices(allowed)}"
                )
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if (
            (lo is not None and value < lo)
            or (hi is not None and value > hi)
            or (above is not None and value <= above)
        ):
            bounds = " and ".join(
                t
                for t in (
                    f">= {lo}" if lo is not None else "",
                    f"> {above}" if above is not None else "",
                    f"<= {hi}" if hi is not None else "",
                )
                if t
            )
            raise ValueError(f"{name}.{field_name}: {value!r} is out of range; must be {bounds}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of ``cls``, ``Annotated`` metadata (:class:`OneOf`) kept."""
    return typing.get_type_hints(cls, include_extras=True)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/TOML-friendly dict of a config dataclass (nested ones become tables).

    A float field holding an int (``shard_mb: float = 256``) comes out as a float, so a config
    and its round trip through a file hash alike.
    """
    hints = field_types(type(cfg))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("omit_default") and getattr(cfg, f.name) == f.default:
            continue
        value = _plain(getattr(cfg, f.name))
        base, _ = _unwrap_optional(hints.get(f.name))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[f.name] = value
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: None is not allowed")
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where=where)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {_choices(get_args(tp))}")
        return value
    one_of = _one_of(tp)
    if one_of is not None:
        if value not in one_of:
            raise ValueError(f"{where}: {value!r} is not one of {_choices(one_of)}")
        return value
    if origin is Annotated:
        return _coerce(get_args(tp)[0], value, where)
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        inner = args[0] if args else str
        return tuple(_coerce(inner, v, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Path:
        return Path(value)
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{where}: {value!r} is not a boolean")
        return bool(value)
    if tp is int:
        # bool is an int subclass: ``epochs = true`` would silently train one epoch.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{where}: {value!r} is not an integer")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: {value!r} is not an integer")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{where}: {value!r} is not a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        return number
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a plain dict; unknown keys are an error (typos must not pass silently)."""
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown key(s) for {cls.__name__}{' at ' + where if where else ''}: "
            f"{', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in data
    ]
    if required:
        raise ValueError(
            f"missing required key(s) for {cls.__name__}{' at ' + where if where else ''}: "
            f"{', '.join(required)}"
        )
    legacy = {
        f.name: f.metadata["legacy"]
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if "legacy" in f.metadata
    }
    kwargs = {
        k: _coerce(hints[k], _renamed(legacy.get(k), v), f"{where}.{k}" if where else k)
        for k, v in data.items()
    }
    return cls(**kwargs)


def _renamed(table: dict[Any, Any] | None, value: Any) -> Any:
    """``value`` through a field's ``legacy`` table (same type only: ``1`` is not ``true``)."""
    for old, new in (table or {}).items():
        if type(value) is type(old) and value == old:
            return new
    return value


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    # TOML has no null: a missing key means "default", which is None for optional fields.
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


def dumps(cfg: Any) -> str:
    """TOML text of a config dataclass, or of a plain dict made by :func:`to_dict`."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return tomli_w.dumps(_drop_none(data))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as TOML, atomically. Returns the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(dumps(cfg), encoding="utf-8")
    return path


# Config files are a few KB; a limit keeps a hostile one from being read into memory whole.
MAX_CONFIG_BYTES = 4 << 20
# Deeper than any config table: deeper input is refused before it can exhaust the C stack.
MAX_DEPTH = 32


class _NoAliasLoader(yaml.SafeLoader):
    """YAML safe loader without aliases and with a nesting limit.

    An alias re-uses a node: nine levels of nine aliases each expand 350 bytes into 3.7 GB of
    Python objects. A config never needs them, so they are refused where they appear. (The
    pure-Python loader: its composer can be extended, the C one's cannot.)
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_error(path: Path, exc: Exception) -> ValueError:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    return ValueError(f"{path}: not a usable YAML config: {' '.join(str(problem).split())}{where}")


def depth_of(data: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of dicts/lists in ``data``, counted without recursion; stops past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        obj, d = stack.pop()
        if not isinstance(obj, dict | list | tuple):
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((v, d + 1) for v in (obj.values() if isinstance(obj, dict) else obj))
    return deepest


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict (by extension).

    Raises ``ValueError`` naming the file for a file over :data:`MAX_CONFIG_BYTES`, one that
    does not parse (YAML tags such as ``!!python/object`` included), YAML aliases, or nesting
    deeper than :data:`MAX_DEPTH`.
    """
    path = Path(path)
    require_regular_file(path)
    with open(path, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: a config file over {MAX_CONFIG_BYTES >> 20} MiB is refused")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                data = yaml.load(text, Loader=_NoAliasLoader) or {}
            except yaml.YAMLError as exc:
                raise _yaml_error(path, exc) from None
        elif path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if depth_of(data) > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    return data


def load_config(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_mapping(path))


def finished_run_settings(
    cls: type[T], path: str | Path, outputs: Sequence[Path], saved_at_start: bool = False
) -> T | None:
    """The settings a stage saved at ``path`` when its ``outputs`` all exist, else ``None``.

    ``saved_at_start``: the stage saves its settings when it starts, so settings newer than
    the oldest output belong to a run that may not have finished (the outputs are an older
    run's): ``None`` too. Unreadable settings are ``None``: they cannot vouch for the outputs.
    """
    path = Path(path)
    try:
        if not outputs or not all(p.exists() for p in outputs) or not path.exists():
            return None
        if saved_at_start and path.stat().st_mtime_ns > min(p.stat().st_mtime_ns for p in outputs):
            return None
        return load_config(cls, path)
    except Exception:
        return None


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable hash of a config: sha256 of its canonical JSON (sorted keys)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def _parse_value(text: str) -> Any:
    # TOML literal syntax where it parses (numbers, booleans, arrays, quoted strings), else a string.
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        value = None
    if value is None or depth_of(value) > MAX_DEPTH:
        raise ValueError(
            f"override value {text[:40]!r}... is nested deeper than {MAX_DEPTH} levels"
        )
    return value


def apply_overrides(cfg: T, overrides: typing.Iterable[str]) -> T:
    """Apply ``a.b=value`` overrides (TOML literal syntax for the value) to a config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_nested(data, key.strip(), _parse_value(raw.strip()))
    return from_dict(type(cfg), _drop_none(data))


def _cli_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return str, {"choices": list(get_args(tp))}
    one_of = _one_of(tp)
    if one_of is not None:
        return str, {"choices": list(one_of)}
    if origin is tuple:
        return str, {"metavar": "A,B,..."}
    if tp is Path:
        return Path, {}
    if tp in (int, float, str):
        return tp, {}
    return None, {}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one CLI option per simple field of ``cls`` (nested tables are set with ``--set``)."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        tp = hints[f.name]
        base, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(base):
            continue
        help_text = meta.get("help", "")
        opt = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(
                opt,
                *meta.get("flags", ()),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        conv, extra = _cli_type(tp)
        if conv is None:
            continue
        if meta.get("positional"):
            # Optional on the command line even when required by the dataclass: a --config file
            # may supply it; from_dict reports it by name if it is missing from both.
            parser.add_argument(
                f.name,
                type=conv,
                nargs="?",
                default=None,
                help=help_text,
                **extra,
            )
        else:
            parser.add_argument(
                opt,
                *meta.get("flags", ()),
                dest=f.name,
                type=conv,
                default=None,
                help=help_text,
                **extra,
            )


def from_arguments(
    cls: type[T], ns: argparse.Namespace, base: T | dict[str, Any] | None = None
) -> T:
    """Build ``cls`` from parsed arguments on top of ``base`` (or the defaults).

    ``base`` may be a plain mapping read from a ``--config`` file: the file need not repeat
    what the command line gives (the positional WORK above all); a key missing from both is
    reported by :func:`from_dict`.
    """
    if isinstance(base, dict):
        data: dict[str, Any] = dict(base)
    else:
        data = to_dict(base) if base is not None else {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(ns, f.name, None)
        if value is not None:
            data[f.name] = value
    return from_dict(cls, _drop_none(data))
