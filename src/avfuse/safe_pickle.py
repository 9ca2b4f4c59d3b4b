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

Neither loader lets a small file allocate much more than its own size. Every byte of a real
array or tensor is in the file (torch writes its zip entries uncompressed), so what the file
declares is checked against its size before anything is allocated: a zip entry's
uncompressed size, a legacy tensor storage's element count, the shape an array constructor is
asked for. After loading, a pickle's containers are walked without recursion, bounding their
nesting depth and the items reachable through shared references (a few KB of pickle can hold
lists that share lists, 10^10 elements once flattened). A checkpoint's floating tensors must be
finite: one NaN weight turns every score into NaN.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import errno
import functools
import io
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from avfuse.io import require_regular_file

# torch is imported where a tensor or a checkpoint is met: reading a score dump of plain numpy
# arrays (avfuse fuse) must not pay torch's start-up time and ~220 MB.

__all__ = [
    "CorruptCheckpointError",
    "CorruptPickleError",
    "OversizeError",
    "UnsafePickleError",
    "check_declared_sizes",
    "first_nonfinite",
    "load_pickle",
    "load_torch",
]


class UnsafePickleError(ValueError):
    """The file names a global outside the allowlist; nothing of it was run."""


class CorruptPickleError(ValueError):
    """The pickle is truncated or not a pickle at all."""


class CorruptCheckpointError(ValueError):
    """The checkpoint is truncated or damaged."""


class OversizeError(CorruptPickleError, CorruptCheckpointError):
    """The file declares more data than it holds (a memory bomb); nothing was allocated."""


# Nesting any real score dump or checkpoint stays far below (mmaction2 dumps: 3 levels).
MAX_DEPTH = 32
# Items reachable from a pickle's top object, counted through shared references, beyond its
# own size in bytes: a real dump costs at least a byte per item.
_ITEM_SLACK = 1 << 20
# Bytes an array constructor may allocate that the stream need not hold itself.
_ALLOC_SLACK = 1 << 20


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
    declared = legacy_storage_bytes(io.BytesIO(bytes(data)))
    if declared > len(data):
        raise OversizeError(
            f"a tensor storage declares {declared} bytes in a {len(data)}-byte record"
        )
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


def _declared_bytes(shape: Any, dtype: Any) -> int:
    """Bytes an array of ``shape`` and ``dtype`` takes, in Python ints (no overflow)."""
    dims = shape if isinstance(shape, tuple | list) else (shape,)
    n = 1
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise CorruptPickleError(f"an array shape of {shape!r}")
        n *= d
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        itemsize = 8
    return n * max(itemsize, 1)


def _bounded_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    # numpy's own pickles always ask for shape (0,) and fill the array from the stream;
    # ndarray.__new__ with any other shape allocates it here, with nothing in the file.
    size = _declared_bytes(shape, dtype)
    if size > _ALLOC_SLACK:
        raise OversizeError(f"an array of {size} bytes declared with no data behind it")
    return _np_core("_reconstruct")(subtype, shape, dtype)


_NP_RECONSTRUCT = _bounded_reconstruct
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


# Element sizes of torch's legacy storage classes (what a legacy record's count is counted in).
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "UntypedStorage": 1,
}


class _Inert:
    """Stands for every global while a legacy record is scanned: calls and builds do nothing."""

    itemsize = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _StorageScanner(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """Reads one pickle of a legacy ``torch.save`` record, running nothing it names, and adds
    up the bytes its storages declare (torch allocates them before reading their data)."""

    def __init__(self, fh: Any) -> None:
        super().__init__(fh)
        self.nbytes = 0

    def find_class(self, module: str, name: str) -> Any:
        itemsize = _STORAGE_ITEMSIZE.get(name, 8)
        return type(name, (_Inert,), {"itemsize": itemsize})

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage class, key, location, element count[, view metadata])
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            count = pid[4]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise CorruptPickleError(f"a tensor storage of {count!r} elements")
            self.nbytes += count * getattr(pid[1], "itemsize", 8)
        return None


