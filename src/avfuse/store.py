"""The feature store: full-length log-mel sequences in a few large shards plus one index.

On disk (``WORK/features/``)::

    store.json               format, dtype, kind, front end and its hash, class list, version
    index.parquet            video_id, shard, offset, frames   (committed index)
    shards/shard-XXXXX.npy   2-D array (rows, n_mels), rows of many videos back to back

``store.json`` names what made the rows: ``kind = "logmel"`` with the
:class:`~avfuse.melspec.FrontendConfig` of a feature store, or ``kind = "embedding"`` with the
:class:`EmbeddingSpec` of an embedding store (``WORK/embeddings/NAME``, rows of ``dim`` values
per window). :attr:`FeatureStore.frontend` returns that record; both kinds answer
``window_frames`` (rows per model example) and ``feature_dim`` (values per row). A store.json
of an older layout is brought to the current one by :func:`migrate_meta` when it is read.

A video's features are rows ``offset : offset + frames`` of its shard. Shards are plain ``.npy``
files, so reading needs numpy alone::

    import json, numpy as np, pyarrow.parquet as pq
    meta = json.load(open("features/store.json"))
    index = pq.read_table("features/index.parquet").to_pandas().set_index("video_id")
    row = index.loc["val/abseiling/ZzW2b8ZfnHM_000060_000070"]
    shard = np.load(f"features/shards/{row.shard}", mmap_mode="r")
    window = shard[row.offset + 10 : row.offset + 10 + 96]      # one 96 x 64 example

Writers (one per worker batch) each write whole shards under a unique name and return index
rows; only the final commit (``commit_index``) makes them visible, so a killed run leaves at most
unreferenced shard files, which a rerun removes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from avfuse import __version__
from avfuse.config import Config, from_dict, to_dict
from avfuse.io import (
    DiskFullError,
    atomic_write,
    check_inside_work,
    read_json,
    read_table,
    write_json,
    write_table,
)
from avfuse.melspec import FrontendConfig
from avfuse.workdir import StoreLayout

# store.json's layout: version 1 held a front-end dict and ``n_mels`` (an embedding store a
# made-up front end whose ``n_mels`` was the embedding size); version 2 names its ``kind``.
FORMAT_NAME = "avfuse-feature-store"
VERSION = 2
FORMAT = f"{FORMAT_NAME}/{VERSION}"
# The dtypes a store's rows are written in; store.json is read from disk, and another dtype
# (an object, a zero-size void) would reach the memory maps and the row arithmetic.
STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbeddingSpec(Config):
    """What the rows of an embedding store are: ``dim`` values of network ``model``'s
    embedding layer per window of ``window`` rows, every ``hop`` rows, of the feature store
    whose front end hashes to ``source_frontend_hash``.

    A row is one window's embedding (``per_window``) or the mean over a video's windows, so a
    model example is one row (:attr:`window_frames` = 1) of :attr:`feature_dim` = ``dim``.
    """

    model: str = field(metadata={"help": "network whose embedding layer made the rows"})
    dim: int = field(metadata={"help": "embedding size: values per row", "min": 1})
    init_sha256: str = field(metadata={"help": "sha256 of the weights (file or model folder)"})
    window: int = field(metadata={"help": "feature-store frames per embedded window", "min": 1})
    hop: int = field(metadata={"help": "feature-store frames between windows", "min": 1})
    per_window: bool = field(metadata={"help": "a row per window, or one (their mean) per video"})
    source_frontend_hash: str = field(metadata={"help": "front-end hash of the feature store"})
    width: float = field(default=1.0, metadata={"help": "the network's width multiplier"})

    @property
    def window_frames(self) -> int:
        """Rows per model example: one embedding."""
        return 1

    @property
    def feature_dim(self) -> int:
        """Values per row: the embedding size."""
        return self.dim

    def silence_value(self) -> float:
        """The value a row is padded with: rows are never shorter than one example (a video
        has at least one embedding), so only a head of longer windows would pad; zeros, the
        embedding space's origin."""
        return 0.0

    def hash(self) -> str:
        """Stable hash of the settings, in the layout the first embedding stores were hashed
        in: it is the cache key of the stores and heads already made from them."""
        legacy = {
            "name": "embedding",
            "model": self.model,
            "width": float(self.width),
            "init_sha256": self.init_sha256,
            "window": self.window,
            "hop": self.hop,
            "per_window": self.per_window,
            "features_frontend_hash": self.source_frontend_hash,
            "n_mels": self.dim,
            "example_frames": 1,
        }
        return hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


