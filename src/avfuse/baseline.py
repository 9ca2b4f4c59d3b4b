"""The reference every audio model must beat: log-mel statistics + logistic regression.

A video is described by the per-band mean and standard deviation of its log-mel frames in the
feature store (``2 * n_mels`` numbers, whatever its length: short clips need no padding), the
features are standardised on the training videos and a multinomial logistic regression
(scikit-learn, L2, lbfgs) is fitted on them. Cheap, deterministic and hard to get wrong, it
tells a user whether the deep model earns its cost on their data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avfuse.store import FeatureStore

NAME = "log-mel band mean+std, logistic regression"


def band_statistics(store: FeatureStore, ids: Sequence[str]) -> np.ndarray:
    """``(videos, 2 * n_mels)`` float64: per-band mean then std over each video's frames."""
    out = np.zeros((len(ids), 2 * store.n_mels), dtype=np.float64)
    for i, vid in enumerate(ids):
        x = np.asarray(store[vid], dtype=np.float64)
        out[i, : store.n_mels] = x.mean(axis=0)
        out[i, store.n_mels :] = x.std(axis=0)
    return out


@dataclass
class Baseline:
    """A fitted baseline; :meth:`predict_proba` gives ``(videos, n_classes)`` probabilities."""

    model: object
    n_classes: int
    train_videos: int

    def predict_proba(self, store: FeatureStore, ids: Sequence[str]) -> np.ndarray:
        """Probabilities over all ``n_classes`` (0 for classes absent from training)."""
        out = np.zeros((len(ids), self.n_classes), dtype=np.float64)
        if not len(ids):
            return out
        proba = self.model.predict_proba(band_statistics(store, ids))  # type: ignore[attr-defined]
        seen = np.asarray(self.model.classes_, dtype=np.int64)  # type: ignore[attr-defined]
        out[:, seen] = proba
        return out


def fit_baseline(
    store: FeatureStore,
    ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    n_classes: int,
    c: float = 1.0,
    max_iter: int = 2000,
) -> Baseline:
    """Fit the baseline on ``ids`` (in the store) with integer ``labels`` in ``[0, n_classes)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels, dtype=np.int64)
    if len(ids) != len(y):
        raise ValueError("labels must be aligned with ids")
    if len(np.unique(y)) < 2:
        raise ValueError("the baseline needs training videos of at least two classes")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    model.fit(band_statistics(store, ids), y)
    return Baseline(model, n_classes, len(ids))


__all__ = ["NAME", "Baseline", "band_statistics", "fit_baseline"]
