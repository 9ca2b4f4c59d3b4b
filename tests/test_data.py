"""Datasets and samplers over the feature store: windows, coverage, sharding, normalisation,
short-clip padding, block sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from avfuse.data import (
    EvalWindows,
    NormStats,
    TrainWindowSampler,
    WindowDataset,
    compute_norm_stats,
    eval_windows,
    pad_window,
)
from avfuse.melspec import FrontendConfig
from avfuse.store import FeatureStore, ShardWriter, commit_index, write_meta
from tests.synthetic import make_synthetic_work


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    w = tmp_path_factory.mktemp("work")
    make_synthetic_work(w, n_classes=4, videos_per_class=3, frames_range=(100, 300), seed=1)
    return w


def test_norm_stats_match_numpy(work) -> None:
    store = FeatureStore(work / "features")
    ids = [v for v in store.ids if v.startswith("train/")]
    stats = compute_norm_stats(store, ids)
    allx = np.concatenate([np.asarray(store[v], np.float64) for v in ids])
    np.testing.assert_allclose(stats.mean, allx.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.std, allx.std(0), rtol=1e-4, atol=1e-4)
    # A subsample of videos is a subset: statistics differ but stay finite and positive.
    sub = compute_norm_stats(store, ids, max_videos=3, seed=0)
    assert np.all(sub.std > 0) and not np.allclose(sub.mean, stats.mean)


def test_window_dataset_normalises_the_stored_window(work) -> None:
    store = FeatureStore(work / "features")
    ids = store.ids[:3]
    norm = NormStats(np.full(64, 2.0, np.float32), np.full(64, 4.0, np.float32))
    ds = WindowDataset(store, ids, [0, 1, 2], norm, window=store.frontend.window_frames)
    x, label, pos = ds[(1, 5)]
    raw = np.asarray(store[ids[1]], np.float32)[5:101]
    np.testing.assert_allclose(x.numpy(), (raw - 2.0) / 4.0, rtol=1e-6)
    assert (label, pos) == (1, 1) and x.shape == (96, 64) and x.dtype == torch.float32


def test_short_video_is_repeat_padded(tmp_path) -> None:
    w = ShardWriter(tmp_path, n_mels=4, dtype="float32")
    x = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    w.add("a", x)
    write_meta(tmp_path, frontend=FrontendConfig(n_mels=4), classes=["c"], dtype="float32")
    commit_index(tmp_path, w.close())
    store = FeatureStore(tmp_path)
    ds = WindowDataset(
        store, ["a"], [0], NormStats(np.zeros(4, np.float32), np.ones(4, np.float32)), window=96
    )
    out, _, _ = ds[(0, 0)]
    np.testing.assert_array_equal(out.numpy(), np.concatenate([x, x, x])[:96])
    assert eval_windows(np.array([40]), hop=96, window=96).tolist() == [[0, 0]]


def test_batch_path_pads_short_clips_by_the_dataset_policy(tmp_path) -> None:
    # The DataLoader calls __getitems__ for whole batches: it must pad as __getitem__ does.
    w = ShardWriter(tmp_path, n_mels=4, dtype="float32")
    short = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    w.add("a", short)
    w.add("b", np.ones((120, 4), np.float32))
    write_meta(tmp_path, frontend=FrontendConfig(n_mels=4), classes=["c"], dtype="float32")
    commit_index(tmp_path, w.close())
    store = FeatureStore(tmp_path)
    identity = NormStats(np.zeros(4, np.float32), np.ones(4, np.float32))
    ds = WindowDataset(
        store, ["a", "b"], [0, 0], identity, window=96, short_clips="zeros", raw=True
    )
    batch = ds.__getitems__([(0, 0), (1, 3)])
    single = ds[(0, 0)][0].numpy()
    np.testing.assert_array_equal(batch[0][0].numpy(), single)
    np.testing.assert_array_equal(single[:40], short)
    # zeros: the 56 frames after the clip are one constant (the front end's silence), not a loop
    assert np.unique(single[40:]).size == 1 and single[40, 0] != short[0, 0]
    np.testing.assert_array_equal(batch[1][0].numpy(), np.ones((96, 4), np.float32))


def test_train_sampler_covers_every_frame_and_stays_in_bounds() -> None:
    frames = np.array([96, 150, 400, 1000])
    s = TrainWindowSampler(frames, windows_per_video=20, window=96, seed=3)
    covered = [np.zeros(t, bool) for t in frames]
    for epoch in range(10):
        s.set_epoch(epoch)
        items = list(s)
        assert len(items) == len(frames) * 20
        # each video exactly windows_per_video times per epoch
        assert np.bincount([v for v, _ in items]).tolist() == [20] * 4
        for v, start in items:
            assert 0 <= start <= frames[v] - 96
            covered[v][start : start + 96] = True
    assert all(c.all() for c in covered)


def test_train_sampler_is_deterministic_and_skips_for_resume() -> None:
    frames = np.array([200, 300, 500])
    a = TrainWindowSampler(frames, windows_per_video=4, window=96, seed=7)
    b = TrainWindowSampler(frames, windows_per_video=4, window=96, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    assert full == list(b)
    b.set_epoch(3)
    assert list(b) != full
    a.set_epoch(2, skip=5)
    assert list(a) == full[5:] and len(a) == len(full) - 5


def test_train_sampler_shards_are_disjoint_and_complete() -> None:
    frames = np.arange(100, 111) * 3  # 11 videos, odd count
    whole = TrainWindowSampler(frames, windows_per_video=3, window=96, seed=1)
    whole.set_epoch(4)
    ref = whole.epoch_items()
    shards = []
    for r in range(2):
        s = TrainWindowSampler(frames, windows_per_video=3, window=96, seed=1, rank=r, world_size=2)
        s.set_epoch(4)
        shards.append(s.epoch_items())
    assert len(shards[0]) == len(shards[1]) == 16  # 33 truncated to 32, equal steps per rank
    merged = np.empty((32, 2), np.int64)
    merged[0::2], merged[1::2] = shards[0], shards[1]
    np.testing.assert_array_equal(merged, ref[:32])


def test_balanced_sampler_equalises_classes() -> None:
    labels = np.array([0] * 30 + [1] * 5 + [2] * 5)
    s = TrainWindowSampler(
        np.full(40, 200), labels, windows_per_video=30, window=96, balanced=True, seed=0
    )
    counts = np.bincount(labels[[v for v, _ in s]], minlength=3)
    assert counts.sum() == 1200
    assert np.all(np.abs(counts / 1200 - 1 / 3) < 0.05), counts


def test_eval_windows_hop_and_coverage() -> None:
    items = eval_windows(np.array([250, 96, 400]), hop=96, window=96)
    assert items.tolist() == [[0, 0], [0, 96], [1, 0], [2, 0], [2, 96], [2, 192], [2, 288]]
    over = eval_windows(np.array([250]), hop=48, window=96)
    assert over[:, 1].tolist() == [0, 48, 96, 144]
    for t in (96, 191, 192, 500):
        starts = eval_windows(np.array([t]), hop=96, window=96)[:, 1]
        cov = np.zeros(t, bool)
        for s in starts:
            cov[s : s + 96] = True
        assert cov.sum() == (t // 96) * 96 and cov[: (t // 96) * 96].all()


def test_dataloader_workers_give_the_same_batches(work) -> None:
    store = FeatureStore(work / "features")
    ids = store.ids
    norm = compute_norm_stats(store, ids)
    ds = WindowDataset(store, ids, np.arange(len(ids)) % 4, norm, window=96)
    sampler = TrainWindowSampler(ds.frames, windows_per_video=2, window=96, seed=0)
    batches = {}
    for nw in (0, 2):
        sampler.set_epoch(1)
        dl = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=nw)  # type: ignore[arg-type]
        batches[nw] = [(x.clone(), pos.clone()) for x, _, pos in dl]
    assert len(batches[0]) == len(batches[2]) == len(ids) * 2 // 8
    for (x0, p0), (x2, p2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(p0, p2)
    ev = EvalWindows(ds, hop=96)
    assert len(ev) == sum(f // 96 for f in ds.frames)


@pytest.mark.parametrize("preset", ["vggish", "panns", "ast"])
def test_zero_padding_is_the_silence_of_the_stores_front_end(tmp_path, preset: str) -> None:
    from avfuse.melspec import log_mel
    from tests.synthetic import write_store

    fe = getattr(FrontendConfig, preset)()
    short = np.ones((fe.example_frames // 3, fe.n_mels), np.float32)
    write_store(tmp_path, fe, {"a": short})
    store = FeatureStore(tmp_path)
    ds = WindowDataset(
        store,
        ["a"],
        [0],
        NormStats.identity(fe.n_mels),
        store.frontend.window_frames,
        short_clips="zeros",
    )
    x = ds[(0, 0)][0].numpy()
    # What a recording of digital silence gives under this front end (PANNs: -100 dB).
    silence = log_mel(np.zeros(fe.sample_rate, np.float32), fe)
    assert x.shape == (fe.example_frames, fe.n_mels)
    np.testing.assert_array_equal(x[: len(short)], short)
    np.testing.assert_allclose(x[len(short) :], float(silence[1, 0]), rtol=1e-5)


def test_pad_window_policies() -> None:
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    rep = pad_window(x, 8, "repeat", -4.6)
    np.testing.assert_array_equal(rep, np.concatenate([x, x, x[:2]]))
    zer = pad_window(x, 8, "zeros", -4.6)
    np.testing.assert_array_equal(zer[:3], x)
    assert (zer[3:] == np.float32(-4.6)).all()
    with pytest.raises(ValueError, match="drop"):
        pad_window(x, 8, "drop", 0.0)


def test_identity_norm_is_exact() -> None:
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float16)
    assert np.array_equal(NormStats.identity(5).apply(x), x.astype(np.float32))


# ------------------------------------------------------------------ block reads and batched gathers


def test_getitems_equals_one_item_at_a_time(store_work) -> None:
    from avfuse.data import NormStats, WindowDataset
    from avfuse.store import FeatureStore

    work, _ = store_work
    store = FeatureStore(work / "features")
    ids = store.ids
    frames = store.frames_array(ids)
    norm = NormStats(np.full(64, -3.0, np.float32), np.full(64, 2.0, np.float32))
    ds = WindowDataset(store, ids, np.arange(len(ids)) % 4, norm, window=96)
    rng = np.random.default_rng(1)
    pos = rng.integers(0, len(ids), 200)
    pos[:3] = np.flatnonzero(frames < 96)[:3]  # videos shorter than a window are padded
    assert (frames[pos[:3]] < 96).all()
    items = [(int(p), int(rng.integers(0, max(int(frames[p]) - 96, 0) + 1))) for p in pos]
    assert len({store._loc[ids[p]][0] for p, _ in items}) > 1  # several shards in one batch
    batch = ds.__getitems__(items)
    one = [ds[i] for i in items]
    assert len(batch) == len(one)
    for (xb, yb, pb), (xo, yo, po) in zip(batch, one):
        assert (yb, pb) == (yo, po) and xb.dtype == xo.dtype and xb.shape == (96, 64)
        np.testing.assert_array_equal(xb.numpy(), xo.numpy())


def _chi2_per_batch(labels: np.ndarray, n_classes: int, batch: int) -> np.ndarray:
    """Pearson chi-square of each batch's class histogram against equal class shares."""
    n = len(labels) // batch
    hist = np.stack(
        [np.bincount(b, minlength=n_classes) for b in labels[: n * batch].reshape(n, batch)]
    )
    e = batch / n_classes
    return ((hist - e) ** 2 / e).sum(1)