StoreFrontend = FrontendConfig | EmbeddingSpec
StoreKind = Literal["logmel", "embedding"]


def frontend_kind(frontend: StoreFrontend) -> StoreKind:
    return "embedding" if isinstance(frontend, EmbeddingSpec) else "logmel"


def frontend_from_dict(kind: str, data: Mapping[str, Any]) -> StoreFrontend:
    """The record of ``kind`` (``logmel`` / ``embedding``) from its current-layout dict."""
    if kind == "logmel":
        return from_dict(FrontendConfig, dict(data), "frontend")
    if kind == "embedding":
        return from_dict(EmbeddingSpec, dict(data), "frontend")
    raise ValueError(f"unknown store kind {kind!r}; known: logmel, embedding")


def frontend_from_v1(data: Mapping[str, Any], n_mels: int | None = None) -> dict[str, Any]:
    """``{"kind": ..., "frontend": dict}`` of the current layout from a version-1 front end.

    Version 1 wrote an embedding store's settings as a front end named ``embedding`` whose
    ``n_mels`` was the embedding size. ``n_mels``: the store's row width, which version 1
    kept beside the front end (a front end that omits it has that many bands).
    """
    fe = dict(data)
    if fe.get("name") == "embedding":
        return {
            "kind": "embedding",
            "frontend": {
                "model": fe["model"],
                "dim": fe["n_mels"],
                "init_sha256": fe["init_sha256"],
                "window": fe["window"],
                "hop": fe["hop"],
                "per_window": fe["per_window"],
                "source_frontend_hash": fe["features_frontend_hash"],
                "width": fe["width"],
            },
        }
    if n_mels is not None:
        fe.setdefault("n_mels", n_mels)
    # Every store made by ``avfuse features`` states ``example_frames``; one that does not
    # holds examples of the VGGish front end it was written for: 96 frames.
    fe.setdefault("example_frames", 96)
    return {"kind": "logmel", "frontend": fe}


def _v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    n_mels = meta.pop("n_mels", None)
    meta.update(frontend_from_v1(meta["frontend"], None if n_mels is None else int(n_mels)))
    meta["format"] = f"{FORMAT_NAME}/2"
    return meta


# version -> the step that brings a store.json of that version to the next.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def meta_version(meta: Mapping[str, Any]) -> int:
    """The layout version of a store.json (``format = "avfuse-feature-store/N"``)."""
    fmt = meta.get("format")
    name, _, number = str(fmt).rpartition("/")
    if name != FORMAT_NAME or not number.isdigit():
        raise ValueError(f"format {fmt!r} is not {FORMAT_NAME}/N")
    version = int(number)
    if version < min(_MIGRATIONS, default=VERSION):
        raise ValueError(f"format {fmt!r} is older than any layout this avfuse reads")
    if version > VERSION:
        raise ValueError(f"format {fmt!r} is newer than this avfuse reads ({FORMAT})")
    return version


