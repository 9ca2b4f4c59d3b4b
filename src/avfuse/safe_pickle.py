"""Loading pickles and checkpoints that came from someone else, without running their code.

A pickle is a program: every ``GLOBAL`` it names is imported and may be called with arguments
of the file's choosing. Allowing whole modules (``numpy.*``, ``torch.*``) is not a restriction:
``numpy.testing._private.utils.runstring`` is an ``exec``, ``torch.load`` and
``torch.storage._load_from_bytes`` unpickle again without limits. So both loaders here allow
exact ``(module, name)`` pairs only, looked up in a table and never imported by name.

:func:`load_pickle`
    score dumps (mmaction2's ``--dump``/``--out``: lists of dicts holding numpy arrays and torch
    tensors). numpy arrays, dtypes and scalars are rebuilt by numpy's own constructors; a torch
    tensor's storage, which a plain pickle carries as a nested ``torch.save`` blob, is decoded
    by ``torch.load(weights_only=True)``, so it obeys torch's own allowlist.
:func:`load_torch`
    checkpoints: ``torch.load(weights_only=True)`` plus exactly the globals a numpy
    ``RandomState`` (and the arrays of its state) needs, wrapped so that the constructors cannot
    be handed another callable.

A refused global raises :class:`UnsafePickleError` naming it; a truncated or corrupt file
raises :class:`CorruptPickleError` (pickles) or :class:`CorruptCheckpointError` (checkpoints).
All three are ``ValueError`` subclasses with one line naming the file.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import errno
import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# torch is imported where a tensor or a checkpoint is met: reading a score dump of plain numpy
# arrays (avfuse fuse) must not pay torch's start-up time and ~220 MB.

__all__ = [
    "CorruptCheckpointError",
    "CorruptPickleError",
    "UnsafePickleError",
    "load_pickle",
    "load_torch",
]


class UnsafePickleError(ValueError):
    """The file names a global outside the allowlist; nothing of it was run."""


class CorruptPickleError(ValueError):
    """The pickle is truncated or not a pickle at all."""


class CorruptCheckpointError(ValueError):
    """The checkpoint is truncated or damaged."""


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles spell ``bytes`` as _codecs.encode(text, "latin1"); other codecs
    # (zlib, base64, rot13 ...) are never needed for that, so they are not offered.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return _codecs.encode(obj, "latin1")  # type: ignore[no-any-return]


def _storage_from_bytes(data: Any) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes``, which unpickles with no allowlist."""
    if not isinstance(data, bytes | bytearray):
        raise UnsafePickleError("a tensor storage must be given as bytes")
    import torch

    try:
        out = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _is_refusal(exc):
            raise _refusal(exc, "inside a tensor storage") from None
        raise
    if not isinstance(out, torch.storage.TypedStorage | torch.UntypedStorage):
        raise UnsafePickleError(f"a tensor storage decoded to {type(out).__name__}")
    return out


def _rebuild_tensor(*args: Any) -> Any:
    import torch

    return torch._utils._rebuild_tensor_v2(*args)  # type: ignore[no-untyped-call]


