"""Features on a real Dask cluster (2 worker processes on loopback) equal a local run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from avfuse.features import FeaturesConfig, compute_features
from avfuse.io import read_json, read_table
from tests.test_features import make_work, store_arrays

distributed = pytest.importorskip("distributed")


def test_features_on_local_cluster_match_local_run(tmp_path: Path) -> None:
    local = make_work(tmp_path / "local")
    remote = make_work(tmp_path / "cluster")
    # Local reference through the process pool (2 workers), the default executor.
    compute_features(FeaturesConfig(work=local, num_workers=2, batch_size=2, progress=False))

    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        res = compute_features(
            FeaturesConfig(work=remote, batch_size=2, progress=False),
            executor=client.get_executor(),
        )
        # the work really ran in the worker processes, not in this one
        assert len(client.scheduler_info()["workers"]) == 2
    assert res.computed == 7

    a, b = store_arrays(local), store_arrays(remote)
    assert a.keys() == b.keys() and len(a) == 6
    for vid in a:
        np.testing.assert_array_equal(a[vid], b[vid])
    pd.testing.assert_frame_equal(
        read_table(local / "features.parquet"), read_table(remote / "features.parquet")
    )
    meta_a, meta_b = (
        read_json(local / "features/store.json"),
        read_json(remote / "features/store.json"),
    )
    assert meta_a == meta_b
    # batches of 2 videos: more than one shard, each written by a worker, all referenced
    index = read_table(remote / "features/index.parquet")
    shards = {p.name for p in (remote / "features/shards").iterdir()}
    assert len(shards) > 1 and shards == set(index["shard"])
