"""Late fusion: numerics against brute force, honest weight selection, end-to-end outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from avfuse.fuse import FuseConfig, fuse
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
)
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.metrics import accuracy, true_rank
from avfuse.scores import ScoreFile
from avfuse.video_scores import VideoScoreError


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def views_data(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two independent noisy views: video sure of the first half of the classes,
    audio of the second half, so that fusing them truly helps."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % c)
    strong = np.where(np.arange(c) < c // 2, 3.0, 0.7)
    zv = rng.normal(size=(n, c))
    zv[np.arange(n), y] += strong[y]
    za = rng.normal(size=(n, c))
    za[np.arange(n), y] += strong[::-1][y]
    return y, zv, za


def make_work(
    tmp: Path, n: int = 600, c: int = 10, seed: int = 0, splits: tuple[str, ...] = ("val",)
) -> dict[str, Any]:
    """A work folder with manifest, classes and an audio score file per split (10% without
    audio), plus the matching video logits; returns what each split holds."""
    work = tmp / "work"
    classes = [f"class {k:02d}" for k in range(c)]
    write_class_list(work / "classes.txt", classes)
    rows, out = [], {"work": work, "classes": classes}
    for s_i, split in enumerate(splits):
        y, zv, za = views_data(n, c, seed + 17 * s_i)
        rng = np.random.default_rng(seed + 1000 + s_i)
        yt = ["".join(rng.choice(list("abcdefghijkLMNOP0123456789-_"), 11)) for _ in range(n)]
        stems = [f"{yt[i]}_{i:06d}_{i + 10:06d}" for i in range(n)]
        ids = [f"{split}/{classes[y[i]]}/{stems[i]}" for i in range(n)]
        for i in range(n):
            rows.append(
                {
                    "video_id": ids[i],
                    "split": split,
                    "label": classes[y[i]],
                    "label_index": int(y[i]),
                    "path": f"/data/{ids[i]}.mp4",
                    "size_bytes": 1,
                    "scan_status": "found",
                }
            )
        noa = rng.random(n) < 0.1
        pa = softmax(za).astype(np.float32)
        pa[noa] = np.nan
        status = np.where(noa, "no_audio", "ok")
        ScoreFile(np.array(ids), classes, pa, np.where(noa, 0, 3), status).save(
            work / "scores" / f"audio_{split}.npz"
        )
        np.save(work / f"video_{split}.npy", zv.astype(np.float32))
        # Another tool's spelling: class folder + file name, no split.
        (work / f"video_{split}.txt").write_text(
            "\n".join(f"{classes[y[i]]}/{stems[i]}.mp4 {y[i]}" for i in range(n))
        )
        out[split] = {"ids": ids, "y": y, "zv": zv, "za": za, "noa": noa, "stems": stems}
    write_table(pd.DataFrame(rows), work / "manifest.parquet")
    return out


def cfg_for(d: dict[str, Any], split: str = "val", **kw: Any) -> FuseConfig:
    work = d["work"]
    base: dict[str, Any] = {
        "audio_scores": work / "scores" / f"audio_{split}.npz",
        "video_scores": (work / f"video_{split}.npy",),
        "annotations": work / f"video_{split}.txt",
        "bootstrap": 500,
        "output": work / f"fusion_{kw.get('method', 'mean')}_{kw.get('weight_selection', 'cv')}",
    }
    base.update(kw)
    return FuseConfig(work, **base)


# --------------------------------------------------------------------------- numerics


def test_true_rank_matches_stable_argsort() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(200, 7)).astype(np.float32)  # many ties on purpose
    y = rng.integers(0, 7, 200)
    want = [int(np.flatnonzero(np.argsort(-s[i], kind="stable") == y[i])[0]) for i in range(200)]
    assert true_rank(s, y).tolist() == want


def test_accuracy_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(300, 12))
    y = rng.integers(0, 12, 300)
    top = np.argsort(-s, axis=1)
    top1 = np.mean([top[i, 0] == y[i] for i in range(300)])
    top5 = np.mean([y[i] in top[i, :5] for i in range(300)])
    per = [np.mean([top[i, 0] == k for i in range(300) if y[i] == k]) for k in np.unique(y)]
    got = accuracy(s, y)
    assert got["top1"] == pytest.approx(top1)
    assert got["top5"] == pytest.approx(top5)
    assert got["mean_class"] == pytest.approx(np.mean(per))
    assert got["n"] == 300


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


# --------------------------------------------------------------------------- end to end


def test_fuse_cv_beats_both_and_keeps_no_audio_videos(tmp_path: Path) -> None:
    d = make_work(tmp_path)
    val = d["val"]
    res = fuse(cfg_for(d))
    assert not res.optimistic
    m = res.figures["metrics"]
    assert m["all"]["fused"]["top1"] > m["all"]["video"]["top1"] + 0.05
    assert m["all"]["fused"]["top1"] > m["all"]["audio"]["top1"] + 0.05
    assert m["all"]["gain_top1"][1] > 0  # CI excludes zero
    assert m["all"]["fused"]["n"] == 600
    assert m["with_audio"]["fused"]["n"] == int((~val["noa"]).sum())
    # Every video of the split is in the fused file; those without audio keep video-only scores.
    sf = ScoreFile.load(res.fused_path)
    assert sorted(sf.ids.tolist()) == sorted(val["ids"])
    got = sf.select(val["ids"])
    noa = val["noa"]
    np.testing.assert_allclose(got.scores[noa], softmax(val["zv"][noa]), atol=1e-6)
    assert (got.n_windows[noa] == 0).all() and (got.n_windows[~noa] == 3).all()
    # Video-only figure computed independently.
    assert m["all"]["video"]["top1"] == pytest.approx(np.mean(val["zv"].argmax(1) == val["y"]))
    video_hit = val["zv"].argmax(1) == val["y"]
    assert m["with_audio"]["video"]["top1"] == pytest.approx(video_hit[~noa].mean())
    # Audio-only over all videos: a video without audio is a miss, at top-1 and top-5 alike.
    audio_hit = (val["za"].argmax(1) == val["y"]) & ~noa
    assert m["all"]["audio"]["top1"] == pytest.approx(audio_hit.mean())
    assert m["with_audio"]["audio"]["top1"] == pytest.approx(audio_hit[~noa].mean())
    audio_top5 = np.argsort(-val["za"], axis=1)[:, :5] == val["y"][:, None]
    assert m["all"]["audio"]["top5"] == pytest.approx((audio_top5.any(1) & ~noa).mean())
    # One weight per fold, all of them interior (each view helps the other).
    ws = [f["weight"] for f in res.figures["chosen"]["folds"]]
    assert len(ws) == 5 and all(0.2 <= w <= 0.8 for w in ws)
    saved = json.loads((res.output / "fusion.json").read_text())
    assert saved["metrics"]["all"]["fused"]["top1"] == pytest.approx(m["all"]["fused"]["top1"])
    assert (res.output / "config.toml").exists()


def test_fuse_optimistic_matches_hand_computation(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=400, seed=1)
    val = d["val"]
    res = fuse(cfg_for(d, weight_selection="optimistic", method="mean"))
    w = res.figures["chosen"]["weight"]
    p = softmax(val["zv"])
    has = ~val["noa"]
    p[has] = (1 - w) * p[has] + w * softmax(val["za"][has])
    top1 = np.mean(p.argmax(1) == val["y"])
    top5 = np.mean([val["y"][i] in np.argsort(-p[i])[:5] for i in range(400)])
    m = res.figures["metrics"]["all"]["fused"]
    assert m["top1"] == pytest.approx(top1) and m["top5"] == pytest.approx(top5)
    # The weight is the best on these very videos: no grid weight does better.
    for g in np.linspace(0, 1, 21):
        q = softmax(val["zv"])
        q[has] = (1 - g) * q[has] + g * softmax(val["za"][has])
        assert np.mean(q.argmax(1) == val["y"]) <= top1 + 1e-12
    # ... and it is labelled optimistic everywhere.
    assert res.optimistic and "OPTIMISTIC" in res.summary()
    md = res.report_md.read_text()
    assert "OPTIMISTIC" in md.splitlines()[0] and "fused (optimistic)" in md
    assert "OPTIMISTIC" in res.report_html.read_text()
    assert ScoreFile.load(res.fused_path).meta["optimistic"] is True


def test_fuse_heldout_split(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=400, splits=("train", "val"))
    w = d["work"]
    cfg = cfg_for(
        d,
        weight_selection="heldout",
        method="logprob",
        heldout_audio=w / "scores" / "audio_train.npz",
        heldout_video=(w / "video_train.npy",),
        heldout_video_ids=w / "video_train.txt",
        calibrate=True,
    )
    res = fuse(cfg)
    ch = res.figures["chosen"]
    assert 0.2 <= ch["weight"] <= 0.8 and ch["heldout_videos"] == int((~d["train"]["noa"]).sum())
    m = res.figures["metrics"]["all"]
    assert m["fused"]["top1"] > max(m["video"]["top1"], m["audio"]["top1"]) + 0.05
    assert res.figures["curve"]["heldout_top1"] is not None
    # Uncalibrated: the held-out curve (which also chooses the weight) by hand.
    plain = fuse(
        cfg_for(
            d,
            weight_selection="heldout",
            heldout_audio=w / "scores" / "audio_train.npz",
            heldout_video=(w / "video_train.npy",),
            heldout_video_ids=w / "video_train.txt",
        )
    )
    tr = d["train"]
    has = ~tr["noa"]
    pv, pa, y = softmax(tr["zv"][has]), softmax(tr["za"][has]), tr["y"][has]
    grid = np.linspace(0, 1, 21)
    want = np.array([100 * np.mean(((1 - g) * pv + g * pa).argmax(1) == y) for g in grid])
    got = np.asarray(plain.figures["curve"]["heldout_top1"])
    np.testing.assert_allclose(got, want, atol=100 / len(y) + 1e-9)  # float32 near-ties
    assert got[grid == plain.figures["chosen"]["weight"]][0] == got.max()
    # Held-out data must not overlap the evaluated videos.
    bad = cfg_for(
        d,
        weight_selection="heldout",
        heldout_audio=w / "scores" / "audio_val.npz",
        heldout_video=(w / "video_val.npy",),
        heldout_video_ids=w / "video_val.txt",
    )
    with pytest.raises(VideoScoreError, match="held-out videos are also evaluated"):
        fuse(bad)


def test_fuse_stack_cv(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=500, seed=2)
    res = fuse(cfg_for(d, method="stack", folds=3))
    m = res.figures["metrics"]["all"]
    assert m["fused"]["top1"] > max(m["video"]["top1"], m["audio"]["top1"]) + 0.05
    assert all("alpha" in f for f in res.figures["chosen"]["folds"])


def test_fuse_alignment_survives_respelling_shuffling_and_class_order(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=300, seed=3)
    val, classes, w = d["val"], d["classes"], d["work"]
    ref = ScoreFile.load(fuse(cfg_for(d, weight_selection="optimistic")).fused_path)
    # The same video scores as probabilities in a wide CSV: rows shuffled, columns reversed,
    # ids spelled "YouTubeID_60_70.mp4", class names with underscores.
    rng = np.random.default_rng(0)
    order = rng.permutation(300)
    probs = softmax(val["zv"])[order][:, ::-1]
    cols = [c.replace(" ", "_").upper() for c in classes[::-1]]
    df = pd.DataFrame(probs, columns=cols)
    parts = [s.rsplit("_", 2) for s in np.asarray(val["stems"])[order]]
    short = [f"{yt}_{int(a)}_{int(b)}.mp4" for yt, a, b in parts]
    df.insert(0, "id", short)
    df.to_csv(w / "video.csv", index=False, float_format="%.9g")
    cfg = cfg_for(
        d, weight_selection="optimistic", video_scores=(w / "video.csv",), annotations=None
    )
    res = fuse(cfg)
    assert res.figures["counts"]["video"]["kind"] == "probs"
    got = ScoreFile.load(res.fused_path).select(ref.ids.tolist())
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)


def test_fuse_tolerance_on_missing_videos(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=400, seed=4)
    w, val = d["work"], d["val"]
    keep = np.ones(400, bool)
    keep[:12] = False  # 3% of the videos without video scores
    np.save(w / "part.npy", val["zv"][keep].astype(np.float32))
    lines = (w / "video_val.txt").read_text().splitlines()
    (w / "part.txt").write_text("\n".join(np.asarray(lines)[keep]))
    cfg = cfg_for(d, video_scores=(w / "part.npy",), annotations=w / "part.txt")
    with pytest.raises(VideoScoreError, match=r"part\.npy: 12 videos of the split without a row"):
        fuse(cfg)
    res = fuse(
        cfg_for(d, video_scores=(w / "part.npy",), annotations=w / "part.txt", tolerance=0.05)
    )
    assert res.figures["counts"]["video"]["ids"]["missing"] == 12
    assert res.figures["metrics"]["all"]["fused"]["n"] == 388
    assert val["ids"][0] not in ScoreFile.load(res.fused_path).ids.tolist()


def test_fuse_rejects_bad_video_scores(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=100, seed=5)
    w, val = d["work"], d["val"]
    zv = val["zv"].copy()
    zv[7, 2] = np.nan
    np.save(w / "nan.npy", zv)
    with pytest.raises(VideoScoreError, match=r"nan\.npy: 1 row\(s\) with NaN"):
        fuse(cfg_for(d, video_scores=(w / "nan.npy",)))
    sf = ScoreFile.load(w / "scores" / "audio_val.npz")
    ok = np.flatnonzero(sf.has_scores)[3]
    sf.scores[ok, 1] = np.inf
    sf.save(w / "bad_audio.npz")
    with pytest.raises(VideoScoreError, match=r"bad_audio\.npz: 1 row\(s\) with status ok but"):
        fuse(cfg_for(d, audio_scores=w / "bad_audio.npz"))
    np.save(w / "narrow.npy", val["zv"][:, :9])
    with pytest.raises(VideoScoreError, match=r"narrow\.npy: 9 score columns but 10 classes"):
        fuse(cfg_for(d, video_scores=(w / "narrow.npy",)))
    df = pd.DataFrame(val["zv"], columns=[*d["classes"][:-1], "yodelling"])
    df.insert(0, "video_id", val["ids"])
    df.to_csv(w / "unknown.csv", index=False)
    with pytest.raises(VideoScoreError, match=r"unknown\.csv: .*class 09.*yodelling"):
        fuse(cfg_for(d, video_scores=(w / "unknown.csv",), annotations=None))


def test_report_links_existing_pngs_and_states_figures(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=300, seed=6)
    res = fuse(cfg_for(d))
    md = res.report_md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"accuracy.png", "weight_curve.png", "class_gain.png"} <= set(links)
    for link in links:
        png = res.output / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = res.figures["metrics"]["all"]
    assert f"{100 * m['fused']['top1']:.2f}" in md
    assert f"{100 * m['video']['top1']:.2f}" in md
    g = m["gain_top1"]
    assert f"top-1 gain {100 * g[0]:+.2f} points (95% CI {100 * g[1]:+.2f} to" in md
    # Alignment table: every video matched on both sides (side, matched, missing, extra, dups).
    assert "| video | 300 | 0 | 0 | 0 |" in md and "| audio | 300 | 0 | 0 | 0 |" in md
    html = res.report_html.read_text()
    assert all(f'src="{link}"' in html for link in links)


def test_rows_of_other_splits_and_a_missing_class(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=200, splits=("train", "val"))
    w, tr, val, classes = d["work"], d["train"], d["val"], d["classes"]
    # One file scoring both splits, the last class missing: rows of train are not mismatches.
    both = np.concatenate([tr["zv"], val["zv"]])[:, :-1]
    df = pd.DataFrame(both, columns=classes[:-1])
    df.insert(0, "video_id", tr["ids"] + val["ids"])
    df.to_csv(w / "all.csv", index=False)
    cfg = cfg_for(d, video_scores=(w / "all.csv",), annotations=None)
    with pytest.raises(VideoScoreError, match="class 09"):
        fuse(cfg)
    res = fuse(cfg_for(d, video_scores=(w / "all.csv",), annotations=None, class_tolerance=1))
    ids = res.figures["counts"]["video"]["ids"]
    assert ids["extra"] == 0 and ids["matched"] == 200
    assert res.figures["counts"]["video"]["classes"]["missing_examples"] == ["class 09"]
    # Video probabilities come from a softmax over the nine known classes.
    sf = ScoreFile.load(res.fused_path).select(val["ids"])
    noa = val["noa"]
    np.testing.assert_allclose(sf.scores[noa][:, :-1], softmax(val["zv"][noa][:, :-1]), atol=1e-6)
    assert (sf.scores[noa][:, -1] < 1e-6).all()


def test_cv_weights_are_chosen_on_the_other_folds_only(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=300, seed=7)
    val = d["val"]
    res = fuse(cfg_for(d, folds=3, grid=11, seed=5))
    folds = stratified_folds(val["y"], 3, seed=5)
    pv, pa, y, has = softmax(val["zv"]), softmax(val["za"]), val["y"], ~val["noa"]
    grid = np.linspace(0, 1, 11)
    fused = pv.copy()
    for f, chosen in enumerate(res.figures["chosen"]["folds"]):
        fit = (folds != f) & has
        score = []
        for g in grid:
            p = (1 - g) * pv[fit] + g * pa[fit]
            acc = np.mean(p.argmax(1) == y[fit])
            nll = -np.mean(np.log(p[np.arange(fit.sum()), y[fit]]))
            score.append((-acc, nll))
        w = grid[min(range(11), key=lambda i: score[i])]
        assert chosen["weight"] == pytest.approx(w)
        test = (folds == f) & has
        fused[test] = (1 - w) * pv[test] + w * pa[test]
    assert res.figures["metrics"]["all"]["fused"]["top1"] == pytest.approx(
        np.mean(fused.argmax(1) == y)
    )


def test_block_wise_fusion_equals_a_reference_over_several_blocks(tmp_path: Path) -> None:
    # More rows than one processing block (512): the block edges must not show.
    d = make_work(tmp_path, n=4500, c=5, seed=8)
    val = d["val"]
    pv, pa, y, has = softmax(val["zv"]), softmax(val["za"]), val["y"], ~val["noa"]
    grid = np.linspace(0, 1, 11)
    for method in ("mean", "logprob"):
        res = fuse(cfg_for(d, method=method, weight_selection="optimistic", grid=11))
        score = []
        for g in grid:
            if method == "mean":
                p = (1 - g) * pv[has] + g * pa[has]
            else:
                p = pv[has] ** (1 - g) * pa[has] ** g
                p /= p.sum(1, keepdims=True)
            acc = np.mean(p.argmax(1) == y[has])
            score.append((-acc, -np.mean(np.log(p[np.arange(has.sum()), y[has]]))))
        curve = -100 * np.array([s[0] for s in score])
        np.testing.assert_allclose(
            res.figures["curve"]["top1_with_audio"], curve, atol=100 * 3 / has.sum()
        )
        w = res.figures["chosen"]["weight"]
        want = pv.copy()
        if method == "mean":
            want[has] = (1 - w) * pv[has] + w * pa[has]
        else:
            q = pv[has] ** (1 - w) * pa[has] ** w
            want[has] = q / q.sum(1, keepdims=True)
        got = ScoreFile.load(res.fused_path).select(val["ids"])
        np.testing.assert_allclose(got.scores, want, atol=2e-6)
        top1 = res.figures["metrics"]["all"]["fused"]["top1"]
        assert top1 == pytest.approx(np.mean(want.argmax(1) == y), abs=2 / 4500)


def test_outputs_is_done_and_finished_settings_follow_the_fusion_folder(tmp_path: Path) -> None:
    from avfuse import fuse as stage

    d = make_work(tmp_path, n=60)
    cfg = cfg_for(d, bootstrap=10)
    out = cfg.output
    assert stage.outputs(cfg) == [out / "fusion.json", out / "report.md"]
    assert not stage.is_done(cfg) and stage.finished_settings(cfg) is None
    fuse(cfg)
    assert stage.is_done(cfg) and stage.finished_settings(cfg) == cfg
    (out / "config.toml").write_text("bootstrap = [")  # unreadable: vouches for nothing
    assert stage.is_done(cfg) and stage.finished_settings(cfg) is None
    default = FuseConfig(d["work"], video_scores=cfg.video_scores)
    assert stage.outputs(default)[0] == d["work"] / "fusion" / "fusion.json"
