"""Bookkeeping at scale: compacted record logs, cheap status counts, stores pickled by path,
locality-aware training sampling and batched gathers."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.extract import ExtractConfig, extract
from avfuse.io import RecordLog, read_table
from avfuse.manifest import ScanConfig, scan
from avfuse.workdir import RecordLogLayout
from tests.media import write_tone_video

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- record logs


def test_compact_keeps_the_newest_record_of_each_video_in_one_part(tmp_path) -> None:
    rlog = RecordLog(tmp_path / "parts")
    expected: dict[str, int] = {}
    for batch in range(6):
        rows = [
            {"video_id": f"v{i:02d}", "value": batch * 100 + i} for i in range(batch, batch + 4)
        ]
        rlog.write(rows)
        expected.update({r["video_id"]: r["value"] for r in rows})
    assert len(rlog.parts()) == 6

    df = rlog.compact().to_pandas()
    assert len(rlog.parts()) == 1 and RecordLogLayout.is_compacted(rlog.parts()[0])
    assert dict(zip(df["video_id"], df["value"])) == expected
    again = rlog.read().to_pandas()
    assert dict(zip(again["video_id"], again["value"])) == expected

    # A part logged after the compaction still wins; compacting again folds it in.
    rlog.write([{"video_id": "v00", "value": -1}])
    assert rlog.read().to_pandas().set_index("video_id").loc["v00", "value"] == -1
    rlog.compact()
    assert len(rlog.parts()) == 1
    final = rlog.read().to_pandas()
    assert final["video_id"].is_unique
    assert dict(zip(final["video_id"], final["value"])) == {**expected, "v00": -1}


def _clips(root: Path, n: int) -> set[str]:
    ids = set()
    for i in range(n):
        write_tone_video(
            root / "train" / f"class{i % 2}" / f"c{i:02d}.mkv",
            freq=300.0 + 50 * i,
            duration=0.3,
            codec="pcm_s16le",
            rate=16000,
            channels=1,
            video=False,
        )
        ids.add(f"train/class{i % 2}/c{i:02d}")
    return ids


# Where the driver is killed: in the rename of the compacted part (it is not in place yet),
# at the first delete of a covered part (compacted part in place, every old part left), and
# in the middle of the deletes.
KILL_POINTS = {
    "before_rename": ("replace", 1),
    "after_rename": ("unlink", 1),
    "mid_delete": ("unlink", 4),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_mid_compaction_then_rerun_records_every_video_once(tmp_path, point) -> None:
    ids = _clips(tmp_path / "data", 8)
    work = tmp_path / "work"
    scan(ScanConfig(root=tmp_path / "data", work=work))
    what, nth = KILL_POINTS[point]
    # A real process, killed by SIGKILL from inside the compaction at the chosen call.
    script = textwrap.dedent(
        f"""
        import os, pathlib, signal
        from avfuse import io
        from avfuse.extract import ExtractConfig, extract
        from avfuse.workdir import RecordLogLayout
        calls = [0]
        def hit():
            calls[0] += 1
            if calls[0] == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
        if {what!r} == "replace":
            real_replace = os.replace
            def replace(src, dst):
                if RecordLogLayout.COMPACTED in str(dst):
                    hit()
                return real_replace(src, dst)
            io.os.replace = replace
        else:
            real_unlink = pathlib.Path.unlink
            def unlink(self, *a, **k):
                if self.name.startswith("part-"):
                    hit()
                return real_unlink(self, *a, **k)
            pathlib.Path.unlink = unlink
        extract(ExtractConfig(work={str(work)!r}, num_workers=0, batch_size=1, progress=False))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    parts = RecordLog(work / "extract" / "parts")
    assert len(parts.parts()) >= 2  # killed before the compaction finished
    logged = parts.read().to_pandas()
    assert sorted(logged["video_id"]) == sorted(ids)

    res = extract(ExtractConfig(work=work, num_workers=0, batch_size=1, progress=False))
    assert res.processed == 0 and res.skipped == len(ids)  # resumed: nothing decoded again
    assert sorted(res.table["video_id"]) == sorted(ids)
    assert set(res.table["status"]) == {"ok"}
    table = read_table(work / "extract.parquet")
    assert table["video_id"].is_unique and sorted(table["video_id"]) == sorted(ids)
    assert len(parts.parts()) == 1  # the rerun finished the compaction
    final = parts.read().to_pandas()
    assert final["video_id"].is_unique and sorted(final["video_id"]) == sorted(ids)
    pd.testing.assert_frame_equal(
        final.sort_values("video_id").reset_index(drop=True)[list(table.columns)],
        table.reset_index(drop=True),
    )


# --------------------------------------------------------------------------- status counts


def test_status_counts_match_a_full_join(tmp_path) -> None:
    from avfuse.io import write_table
    from avfuse.manifest import load_manifest
    from avfuse.run_report import status_counts

    ids = [f"v{i:03d}" for i in range(50)]
    write_table(pd.DataFrame({"video_id": ids, "split": "train"}), tmp_path / "manifest.parquet")
    rng = np.random.default_rng(0)
    ext_ids = [*ids[:45], "gone"]  # five never extracted, one no longer in the manifest
    write_table(
        pd.DataFrame(
            {"video_id": ext_ids, "status": rng.choice(["ok", "no_audio", "partial"], 46)}
        ),
        tmp_path / "extract.parquet",
    )
    write_table(
        pd.DataFrame({"video_id": ids[:30], "feature_status": ["ok"] * 28 + ["error"] * 2}),
        tmp_path / "features.parquet",
    )
    man = load_manifest(tmp_path)
    expected = {
        col: {str(k): int(v) for k, v in man[col].fillna("not run").value_counts().items()}
        for col in ("status", "feature_status")
    }
    assert status_counts(tmp_path) == expected
    assert expected["feature_status"]["not run"] == 20 and expected["status"]["not run"] == 5


@pytest.mark.parametrize("order", ["manifest order", "shuffled", "one replaced"])
def test_status_counts_streamed_in_manifest_order_match_a_full_join(tmp_path, order) -> None:
    """The block-wise path (a stage table in the manifest's order, over two blocks) and the
    look-up it falls back to give the full join's counts."""
    from avfuse.io import write_table
    from avfuse.manifest import load_manifest
    from avfuse.run_report import status_counts

    n = 70_000  # more than one 65,536-row block
    ids = [f"v{i:06d}" for i in range(n)]
    write_table(pd.DataFrame({"video_id": ids, "split": "train"}), tmp_path / "manifest.parquet")
    rng = np.random.default_rng(1)
    status = rng.choice(np.array(["ok", "no_audio", None], dtype=object), n)
    ext = pd.DataFrame({"video_id": ids, "status": status})
    if order == "shuffled":
        ext = ext.sample(frac=1.0, random_state=0)
    elif order == "one replaced":
        ext.loc[n - 1, "video_id"] = "not-in-the-manifest"
    write_table(ext, tmp_path / "extract.parquet")
    man = load_manifest(tmp_path)
    want = {str(k): int(v) for k, v in man["status"].fillna("not run").value_counts().items()}
    assert status_counts(tmp_path)["status"] == want


# --------------------------------------------------------------------------- stores and samplers


@pytest.fixture
def store_work(tmp_path):
    from tests.synthetic import make_synthetic_work

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=4, videos_per_class=40, frames_range=(60, 300))
    return work, man


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