def test_block_sampler_reads_groups_and_keeps_the_class_mix_random() -> None:
    from avfuse.data import TrainWindowSampler

    # Worst case for locality: the store holds the classes one after the other.
    n_classes, per_class, per_block, group, batch = 64, 64, 4, 256, 32
    n = n_classes * per_class
    labels = np.repeat(np.arange(n_classes), per_class)
    frames = np.random.default_rng(0).integers(100, 1000, n)
    blocks = np.arange(n) // per_block

    def epoch(**kw) -> np.ndarray:
        s = TrainWindowSampler(frames, labels, windows_per_video=2, window=96, seed=3, **kw)
        s.set_epoch(1)
        return s.epoch_items()

    plain, local = epoch(), epoch(blocks=blocks, group=group)
    # The same windows, only reordered.
    assert sorted(map(tuple, plain)) == sorted(map(tuple, local))
    # Working set: at no point are more than `group` blocks between their first and last read.
    b = blocks[local[:, 0]]
    first = np.full(blocks.max() + 1, len(b)), np.zeros(blocks.max() + 1, np.int64)
    np.minimum.at(first[0], b, np.arange(len(b)))
    np.maximum.at(first[1], b, np.arange(len(b)))
    active = np.zeros(len(b) + 1, np.int64)
    np.add.at(active, first[0], 1)
    np.add.at(active, first[1] + 1, -1)
    assert np.cumsum(active).max() <= group

    # Class mix: random sampling gives E[chi2] = C - 1; grouping adds about C (B - 1) / group
    # (two items of a batch share a block with probability ~1 / group). The standard error of
    # a mean over 256 batches is about sqrt(2 (C - 1) / 256) ~ 0.7, so 3 is a wide margin.
    c = n_classes
    random_chi2 = _chi2_per_batch(labels[plain[:, 0]], c, batch).mean()
    local_chi2 = _chi2_per_batch(labels[local[:, 0]], c, batch).mean()
    assert abs(random_chi2 - (c - 1)) < 3
    assert local_chi2 < c - 1 + c * (batch - 1) / group + 3
    # Reading the blocks one at a time (no grouping) would fail the same bound badly.
    one_block = epoch(blocks=blocks, group=1)
    assert _chi2_per_batch(labels[one_block[:, 0]], c, batch).mean() > 5 * c