def migrate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A store.json of any version this code reads, in the current layout (a new dict)."""
    out = dict(meta)
    version = meta_version(out)
    while version < VERSION:
        out = _MIGRATIONS[version](out)
        version += 1
    return out


@dataclass(frozen=True)
class StoreMeta:
    """store.json, read: the record of what made the rows and what a store holds."""

    dtype: str
    frontend: StoreFrontend
    frontend_hash: str
    classes: tuple[str, ...]
    avfuse_version: str = ""

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> StoreMeta:
        """Parse a store.json of any readable version (migrated first)."""
        data = migrate_meta(meta)
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes is not a list of names")
        dtype = str(np.dtype(data["dtype"]))
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        return cls(
            dtype=dtype,
            frontend=frontend_from_dict(str(data["kind"]), data["frontend"]),
            frontend_hash=str(data["frontend_hash"]),
            classes=tuple(classes),
            avfuse_version=str(data.get("avfuse_version", "")),
        )


class FrontendMismatchError(ValueError):
    pass


class CorruptStoreError(ValueError):
    """A shard file is shorter than the index says (or unreadable); ``shards`` names them."""

    def __init__(self, message: str, shards: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.shards = list(shards)


def shard_problem(path: str | Path, rows: int, n_mels: int, dtype: Any) -> str:
    """Why shard ``path`` cannot hold ``rows`` rows of ``n_mels`` ``dtype`` values ("" if fine).

    Reads only the ``.npy`` header and the file size: the data must be exactly header +
    shape[0] * shape[1] * itemsize bytes (np.save's layout), with ``rows <= shape[0]``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, have = read_header(fh)
            data_at = fh.tell()
    except (OSError, ValueError) as exc:
        return f"unreadable .npy header ({type(exc).__name__}: {exc})"
    if len(shape) != 2 or shape[1] != n_mels or fortran or np.dtype(have) != np.dtype(dtype):
        return f"holds {have} {shape}, expected {np.dtype(dtype)} (rows, {n_mels})"
    want = data_at + int(shape[0]) * int(shape[1]) * np.dtype(have).itemsize
    if size != want:
        return f"{size} bytes, its header says {want} (truncated or damaged)"
    if rows > shape[0]:
        return f"{shape[0]} rows, the index refers to {rows}"
    return ""


def check_shards(
    root: str | Path, rows: Mapping[str, int], n_mels: int, dtype: Any
) -> dict[str, str]:
    """``{shard name: problem}`` for the shards of ``root`` that cannot serve ``rows``.

    ``rows``: shard name -> rows the index needs from it (max ``offset + frames``).
    """
    shard_dir = StoreLayout(root).shards
    out = {}
    for name, n in rows.items():
        # The index is read from disk: a name that is not a plain file name would open a
        # file outside shards/.
        if not StoreLayout.is_shard_name(name):
            why = "not a file name in shards/"
        else:
            why = shard_problem(shard_dir / name, int(n), n_mels, dtype)
        if why:
            out[name] = why
    return out


def rebuild_command(root: str | Path) -> str:
    """The command that rewrites the store at ``root``: ``avfuse embed`` for the embeddings of
    ``WORK/embeddings/NAME``, ``avfuse features`` for ``WORK/features``."""
    root = Path(root)
    return "avfuse embed" if root.parent.name == "embeddings" else "avfuse features"


def read_committed(root: str | Path) -> tuple[StoreMeta, pd.DataFrame]:
    """``store.json`` (parsed, of any readable version) and ``index.parquet`` of the store at
    ``root``.

    Raises ``FileNotFoundError`` when either is missing and :class:`CorruptStoreError` naming
    the file when it cannot be read, each saying which command rebuilds it.
    """
    root = Path(root)
    fix = rebuild_command(root)
    if not StoreLayout(root).meta.exists() or not StoreLayout(root).index.exists():
        what = "embedding store" if fix == "avfuse embed" else "feature store"
        raise FileNotFoundError(f"{root} is not a committed {what} (run `{fix}` first)")
    meta = read_meta(root)
    try:
        index = read_table(StoreLayout(root).index)
        missing = {"video_id", "shard", "offset", "frames"} - set(index.columns)
        if missing:
            raise ValueError(f"no column(s) {', '.join(sorted(missing))}")
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CorruptStoreError(
            f"{StoreLayout(root).index}: unreadable ({_reason(exc)}); run `{fix}` again to rebuild it"
        ) from None
    return meta, index


def read_meta(root: str | Path) -> StoreMeta:
    """The parsed ``store.json`` of the store at ``root``; :class:`CorruptStoreError` naming
    the file (and the command that rewrites it) when it cannot be read or parsed."""
    root = Path(root)
    try:
        raw = read_json(StoreLayout(root).meta)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise CorruptStoreError(
            f"{StoreLayout(root).meta}: unreadable ({_reason(exc)}); "
            f"run `{rebuild_command(root)}` again to rewrite it"
        ) from None
    try:
        return StoreMeta.from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(
            f"{StoreLayout(root).meta}: unusable ({_reason(exc)}); "
            f"run `{rebuild_command(root)}` again to rewrite it"
        ) from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def store_problem(root: str | Path) -> str:
    """Why the committed store at ``root`` cannot serve its index ("" when it can): a missing
    or unreadable ``store.json`` / ``index.parquet``, or a shard shorter than the index needs.
    Reads the index and the shards' headers only (cheap: a done check)."""
    try:
        meta, index = read_committed(root)
    except (FileNotFoundError, CorruptStoreError) as exc:
        return str(exc)
    bad = check_shards(root, needed_rows(index), meta.frontend.feature_dim, meta.dtype)
    if bad:
        name, why = next(iter(sorted(bad.items())))
        return (
            f"shard {StoreLayout(root).shard(name)}: {why}; run `{rebuild_command(root)}` again "
            "to recompute its videos"
        )
    return ""


def store_stamp(root: str | Path) -> list[Any]:
    """What identifies the contents of the store at ``root`` for a cache key: its front-end
    hash (for embeddings: network, weights' sha256, windows) and its index file's size and
    mtime (a resumed or repaired store has another index). Empty for a missing store."""
    root = Path(root)
    try:
        meta = read_json(StoreLayout(root).meta)
        st = StoreLayout(root).index.stat()
    except (OSError, ValueError):
        return []
    fh = meta.get("frontend_hash") if isinstance(meta, dict) else None
    return [str(fh), st.st_size, st.st_mtime_ns]


def needed_rows(index: pd.DataFrame) -> dict[str, int]:
    """Shard name -> rows an index (``shard, offset, frames`` columns) reads from it."""
    if not len(index):
        return {}
    end = index["offset"].astype("int64") + index["frames"].astype("int64")
    return {str(k): int(v) for k, v in end.groupby(index["shard"].astype(str)).max().items()}


class ShardWriter:
    """Accumulates feature matrices and writes them as one or more shards of ~``max_mb``."""

    def __init__(
        self,
        root: str | Path,
        n_mels: int,
        dtype: str = "float16",
        max_mb: float = 256,
        prefix: str | None = None,
    ) -> None:
        self.dir = StoreLayout(root).shards
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_mels = n_mels
        self.dtype = np.dtype(dtype)
        self.max_rows = max(1, int(max_mb * 2**20 / (n_mels * self.dtype.itemsize)))
        self.prefix = prefix or uuid.uuid4().hex[:12]
        self._buf: list[tuple[str, np.ndarray]] = []
        self._rows = 0
        self._count = 0
        self.index_rows: list[dict[str, Any]] = []

    def add(self, video_id: str, feats: np.ndarray) -> None:
        """Queue ``feats`` of shape (frames, n_mels) for ``video_id``."""
        if feats.ndim != 2 or feats.shape[1] != self.n_mels:
            raise ValueError(
                f"{video_id}: features of shape {feats.shape}, expected (T, {self.n_mels})"
            )
        self._buf.append((video_id, feats.astype(self.dtype, copy=False)))
        self._rows += len(feats)
        if self._rows >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        name = StoreLayout.shard_name(self.prefix, self._count)
        offset = 0
        for vid, f in self._buf:
            self.index_rows.append(
                {"video_id": vid, "shard": name, "offset": offset, "frames": len(f)}
            )
            offset += len(f)
        data = np.concatenate([f for _, f in self._buf], axis=0)
        try:
            with atomic_write(self.dir / name) as tmp, open(tmp, "wb") as fh:
                np.save(fh, data)
        except OSError as exc:
            # numpy reports a short write as "N requested and M written", without an errno:
            # on a regular file that is a full device or quota.
            if not isinstance(exc, DiskFullError) and "requested and" in str(exc):
                raise DiskFullError(self.dir, f"a shard write stopped short: {exc}") from exc
            raise
        self._buf, self._rows = [], 0
        self._count += 1

    def close(self) -> list[dict[str, Any]]:
        """Write what is queued; return the index rows of everything this writer wrote."""
        self.flush()
        return self.index_rows


def write_meta(
    root: str | Path, *, frontend: StoreFrontend, classes: Sequence[str], dtype: str
) -> None:
    """Write ``store.json``: what made the rows (``frontend``, and its hash) and the classes."""
    write_json(
        StoreLayout(root).meta,
        {
            "format": FORMAT,
            "avfuse_version": __version__,
            "dtype": str(np.dtype(dtype)),
            "kind": frontend_kind(frontend),
            "frontend": frontend.to_dict(),
            "frontend_hash": frontend.hash(),
            "classes": list(classes),
        },
    )


def commit_index(
    root: str | Path, rows: Iterable[Mapping[str, Any]] | pd.DataFrame
) -> pd.DataFrame:
    """Atomically replace the committed index with ``rows`` (records or a DataFrame of
    ``video_id, shard, offset, frames``), sorted by video_id."""
    cols = ["video_id", "shard", "offset", "frames"]
    df = rows[cols] if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=cols)
    df = df.drop_duplicates("video_id", keep="last").sort_values("video_id").reset_index(drop=True)
    df["offset"] = df["offset"].astype("int64")
    df["frames"] = df["frames"].astype("int64")
    write_table(df, StoreLayout(root).index)
    return df


