"""Fusion numerics over score arrays: kinds, temperature, weights, folds, stacking, intervals."""

from __future__ import annotations

import numpy as np
import pytest

from avfuse.fusion import (
    Params,
    Stacker,
    Views,
    apply_params,
    detect_kind,
    fit_temperature,
    fuse_log_probs,
    paired_bootstrap_ci,
    pick_weight,
    stratified_folds,
    to_log_probs,
    video_above_chance,
)
from avfuse.metrics import accuracy
from tests.test_fuse import softmax, views_data


def test_weight_endpoints_are_exact_and_mean_by_hand() -> None:
    _, zv, za = views_data(50, 6, 2)
    lv, _ = to_log_probs(zv, "logits")
    la, _ = to_log_probs(softmax(za), "probs")
    for method in ("mean", "logprob"):
        np.testing.assert_array_equal(fuse_log_probs(lv, la, 0.0, method), np.exp(lv))
        np.testing.assert_array_equal(fuse_log_probs(lv, la, 1.0, method), np.exp(la))
    pv, pa = softmax(zv), softmax(za)
    np.testing.assert_allclose(fuse_log_probs(lv, la, 0.3, "mean"), 0.7 * pv + 0.3 * pa, atol=1e-6)
    poe = pv**0.7 * pa**0.3
    np.testing.assert_allclose(
        fuse_log_probs(lv, la, 0.3, "logprob"), poe / poe.sum(1, keepdims=True), atol=1e-6
    )
    # Through apply_params: rows without audio are the video's, w=0 is video-only everywhere.
    has = np.arange(50) % 4 != 0
    la_nan = la.copy()
    la_nan[~has] = np.nan
    v = Views(np.arange(50).astype(str), np.zeros(50, int), lv, la_nan, has, np.zeros(50))
    np.testing.assert_array_equal(apply_params(Params("mean", 0.0), v), np.exp(lv))
    got = apply_params(Params("logprob", 1.0), v)
    np.testing.assert_array_equal(got[has], np.exp(la[has]))
    np.testing.assert_array_equal(got[~has], np.exp(lv[~has]))


def test_detect_kind_and_scale() -> None:
    _, zv, _ = views_data(40, 5, 3)
    assert detect_kind(zv) == "logits"
    assert detect_kind(softmax(zv)) == "probs"
    assert detect_kind(softmax(zv) * 0.5) == "logits"  # rows not summing to 1
    a, k1 = to_log_probs(zv)
    b, k2 = to_log_probs(softmax(zv))
    assert (k1, k2) == ("logits", "probs")
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_fit_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(scale=2.0, size=(4000, 8))
    # Labels drawn from softmax(z / 2): the scores are over-confident by a factor of 2.
    p = softmax(z / 2.0)
    y = (p.cumsum(1) > rng.random((4000, 1))).argmax(1)
    t = fit_temperature(np.log(softmax(z)), y)
    assert t == pytest.approx(2.0, rel=0.1)


def test_stratified_folds_balanced() -> None:
    y = np.repeat(np.arange(7), 23)
    f = stratified_folds(y, 5, seed=3)
    counts = np.array([[np.sum((y == k) & (f == j)) for j in range(5)] for k in range(7)])
    assert counts.sum() == len(y)
    assert (counts.max(1) - counts.min(1) <= 1).all()
    assert not np.array_equal(f, stratified_folds(y, 5, seed=4))


def test_cv_weight_never_sees_its_own_fold() -> None:
    # Fold 0 would pick weight index 0 for itself, every other fold prefers index 1.
    folds = np.repeat(np.arange(4), 10)
    correct = np.zeros((2, 40), dtype=bool)
    correct[0, folds == 0] = True
    correct[1, folds != 0] = True
    nll = np.zeros((2, 40), dtype=np.float32)
    assert pick_weight(correct, nll, folds == 0) == 0  # optimistic, on fold 0 itself
    assert pick_weight(correct, nll, folds != 0) == 1  # what CV uses for fold 0
    # Ties in accuracy go to the lower loss.
    assert pick_weight(np.ones((3, 5), bool), np.array([[3.0] * 5, [1.0] * 5, [2.0] * 5])) == 1


def test_paired_bootstrap_ci() -> None:
    rng = np.random.default_rng(5)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        base = rng.random(n) < 0.6
        new = np.where(rng.random(n) < 0.15, ~base, base) | (rng.random(n) < 0.05)
        return new, base

    new, base = sample(500)
    g, lo, hi = paired_bootstrap_ci(new, base, 4000, seed=1)
    assert g == pytest.approx(new.mean() - base.mean())
    assert lo < g < hi
    # Brute force: resample video indices.
    idx = rng.integers(0, 500, size=(4000, 500))
    brute = (new[idx].astype(float) - base[idx]).mean(1)
    b_lo, b_hi = np.quantile(brute, [0.025, 0.975])
    assert lo == pytest.approx(b_lo, abs=0.006) and hi == pytest.approx(b_hi, abs=0.006)
    # 16x the videos: the interval shrinks about 4x.
    g2, lo2, hi2 = paired_bootstrap_ci(*sample(8000), 4000, seed=1)
    assert 2.5 < (hi - lo) / (hi2 - lo2) < 6
    assert lo2 < g2 < hi2


def test_stacker_beats_single_views_and_shrinks_with_l2() -> None:
    y, zv, za = views_data(3000, 8, 6)
    lv, _ = to_log_probs(zv, "logits")
    la, _ = to_log_probs(za, "logits")
    tr, te = slice(0, 2000), slice(2000, None)
    st = Stacker.fit(lv[tr], la[tr], y[tr], l2=1.0)
    acc = accuracy(st.predict(lv[te], la[te]), y[te])["top1"]
    assert acc > accuracy(lv[te], y[te])["top1"] + 0.1
    assert acc > accuracy(la[te], y[te])["top1"] + 0.1
    # The per-class terms follow each class's strength: video matters more on classes 0-3.
    assert st.a[:4].mean() > st.a[4:].mean() and st.b[4:].mean() > st.b[:4].mean()
    stiff = Stacker.fit(lv[tr], la[tr], y[tr], l2=1e6)
    assert np.abs(np.concatenate([stiff.a, stiff.b, stiff.d])).max() < 1e-2
    assert stiff.alpha > 0.3 and stiff.beta > 0.3


def test_chance_test_against_an_independent_binomial() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 20, 2000)
    unrelated = rng.normal(size=(2000, 20))
    r = video_above_chance(unrelated, y, 20)
    assert r["testable"] and not r["above_chance"]
    assert r["chance"] == pytest.approx(1 / 20, abs=0.01)
    weak = unrelated.copy()
    weak[np.arange(2000), y] += 0.8  # a weak but real model
    r = video_above_chance(weak, y, 20)
    assert r["above_chance"] and r["p_value"] < 1e-10
    # Majority class always predicted: exactly the chance rate, refused.
    const = np.zeros((2000, 20))
    const[:, int(np.bincount(y).argmax())] = 1.0
    r = video_above_chance(const, y, 20)
    assert not r["above_chance"]
    assert r["chance"] == pytest.approx(np.bincount(y).max() / 2000)
    # Three videos cannot tell anything: not testable, never refused on that ground.
    assert not video_above_chance(unrelated[:3], y[:3], 20)["testable"]