def test_block_sampler_shards_ranks_and_resumes() -> None:
    from avfuse.data import TrainWindowSampler

    frames = np.full(1000, 500)
    blocks = np.arange(1000) // 10
    full = TrainWindowSampler(frames, window=96, blocks=blocks, group=8, seed=1)
    full.set_epoch(2)
    ranks = []
    for r in range(2):
        s = TrainWindowSampler(
            frames, window=96, blocks=blocks, group=8, seed=1, rank=r, world_size=2
        )
        s.set_epoch(2, skip=5)
        ranks.append(np.asarray(list(s)))
        assert len(s) == 500 - 5
    items = full.epoch_items()
    np.testing.assert_array_equal(ranks[0], items[0::2][5:])
    np.testing.assert_array_equal(ranks[1], items[1::2][5:])


def test_getitems_full_batch_gathers_into_one_array(store_work) -> None:
    from avfuse.data import NormStats, WindowDataset
    from avfuse.store import FeatureStore

    work, _ = store_work
    store = FeatureStore(work / "features")
    frames = store.frames_array(store.ids)
    norm = NormStats(np.zeros(64, np.float32), np.ones(64, np.float32))
    ds = WindowDataset(store, store.ids, np.zeros(len(store), np.int64), norm, window=96)
    long = np.flatnonzero(frames >= 200)[:16]
    items = [(int(p), int(frames[p]) - 96) for p in long]  # last window of each video
    for (x, _, p), (vid_pos, start) in zip(ds.__getitems__(items), items):
        want = np.asarray(store[store.ids[vid_pos]][start : start + 96], np.float32)
        np.testing.assert_array_equal(x.numpy(), want)
        assert p == vid_pos