# The one storage record torch writes for a tensor in a plain pickle, after its fixed header:
# ("storage", torch.<Type>Storage, key, "cpu", element count, None).
_RECORD = re.compile(
    rb"\x80\x02\(X\x07\x00\x00\x00storageq\x00ctorch\n(?P<type>\w+)\nq\x01X(?P<klen>.{4})",
    re.DOTALL,
)
_CPU = b"q\x02X\x03\x00\x00\x00cpuq\x03"


def _canonical_storage_bytes(blob: bytes) -> int | None:
    """The bytes a storage record in torch's own layout declares, read with ``re`` and
    ``struct`` (the scan below unpickles four small pickles a tensor: 0.3 ms, 13 s for the 40k
    tensors of a Kinetics-size dump); ``None`` for any other layout, which the scan reads."""
    m = _RECORD.search(blob, 0, 2048)
    if m is None or not _is_header(blob[: m.start()]):
        return None
    at = m.end() + struct.unpack("<I", m["klen"])[0]
    if blob[at : at + len(_CPU)] != _CPU:
        return None
    at += len(_CPU)
    op = blob[at : at + 1]
    if op == b"K":
        count, at = blob[at + 1], at + 2
    elif op == b"M":
        count, at = struct.unpack("<H", blob[at + 1 : at + 3])[0], at + 3
    elif op == b"J":
        count, at = struct.unpack("<i", blob[at + 1 : at + 5])[0], at + 5
    elif op == b"\x8a" and at + 2 <= len(blob):
        n = blob[at + 1]
        count, at = int.from_bytes(blob[at + 2 : at + 2 + n], "little", signed=True), at + 2 + n
    else:
        return None
    if blob[at : at + 7] != b"Ntq\x04Q.\x80" or count < 0:
        return None
    return count * _STORAGE_ITEMSIZE.get(m["type"].decode("ascii"), 8)


