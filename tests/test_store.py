"""The feature store format: shards + index + store.json, readable with numpy and pyarrow."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from avfuse import __version__
from avfuse.melspec import FrontendConfig
from avfuse.store import (
    CorruptStoreError,
    EmbeddingSpec,
    FeatureStore,
    FrontendMismatchError,
    ShardWriter,
    commit_index,
    migrate_meta,
    remove_unreferenced_shards,
    store_problem,
    write_meta,
)


def build(root: Path, dtype: str = "float16", max_mb: float = 0.003) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feats = {f"train/c{i % 3}/v{i:02d}": rng.normal(0, 2, (50 + 37 * i, 8)) for i in range(9)}
    rows = []
    # two writers, as two workers would
    for part, prefix in ((0, "w0"), (1, "w1")):
        w = ShardWriter(root, n_mels=8, dtype=dtype, max_mb=max_mb, prefix=prefix)
        for vid in sorted(feats)[part::2]:
            w.add(vid, feats[vid].astype(np.float32))
        rows += w.close()
    write_meta(root, frontend=FrontendConfig(n_mels=8), classes=["c0", "c1", "c2"], dtype=dtype)
    commit_index(root, rows)
    return feats


def test_round_trip_float32(tmp_path: Path) -> None:
    feats = build(tmp_path, "float32")
    st = FeatureStore(tmp_path)
    assert st.ids == sorted(feats)
    assert st.classes == ["c0", "c1", "c2"] and st.frontend == FrontendConfig(n_mels=8)
    assert st.frontend_hash == FrontendConfig(n_mels=8).hash()
    assert st.meta.avfuse_version == __version__
    for vid, f in feats.items():
        np.testing.assert_array_equal(st[vid], f.astype(np.float32))
        assert st.frames(vid) == len(f)
        np.testing.assert_array_equal(st.window(vid, 7, 20), f[7:27].astype(np.float32))
    np.testing.assert_array_equal(st.frames_array(st.ids[:3]), [len(feats[v]) for v in st.ids[:3]])


def test_float16_on_disk_and_several_shards(tmp_path: Path) -> None:
    feats = build(tmp_path, "float16")
    shards = sorted((tmp_path / "shards").iterdir())
    assert len(shards) > 4  # 0.003 MB shards: ~200 rows of 8 float16
    st = FeatureStore(tmp_path)
    assert st.dtype == np.float16
    for vid, f in feats.items():
        assert st[vid].dtype == np.float16
        np.testing.assert_array_equal(st[vid], f.astype(np.float32).astype(np.float16))


def test_readable_with_numpy_and_pyarrow_alone(tmp_path: Path) -> None:
    feats = build(tmp_path, "float16")
    # Exactly what the README shows, no avfuse import.
    meta = json.loads((tmp_path / "store.json").read_text())
    index = pq.read_table(tmp_path / "index.parquet").to_pandas().set_index("video_id")
    assert meta["dtype"] == "float16" and meta["frontend"]["n_mels"] == 8
    for vid, f in feats.items():
        row = index.loc[vid]
        shard = np.load(tmp_path / "shards" / row.shard, mmap_mode="r")
        assert isinstance(shard, np.memmap) and shard.dtype == np.float16
        window = shard[row.offset + 10 : row.offset + 10 + 30]
        np.testing.assert_array_equal(window, f[10:40].astype(np.float32).astype(np.float16))
        assert row.frames == len(f)


def test_window_bounds_and_unknown_ids(tmp_path: Path) -> None:
    feats = build(tmp_path)
    st = FeatureStore(tmp_path)
    vid = st.ids[0]
    with pytest.raises(IndexError):
        st.window(vid, len(feats[vid]) - 10, 96)
    with pytest.raises(IndexError):
        st.window(vid, -1, 5)
    with pytest.raises(KeyError):
        st["train/nope/x"]
    assert "train/nope/x" not in st and vid in st


def test_check_frontend(tmp_path: Path) -> None:
    build(tmp_path)
    st = FeatureStore(tmp_path)
    have = FrontendConfig(n_mels=8).hash()
    st.check_frontend(have)
    with pytest.raises(FrontendMismatchError, match=have):
        st.check_frontend("ffff", what="checkpoint x.pt")


def test_pickles_without_memory_maps(tmp_path: Path) -> None:
    feats = build(tmp_path)
    st = FeatureStore(tmp_path)
    vid = st.ids[4]
    _ = st[vid]  # opens a map
    clone = pickle.loads(pickle.dumps(st))
    assert all(m is None for m in clone._maps)
    np.testing.assert_array_equal(clone[vid], feats[vid].astype(np.float32).astype(np.float16))


def test_uncommitted_store_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, n_mels=8)
    w.add("a", np.zeros((5, 8)))
    w.close()
    with pytest.raises(FileNotFoundError, match="avfuse features"):
        FeatureStore(tmp_path)


def test_writer_rejects_wrong_shape(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, n_mels=8)
    with pytest.raises(ValueError, match="expected"):
        w.add("a", np.zeros((5, 7)))


def test_unreferenced_shards_are_removed(tmp_path: Path) -> None:
    build(tmp_path)
    orphan = tmp_path / "shards" / "shard-dead-00000.npy"
    np.save(orphan, np.zeros((3, 8), np.float16))
    index = pq.read_table(tmp_path / "index.parquet").to_pandas()
    keep = set(index["shard"])
    assert remove_unreferenced_shards(tmp_path, keep) == 1
    assert not orphan.exists()
    assert {p.name for p in (tmp_path / "shards").iterdir()} == keep


def test_commit_index_last_row_wins(tmp_path: Path) -> None:
    df = commit_index(
        tmp_path,
        [
            {"video_id": "b", "shard": "s1", "offset": 0, "frames": 10},
            {"video_id": "a", "shard": "s1", "offset": 10, "frames": 5},
            {"video_id": "b", "shard": "s2", "offset": 0, "frames": 10},
        ],
    )
    assert df["video_id"].tolist() == ["a", "b"]
    assert df.set_index("video_id").loc["b", "shard"] == "s2"
    assert str(df["offset"].dtype) == "int64"


def test_batched_windows_equal_the_source_rows_across_shards(tmp_path: Path) -> None:
    feats = build(tmp_path, "float32")
    st = FeatureStore(tmp_path)
    assert len({p.name for p in (tmp_path / "shards").iterdir()}) > 2
    rng = np.random.default_rng(1)
    ids = [st.ids[i] for i in rng.integers(0, len(st.ids), 40)]
    starts = [int(rng.integers(0, len(feats[v]) - 20 + 1)) for v in ids]
    got = st.windows(ids, starts, 20)
    assert got.shape == (40, 20, 8) and got.dtype == np.float32
    for k, (vid, s) in enumerate(zip(ids, starts, strict=True)):
        np.testing.assert_array_equal(got[k], feats[vid][s : s + 20].astype(np.float32))
    with pytest.raises(IndexError, match=ids[3]):
        st.windows(ids[:5], [0, 0, 0, len(feats[ids[3]]) - 19, 0], 20)
    # all from one shard: the direct-gather path
    one = st.ids[0]
    np.testing.assert_array_equal(
        st.windows([one] * 3, [0, 5, 9], 20),
        np.stack([feats[one][s : s + 20] for s in (0, 5, 9)]).astype(np.float32),
    )


# --------------------------------------------------------------------------- store.json layouts

# The VGGish front end as version 1 of store.json spelled it (every field then hashed).
V1_VGGISH = {
    "sample_rate": 16000,
    "win_length": 400,
    "hop_length": 160,
    "n_fft": 512,
    "n_mels": 64,
    "fmin": 125.0,
    "fmax": 7500.0,
    "log_offset": 0.01,
    "window": "periodic_hann",
    "spectrum": "magnitude",
    "mel_scale": "htk",
    "example_frames": 96,
}


def _v1_hash(frontend: dict, compact: bool) -> str:
    """The front-end hash version 1 stored: the features stage hashed compact canonical JSON,
    the embed stage ``json.dumps`` with its default separators."""
    text = json.dumps(frontend, sort_keys=True, separators=(",", ":") if compact else None)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_v1_store(root: Path, frontend: dict, n_mels: int, frontend_hash: str) -> np.ndarray:
    """A committed store in the layout of version 1: its store.json spelled out by hand."""
    x = np.arange(30 * n_mels, dtype=np.float32).reshape(30, n_mels)
    w = ShardWriter(root, n_mels=n_mels, dtype="float32")
    w.add("train/c/v0", x)
    commit_index(root, w.close())
    meta = {
        "format": "avfuse-feature-store/1",
        "avfuse_version": "0.9.0",
        "dtype": "float32",
        "n_mels": n_mels,
        "frontend": frontend,
        "frontend_hash": frontend_hash,
        "classes": ["c"],
    }
    (root / "store.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return x


def test_v1_feature_store_reads_as_its_frontend_config_with_the_same_hash(tmp_path: Path) -> None:
    stored = _v1_hash(V1_VGGISH, compact=True)
    x = write_v1_store(tmp_path, V1_VGGISH, 64, stored)
    st = FeatureStore(tmp_path)
    assert st.frontend == FrontendConfig.vggish()
    assert (st.frontend.window_frames, st.frontend.feature_dim) == (96, 64)
    # The hash is the cache key of every stage after features: it must not move.
    assert st.frontend_hash == stored == FrontendConfig.vggish().hash()
    np.testing.assert_array_equal(st.window("train/c/v0", 2, 5), x[2:7])
    # A store rewritten in the current layout keeps that hash.
    write_meta(tmp_path, frontend=st.frontend, classes=st.classes, dtype="float32")
    assert json.loads((tmp_path / "store.json").read_text())["frontend_hash"] == stored


def test_v1_front_end_without_example_frames_held_vggish_examples(tmp_path: Path) -> None:
    write_v1_store(tmp_path, {"n_fft": 512}, 8, "0123456789abcdef")
    st = FeatureStore(tmp_path)
    assert st.frontend == FrontendConfig(n_mels=8, example_frames=96)
    assert st.frontend_hash == "0123456789abcdef"  # what the store states, never recomputed
    assert migrate_meta(json.loads((tmp_path / "store.json").read_text())) == {
        "format": "avfuse-feature-store/2",
        "avfuse_version": "0.9.0",
        "dtype": "float32",
        "kind": "logmel",
        "frontend": {"n_fft": 512, "n_mels": 8, "example_frames": 96},
        "frontend_hash": "0123456789abcdef",
        "classes": ["c"],
    }


V1_EMBEDDING = {
    "name": "embedding",
    "model": "cnn10",
    "width": 0.125,
    "init_sha256": "ab" * 32,
    "window": 96,
    "hop": 48,
    "per_window": True,
    "features_frontend_hash": "0123456789abcdef",
    "n_mels": 64,
    "example_frames": 1,
}
SPEC = EmbeddingSpec(
    model="cnn10",
    dim=64,
    init_sha256="ab" * 32,
    window=96,
    hop=48,
    per_window=True,
    source_frontend_hash="0123456789abcdef",
    width=0.125,
)


def test_v1_embedding_store_reads_as_an_embedding_spec(tmp_path: Path) -> None:
    stored = _v1_hash(V1_EMBEDDING, compact=False)
    write_v1_store(tmp_path, V1_EMBEDDING, 64, stored)
    st = FeatureStore(tmp_path)
    assert st.frontend == SPEC and st.frontend_hash == stored == SPEC.hash()
    assert (st.frontend.window_frames, st.frontend.feature_dim, st.feature_dim) == (1, 64, 64)


def test_embedding_store_is_written_as_a_spec_not_a_front_end(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, n_mels=64, dtype="float32")
    w.add("v", np.ones((3, 64)))
    commit_index(tmp_path, w.close())
    write_meta(tmp_path, frontend=SPEC, classes=["c"], dtype="float32")
    meta = json.loads((tmp_path / "store.json").read_text())
    assert meta["format"] == "avfuse-feature-store/2" and meta["kind"] == "embedding"
    assert "n_mels" not in meta and "n_mels" not in meta["frontend"]
    assert meta["frontend"]["dim"] == 64
    # Embeddings made before the layout changed keep their hash: no recomputation.
    assert meta["frontend_hash"] == _v1_hash(V1_EMBEDDING, compact=False)
    assert FeatureStore(tmp_path).frontend == SPEC


@pytest.mark.parametrize(
    "change",
    [
        {"format": "avfuse-feature-store/3"},
        {"format": "something-else/2"},
        {"kind": "waveform"},
        {"dtype": "object"},
        {"format": "avfuse-feature-store/0"},
        {"dtype": "V0"},
        {"frontend": {"n_mels": 8, "mel_scale": "bark"}},
    ],
)
def test_unusable_store_json_is_named(tmp_path: Path, change: dict) -> None:
    build(tmp_path)
    meta = json.loads((tmp_path / "store.json").read_text())
    (tmp_path / "store.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CorruptStoreError, match=r"store\.json: unusable") as info:
        FeatureStore(tmp_path)
    assert "avfuse features" in str(info.value)
    if "format" in change:  # the message names the layout it cannot read
        assert change["format"] in str(info.value)
    assert "store.json: unusable" in store_problem(tmp_path)


def test_deeply_nested_json_in_a_store_is_one_line(tmp_path: Path) -> None:
    from avfuse.store import CorruptStoreError

    root = tmp_path / "w" / "features"
    root.mkdir(parents=True)
    (root / "store.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "index.parquet").write_bytes(b"x")
    with pytest.raises(CorruptStoreError, match="nested too deeply") as info:
        FeatureStore(root)
    assert str(root / "store.json") in str(info.value)


def test_store_pickles_as_its_path_and_reopens(store_work) -> None:
    from avfuse.store import FeatureStore

    work, man = store_work
    store = FeatureStore(work / "features")
    assert len(store) == len(man) == 320
    blob = pickle.dumps(store)
    # The look-up table stays behind: the pickle does not grow with the number of videos.
    assert len(blob) < 1024
    again = pickle.loads(blob)
    assert again.ids == store.ids
    for vid in store.ids[::37]:
        np.testing.assert_array_equal(again[vid], store[vid])


@pytest.mark.parametrize("name", ["../outside.npy", "{tmp}/outside.npy", "sub/x.npy", "shard"])
def test_index_shard_names_outside_shards_are_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "features"
    build(root)
    name = name.format(tmp=tmp_path)
    index = pq.read_table(root / "index.parquet").to_pandas()
    first = str(index["shard"].iloc[0])
    # A complete shard planted where the odd name leads: reading it would otherwise succeed.
    target = root / "shards" / name  # an absolute name replaces the folder
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((root / "shards" / first).read_bytes())
    index.loc[index["shard"] == first, "shard"] = name
    commit_index(root, index.to_dict("records"))
    with pytest.raises(CorruptStoreError, match="not a file name in shards/") as info:
        FeatureStore(root)
    assert info.value.shards == [name]
    assert "not a file name in shards/" in store_problem(root)