def remove_unreferenced_shards(root: str | Path, keep: set[str]) -> int:
    n = 0
    shard_dir = StoreLayout(root).shards
    if shard_dir.exists():
        check_inside_work(shard_dir, folder=True)  # never delete through a link out of WORK
        for p in shard_dir.iterdir():
            if p.name not in keep:
                p.unlink()
                n += 1
    return n


class FeatureStore:
    """Read-only view of a committed store; every access is a slice of a memory map.

    ``store[video_id]`` -> (frames, n_mels) array (a view, no copy).
    ``store.window(video_id, start, length)`` -> (length, n_mels).
    Memory maps are opened lazily per process, so a store object can be pickled into
    DataLoader workers.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta, index = read_committed(self.root)
        self.ids: list[str] = index["video_id"].astype(str).tolist()
        self._shard_names: list[str] = sorted(set(index["shard"]))
        sid = {n: i for i, n in enumerate(self._shard_names)}
        # video_id -> (shard number, offset, frames), the one look-up table. Plain Python ints:
        # numpy scalar indexing and arithmetic would cost more than the memory-map slice itself
        # on the hot path of a training loader.
        self._loc: dict[str, tuple[int, int, int]] = {
            v: (sid[s], int(o), int(f))
            for v, s, o, f in zip(
                self.ids,
                index["shard"].tolist(),
                index["offset"].tolist(),
                index["frames"].tolist(),
                strict=True,
            )
        }
        self._maps: list[np.ndarray | None] = [None] * len(self._shard_names)
        # A truncated shard would only fail (or read garbage) deep inside a training loop.
        bad = check_shards(self.root, needed_rows(index), self.feature_dim, self.dtype)
        if bad:
            name, why = next(iter(sorted(bad.items())))
            raise CorruptStoreError(
                f"feature store {self.root}: shard {StoreLayout(self.root).shard(name)}: {why}"
                + (f" (and {len(bad) - 1} more shard(s))" if len(bad) > 1 else "")
                + f"; run `{rebuild_command(self.root)}` again to recompute the affected videos",
                sorted(bad),
            )

    def __getstate__(self) -> dict[str, Any]:
        # Only the path (and a stamp of the committed index): each DataLoader worker reopens
        # the store itself instead of receiving the whole look-up table (~30 MB at 420k videos).
        st = StoreLayout(self.root).index.stat()
        return {"root": str(self.root), "index_stamp": (st.st_size, st.st_mtime_ns)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]
        st = StoreLayout(self.root).index.stat()
        if (st.st_size, st.st_mtime_ns) != tuple(state["index_stamp"]):
            raise RuntimeError(
                f"{StoreLayout(self.root).index} was recommitted after this store was opened: reopen it"
            )

    def blocks(self, ids: Iterable[str], block_mb: float = 1.0) -> np.ndarray:
        """``(n,)`` int64: which ``block_mb`` piece of which shard each video starts in.

        Videos with equal numbers sit next to each other on disk, so reading them together is
        served by one read-ahead; a sampler uses this to keep its working set in the page cache.
        """
        row_bytes = self.feature_dim * self.dtype.itemsize
        rows = max(1, int(block_mb * 2**20 // row_bytes))
        return np.asarray(
            [(self._loc[v][0] << 32) | (self._loc[v][1] // rows) for v in ids], dtype=np.int64
        )

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def frontend_hash(self) -> str:
        """The hash store.json states (the one its rows were computed under)."""
        return self.meta.frontend_hash

    @property
    def frontend(self) -> StoreFrontend:
        """What made the rows: a :class:`~avfuse.melspec.FrontendConfig` (log-mel) or an
        :class:`EmbeddingSpec`; ``window_frames`` and ``feature_dim`` size a model's input."""
        return self.meta.frontend

    @property
    def feature_dim(self) -> int:
        """Values per row (mel bands or embedding size)."""
        return self.meta.frontend.feature_dim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta.dtype)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._loc

    def frames(self, video_id: str) -> int:
        return self._loc[video_id][2]

    def frames_array(self, ids: Iterable[str]) -> np.ndarray:
        return np.asarray([self._loc[v][2] for v in ids], dtype=np.int64)

    def _map(self, shard: int) -> np.ndarray:
        m = self._maps[shard]
        if m is None:
            mapped = np.load(StoreLayout(self.root).shard(self._shard_names[shard]), mmap_mode="r")
            # A plain ndarray over the mapping (it keeps the map alive): slicing an np.memmap
            # runs its Python __array_finalize__, a third of a window read's time.
            m = mapped.view(np.ndarray)
            self._maps[shard] = m
        return m

    def __getitem__(self, video_id: str) -> np.ndarray:
        shard, o, n = self._loc[video_id]
        return self._map(shard)[o : o + n]

    def window(self, video_id: str, start: int, length: int) -> np.ndarray:
        shard, o, n = self._loc[video_id]
        if start < 0 or start + length > n:
            raise IndexError(f"{video_id}: window [{start}, {start + length}) outside {n} frames")
        m = self._maps[shard]
        if m is None:
            m = self._map(shard)
        return m[o + start : o + start + length]

    def windows(
        self,
        video_ids: Sequence[str],
        starts: Sequence[int] | np.ndarray,
        length: int,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Many windows at once: ``(n,)`` ids and starts -> ``(n, length, n_mels)``.

        One fancy-indexing gather per shard touched instead of a Python call per window: the
        fast path for a loader that reads whole batches.
        """
        n = len(video_ids)
        locs = [self._loc[v] for v in video_ids]
        shard = np.fromiter((loc[0] for loc in locs), np.int64, n)
        offset = np.fromiter((loc[1] for loc in locs), np.int64, n)
        frames = np.fromiter((loc[2] for loc in locs), np.int64, n)
        start = np.asarray(starts, dtype=np.int64)
        bad = (start < 0) | (start + length > frames)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise IndexError(
                f"{video_ids[i]}: window [{start[i]}, {start[i] + length}) outside {frames[i]} frames"
            )
        if out is None:
            out = np.empty((n, length, self.feature_dim), dtype=self.dtype)
        rows = (offset + start)[:, None] + np.arange(length)
        first = int(shard[0]) if n else 0
        if n and (shard == first).all():
            # The common case (shards of hundreds of MB): gather straight into ``out``.
            np.take(self._map(first), rows, axis=0, out=out)
            return out
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._map(int(s))[rows[sel]]
        return out

    def check_frontend(self, expected_hash: str, what: str = "the model") -> None:
        """Refuse to mix features of different front ends."""
        if expected_hash != self.frontend_hash:
            raise FrontendMismatchError(
                f"feature store {self.root} was computed with front end {self.frontend_hash}, "
                f"but {what} expects {expected_hash}; recompute the features with the model's "
                "front-end settings or use a matching model"
            )