@functools.cache
def _header_pickles() -> bytes:
    """What torch writes before the storage record on this machine (magic, protocol, sizes)."""
    import torch

    buf = io.BytesIO()
    torch.save(torch.zeros(1).untyped_storage(), buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    return raw[: raw.index(b"\x80\x02(X\x07\x00\x00\x00storage")]


def _is_header(prefix: bytes) -> bool:
    return prefix == _header_pickles()


def legacy_storage_bytes(fh: Any) -> int:
    """Bytes the storages of a legacy (non-zip) ``torch.save`` stream declare; 0 if the stream
    does not read as one (torch's own loader then reports it)."""
    if isinstance(fh, io.BytesIO):
        fast = _canonical_storage_bytes(fh.getbuffer().tobytes()[:4096])
        if fast is not None:
            return fast
    start = fh.tell()
    try:
        for _ in range(3):  # magic number, protocol version, system info
            _StorageScanner(fh).load()
        scan = _StorageScanner(fh)
        scan.load()
        return scan.nbytes
    except (CorruptPickleError, OversizeError):
        raise
    except Exception:
        return 0
    finally:
        fh.seek(start)


# The pure-Python unpickler: the C one sizes its memo table by the largest index a PUT names,
# so ten bytes (LONG_BINPUT 2^30) make it allocate and zero 16 GB; this one keeps a dict.
class _AllowlistUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
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
    with open(path, "rb") as raw:
        # From memory: a length the stream declares (BINBYTES8) then reads at most the file.
        fh = io.BytesIO(raw.read())
        try:
            obj = _AllowlistUnpickler(fh).load()
            _check_reach(obj, size=path.stat().st_size)
            return obj
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{path}: {exc}") from None
        except OversizeError as exc:
            raise OversizeError(f"{path}: {exc}") from None
        except CorruptPickleError as exc:
            raise CorruptPickleError(f"{path}: not a readable pickle ({exc})") from None
        except RecursionError:
            raise CorruptPickleError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
        except MemoryError:
            raise OversizeError(f"{path}: asks for more memory than there is") from None
        except EOFError:
            raise CorruptPickleError(f"{path}: truncated or empty pickle") from None
        except Exception as exc:  # whatever a damaged stream makes the constructors raise
            raise CorruptPickleError(
                f"{path}: not a readable pickle ({_first_line(exc)})"
            ) from None


def _check_reach(obj: Any, size: int) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and more reachable items (shared ones
    counted each time they are reached, as a reader flattening them would) than the file's
    ``size`` in bytes can hold, walking without recursion and stopping at the limit."""
    limit = size + _ITEM_SLACK
    seen = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            raise OversizeError(f"nested deeper than {MAX_DEPTH} levels")
        seen += len(children)
        if seen > limit:
            raise OversizeError(
                f"holds over {limit} items through shared references in {size} bytes"
            )
        stack.extend((c, depth + 1) for c in children)


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


def load_torch(path: str | Path, *, allow_numpy_rng: bool = True, finite: bool = True) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with clean errors.

    ``allow_numpy_rng`` also admits a numpy ``RandomState`` and the arrays/scalars of its
    state (third-party checkpoints save a data sampler's RNG; ours may hold numpy RNG states).
    Before loading, the sizes the file declares are checked against its own size
    (:func:`check_declared_sizes`); with ``finite`` every floating tensor must be finite.
    Raises :class:`UnsafePickleError` naming a refused global, :class:`OversizeError` for
    declared sizes the file cannot hold, and :class:`CorruptCheckpointError` for a truncated
    or damaged file or a non-finite tensor; all name ``path``.
    """
    import torch

    path = Path(path)
    extra = _numpy_rng_globals() if allow_numpy_rng else []
    require_regular_file(path)
    try:
        check_declared_sizes(path)
        with torch.serialization.safe_globals(extra):  # type: ignore[arg-type]
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UnsafePickleError as exc:  # raised by the wrapped constructors above
        raise UnsafePickleError(f"{path}: {exc}") from None
    except OversizeError as exc:
        raise OversizeError(f"{path}: {exc}") from None
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
    except MemoryError:
        raise OversizeError(f"{path}: asks for more memory than there is") from None
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
    if finite:
        bad = first_nonfinite(obj)
        if bad is not None:
            raise CorruptCheckpointError(
                f"{path}: tensor {bad} holds NaN or infinite values (a diverged or damaged "
                "checkpoint: every score computed from it would be NaN)"
            )
    return obj


def check_declared_sizes(path: Path) -> None:
    """Refuse a ``torch.save`` file whose records declare more bytes than the file holds.

    A zip (torch >= 1.6) lists each record's uncompressed size: torch stores records
    uncompressed, so their sum never exceeds the file size, while a deflated record of zeros
    expands a thousandfold. A legacy stream declares each storage's element count before its
    data. Raises :class:`OversizeError` (without the path; the caller adds it).
    """
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, OSError):
            return  # torch's reader reports the damage in its own words
        declared = sum(i.file_size for i in infos)
        if declared > size:
            raise OversizeError(
                f"its records declare {declared} bytes uncompressed in a {size}-byte file "
                "(compressed records: not a torch.save checkpoint)"
            )
        return
    with open(path, "rb") as fh:
        declared = legacy_storage_bytes(fh)
    if declared > size:
        raise OversizeError(f"its tensors declare {declared} bytes in a {size}-byte file")


def first_nonfinite(obj: Any) -> str | None:
    """Where the first floating tensor / array with a NaN or infinity sits in a loaded
    checkpoint (``"model.fc.weight"``), or ``None``; walks without recursion."""
    import torch

    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        where, item, depth = stack.pop()
        if isinstance(item, torch.Tensor):
            floating = item.is_floating_point() or item.is_complex()
            if floating and not bool(torch.isfinite(item).all()):
                return where or "(top level)"
        elif isinstance(item, np.ndarray):
            if item.dtype.kind in "fc" and not bool(np.isfinite(item).all()):
                return where or "(top level)"
        elif depth < MAX_DEPTH and isinstance(item, dict):
            stack.extend(
                (f"{where}.{k}" if where else str(k), v, depth + 1) for k, v in item.items()
            )
        elif depth < MAX_DEPTH and isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(item))
    return None


def _corrupt(path: Path, exc: BaseException) -> str:
    return f"{path}: truncated or corrupt checkpoint ({_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # torch wraps the unpickler's own words in paragraphs of advice; keep only those words.
    text = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0].strip()
    return f"{type(exc).__name__}: {text}"[:200]