def _np_core(name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; files written by numpy 1 name the old module.
    return getattr(np._core.multiarray, name)  # type: ignore[attr-defined]


_NP_RECONSTRUCT = _np_core("_reconstruct")
_NP_SCALAR = _np_core("scalar")
_NP_FROMBUFFER = np._core.numeric._frombuffer  # type: ignore[attr-defined]

# (module, name) -> object. Nothing outside this table is ever imported or called.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy.core.multiarray", "scalar"): _NP_SCALAR,
    ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,  # a tensor's (empty) hook table
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 files spell Python 3 names the Python 2 way (__builtin__, copy_reg).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id (not a plain pickle)")


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only numpy arrays/dtypes/scalars, torch tensors and containers.

    Returns the object (lists, dicts, tuples, numbers, strings, ``np.ndarray``,
    ``torch.Tensor``). Raises :class:`UnsafePickleError` naming the first global outside the
    allowlist (before anything it names is called), :class:`CorruptPickleError` for a
    truncated or non-pickle file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            return _AllowlistUnpickler(fh).load()
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{path}: {exc}") from None
        except EOFError:
            raise CorruptPickleError(f"{path}: truncated or empty pickle") from None
        except Exception as exc:  # whatever a damaged stream makes the constructors raise
            raise CorruptPickleError(
                f"{path}: not a readable pickle ({_first_line(exc)})"
            ) from None


# --------------------------------------------------------------------------- checkpoints

_BIT_GENERATORS = {"MT19937": np.random.MT19937}


def _bit_generator_ctor(bit_generator: Any = "MT19937") -> np.random.BitGenerator:
    # numpy's own helper instantiates any class it is given; take only the one RandomState uses.
    if isinstance(bit_generator, str) and bit_generator in _BIT_GENERATORS:
        return _BIT_GENERATORS[bit_generator]()
    if bit_generator in _BIT_GENERATORS.values():
        return bit_generator()  # type: ignore[no-any-return]
    raise UnsafePickleError(f"refusing bit generator {bit_generator!r}")


def _randomstate_ctor(
    bit_generator_name: Any = "MT19937", bit_generator_ctor: Any = None
) -> np.random.RandomState:
    # numpy's helper calls ``bit_generator_ctor`` whatever it is; it is ignored here.
    if isinstance(bit_generator_name, np.random.MT19937):
        return np.random.RandomState(bit_generator_name)
    return np.random.RandomState(_bit_generator_ctor(bit_generator_name))


def _legacy_randomstate_ctor() -> np.random.RandomState:
    return np.random.RandomState(seed=0)  # numpy < 1.17: the state follows in a BUILD


def _numpy_rng_globals() -> list[tuple[Callable[..., Any], str]]:
    """Pairs for ``torch.serialization.safe_globals``: a numpy RandomState and its arrays."""
    dtypes = [
        t
        for name in dir(np.dtypes)
        if name.endswith("DType")
        and name not in ("ObjectDType", "StringDType", "VoidDType")
        and isinstance(t := getattr(np.dtypes, name), type)
    ]
    pairs: list[tuple[Callable[..., Any], str]] = [
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        (_NP_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
        (_NP_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
        (_NP_SCALAR, "numpy._core.multiarray.scalar"),
        (_NP_SCALAR, "numpy.core.multiarray.scalar"),
        (_randomstate_ctor, "numpy.random._pickle.__randomstate_ctor"),
        (_bit_generator_ctor, "numpy.random._pickle.__bit_generator_ctor"),
        (_legacy_randomstate_ctor, "numpy.random.__RandomState_ctor"),
        (np.random.MT19937, "numpy.random._mt19937.MT19937"),
        (np.random.RandomState, "numpy.random.mtrand.RandomState"),
    ]
    # BUILD on a dtype checks the dtype's own class against the allowlist.
    pairs += [(t, f"numpy.dtypes.{t.__name__}") for t in dtypes]
    return pairs


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)")


def _refusal(exc: BaseException, where: str) -> UnsafePickleError:
    """One line from torch's multi-paragraph weights_only refusal, naming the global."""
    text = str(exc)
    m = _GLOBAL_IN_MESSAGE.search(text)
    if m:
        name = next(g for g in m.groups() if g)
        return UnsafePickleError(f"{where}: refusing to load {name}")
    first = " ".join(text.split())[:200]
    return UnsafePickleError(f"{where}: refused by the weights-only loader ({first})")


def _is_refusal(exc: BaseException) -> bool:
    # torch prefixes every weights-only failure alike; a refusal names a global or the allowlist,
    # a damaged stream says e.g. "Unsupported operand".
    text = str(exc)
    return bool(_GLOBAL_IN_MESSAGE.search(text)) or "allowlisted" in text


def load_torch(path: str | Path, *, allow_numpy_rng: bool = True) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with clean errors.

    ``allow_numpy_rng`` also admits a numpy ``RandomState`` and the arrays/scalars of its
    state (third-party checkpoints save a data sampler's RNG; ours may hold numpy RNG states).
    Raises :class:`UnsafePickleError` naming a refused global and
    :class:`CorruptCheckpointError` for a truncated or damaged file; both name ``path``.
    """
    import torch

    path = Path(path)
    extra = _numpy_rng_globals() if allow_numpy_rng else []
    try:
        with torch.serialization.safe_globals(extra):  # type: ignore[arg-type]
            return torch.load(path, map_location="cpu", weights_only=True)
    except UnsafePickleError as exc:  # raised by the wrapped constructors above
        raise UnsafePickleError(f"{path}: {exc}") from None
    except pickle.UnpicklingError as exc:
        if _is_refusal(exc):
            raise _refusal(exc, str(path)) from None
        raise CorruptCheckpointError(_corrupt(path, exc)) from None
    except OSError as exc:
        # torch's zip reader says EINVAL for a file cut inside its records; other OS errors
        # (missing file, permissions, I/O) are not about the content and pass unchanged.
        if exc.errno not in (None, errno.EINVAL):
            raise
        raise CorruptCheckpointError(_corrupt(path, exc)) from None
    except (
        EOFError,
        RuntimeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise CorruptCheckpointError(_corrupt(path, exc)) from None


def _corrupt(path: Path, exc: BaseException) -> str:
    return f"{path}: truncated or corrupt checkpoint ({_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # torch wraps the unpickler's own words in paragraphs of advice; keep only those words.
    text = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
    return f"{type(exc).__name__}: {text}"[:200]
