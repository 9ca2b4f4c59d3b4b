"""Features on a real Dask cluster (2 worker processes on loopback) equal a local run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import avfuse.features as features
from avfuse.features import FeaturesConfig, compute_features
from avfuse.io import read_json, read_table
from tests.test_features import make_work, store_arrays

distributed = pytest.importorskip("distributed")


def assert_same_store(a_work: Path, b_work: Path) -> None:
    a, b = store_arrays(a_work), store_arrays(b_work)
    assert a.keys() == b.keys() and len(a) == 7  # 6 ok and 1 padded short clip
    for vid in a:
        np.testing.assert_array_equal(a[vid], b[vid])
    pd.testing.assert_frame_equal(
        read_table(a_work / "features.parquet"), read_table(b_work / "features.parquet")
    )
    assert read_json(a_work / "features/store.json") == read_json(b_work / "features/store.json")
    # every shard file is referenced by the index: no duplicate or half-written output
    index = read_table(b_work / "features/index.parquet")
    shards = {p.name for p in (b_work / "features/shards").iterdir()}
    assert len(shards) > 1 and shards == set(index["shard"])


def test_features_on_local_cluster_match_local_run(tmp_path: Path, client: Any) -> None:
    local = make_work(tmp_path / "local")
    remote = make_work(tmp_path / "cluster")
    # Local reference through the process pool (2 workers), the default executor.
    compute_features(FeaturesConfig(work=local, num_workers=2, batch_size=2, progress=False))
    pids = set(client.run(os.getpid).values())
    res = compute_features(
        FeaturesConfig(work=remote, batch_size=2, progress=False), executor=client.get_executor()
    )
    assert res.computed == 7
    assert os.getpid() not in pids and len(pids) == 2  # the work ran in the worker processes
    assert_same_store(local, remote)


def crash_once(tasks: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """Write this batch's shards, then kill the worker process before it returns (once).

    Runs only in worker processes, where ``features._feature_batch`` is still the real
    function (the test replaces it in the client process only), so a worker the nanny
    restarts finds it too. The marker is created with O_EXCL: when two workers reach this
    point together, exactly one of them dies.
    """
    real = features._feature_batch
    if real is crash_once:
        raise RuntimeError("crash_once must run in a worker process")
    out = real(tasks, **kw)
    marker = Path(kw["store"]).parent / "crashed-once"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return out
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def test_run_survives_a_worker_dying(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = make_work(tmp_path / "local")
    remote = make_work(tmp_path / "cluster")
    compute_features(FeaturesConfig(work=local, num_workers=0, batch_size=2, progress=False))
    monkeypatch.setattr(features, "_feature_batch", crash_once)
    before = set(client.scheduler_info()["workers"])
    res = compute_features(
        FeaturesConfig(work=remote, batch_size=2, progress=False), executor=client.get_executor()
    )
    assert (remote / "crashed-once").exists()  # a worker really died mid-batch
    client.wait_for_workers(2, timeout=60)
    assert set(client.scheduler_info()["workers"]) != before  # and was replaced
    assert res.counts == {"ok": 6, "padded": 1, "not_extracted": 1}
    assert_same_store(local, remote)  # the dead worker's orphan shard was removed
