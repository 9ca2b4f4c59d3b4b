"""The log-mel statistics baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avfuse.baseline import fit_baseline
from avfuse.store import FeatureStore
from tests.synthetic import make_synthetic_work


def test_baseline_matches_an_independent_fit(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=3, videos_per_class=6, structured=False)
    store = FeatureStore(work / "features")
    tr = man[man["split"] == "train"]
    ids = tr["video_id"].tolist()
    fitted = fit_baseline(store, ids, tr["label_index"].to_numpy(), 3, stats="meanstd")
    stats = np.stack(
        [
            np.concatenate(
                [np.asarray(store[v], np.float64).mean(0), np.asarray(store[v], np.float64).std(0)]
            )
            for v in ids
        ]
    )
    sc = StandardScaler().fit(stats)
    ref = LogisticRegression(max_iter=2000).fit(sc.transform(stats), tr["label_index"])
    va = man[man["split"] == "val"]["video_id"].tolist()
    vstats = np.stack(
        [
            np.concatenate(
                [np.asarray(store[v], np.float64).mean(0), np.asarray(store[v], np.float64).std(0)]
            )
            for v in va
        ]
    )
    np.testing.assert_allclose(
        fitted.predict_proba(store, va), ref.predict_proba(sc.transform(vstats)), atol=1e-6
    )
