"""The fuse stage: honest weight selection, every video-score format aligned by key and class name,
outputs replaced together, silent videos keep their video score."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from avfuse.fuse import FuseConfig, fuse
from avfuse.fusion import infer_kind, stratified_folds
from avfuse.io import read_json, write_table
from avfuse.manifest import write_class_list
from avfuse.metrics import true_rank
from avfuse.scores import ScoreFile
from avfuse.video_scores import VideoScoreError, read_annotations
from tests.synthetic import make_synthetic_work, write_val_manifest
from tests.workfolders import tree_bytes


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


# ------------------------------------------------------- video scores aligned by key and class name


def dump(path: Path, scores: np.ndarray, gt: np.ndarray | None = None) -> Path:
    """An mmaction2 ``--dump`` file: a list of dicts with ``pred_score`` (and ``gt_label``)."""
    items: list[Any] = []
    for i, row in enumerate(scores):
        item: dict[str, Any] = {"pred_score": row.astype(np.float32)}
        if gt is not None:
            item["gt_label"] = np.array([gt[i]], dtype=np.int64)
        items.append(item)
    with open(path, "wb") as fh:
        pickle.dump(items, fh)
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_work(tmp_path_factory.mktemp("align"), n=400, c=10, seed=11)


def test_dump_and_list_in_the_same_order_are_fused(d: dict[str, Any]) -> None:
    w, val = d["work"], d["val"]
    p = dump(w / "ok.pkl", val["zv"], val["y"])
    res = fuse(cfg_for(d, video_scores=(p,), output=w / "f_ok"))
    ref = fuse(cfg_for(d, output=w / "f_ref"))  # the same scores as an unnamed .npy
    v = res.figures["counts"]["video"]
    assert v["labels"]["checked"] == 400 and v["labels"]["disagree"] == 0
    assert v["chance"]["above_chance"] and v["chance"]["top1"] > 0.4
    got = ScoreFile.load(res.fused_path).select(val["ids"])
    want = ScoreFile.load(ref.fused_path).select(val["ids"])
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def test_list_in_another_order_than_the_dump_is_refused(d: dict[str, Any]) -> None:
    w, val = d["work"], d["val"]
    # The dump was written in list order; the list given now is sorted another way.
    order = np.random.default_rng(0).permutation(400)
    lines = (w / "video_val.txt").read_text().splitlines()
    (w / "shuffled.txt").write_text("\n".join(np.asarray(lines)[order]))
    with_gt = dump(w / "gt.pkl", val["zv"], val["y"])
    with pytest.raises(VideoScoreError, match=r"disagree with the manifest for 3\d\d of 400"):
        fuse(cfg_for(d, video_scores=(with_gt,), annotations=w / "shuffled.txt"))
    # Without gt_label in the dump the list's own labels agree (they travel with its lines):
    # the video model's top-1 falls to chance, and that is refused.
    no_gt = dump(w / "nogt.pkl", val["zv"])
    with pytest.raises(VideoScoreError, match=r"no better than chance.*list.*label-map"):
        fuse(cfg_for(d, video_scores=(no_gt,), annotations=w / "shuffled.txt"))
    # Explicitly allowed: fused, and the record says how low the video model was.
    res = fuse(
        cfg_for(
            d,
            video_scores=(no_gt,),
            annotations=w / "shuffled.txt",
            allow_low_video_accuracy=True,
            output=w / "f_allowed",
        )
    )
    ch = res.figures["counts"]["video"]["chance"]
    assert not ch["above_chance"] and ch["top1"] < 0.2
    saved = json.loads((res.output / "fusion.json").read_text())
    assert saved["counts"]["video"]["chance"]["above_chance"] is False


def test_label_map_in_another_class_order_omitted_is_refused(d: dict[str, Any]) -> None:
    w, val, classes = d["work"], d["val"], d["classes"]
    perm = np.random.default_rng(1).permutation(10)  # model column j is class perm[j]
    inv = np.argsort(perm)
    model_scores = val["zv"][:, perm]
    np.save(w / "model.npy", model_scores.astype(np.float32))
    # mmaction2 list: labels are indices into the model's class order.
    (w / "model_list.txt").write_text(
        "\n".join(
            f"{classes[val['y'][i]]}/{val['stems'][i]}.mp4 {inv[val['y'][i]]}" for i in range(400)
        )
    )
    (w / "label_map.txt").write_text("\n".join(classes[k] for k in perm) + "\n")
    base = {"video_scores": (w / "model.npy",), "annotations": w / "model_list.txt"}
    with pytest.raises(VideoScoreError, match=r"disagree with the manifest for \d+ of 400"):
        fuse(cfg_for(d, **base))
    # The same without labels in the list: caught by the chance test.
    (w / "model_ids.txt").write_text("\n".join(val["stems"]))
    with pytest.raises(VideoScoreError, match="no better than chance"):
        fuse(cfg_for(d, video_scores=(w / "model.npy",), annotations=w / "model_ids.txt"))
    # With the label map: accepted, and identical to fusing the columns in class order.
    res = fuse(cfg_for(d, **base, video_label_map=w / "label_map.txt", output=w / "f_map"))
    assert res.figures["counts"]["video"]["labels"]["disagree"] == 0
    ref = fuse(cfg_for(d, output=w / "f_ref2"))
    np.testing.assert_allclose(
        ScoreFile.load(res.fused_path).select(val["ids"]).scores,
        ScoreFile.load(ref.fused_path).select(val["ids"]).scores,
        atol=1e-6,
    )


def test_kinetics_csv_labels_are_checked_by_class_name(tmp_path: Path) -> None:
    d = make_work(tmp_path, n=300, c=6, seed=12)
    w, val, classes = d["work"], d["val"], d["classes"]
    rows = []
    for i, stem in enumerate(val["stems"]):
        yt, a, b = stem.rsplit("_", 2)
        # Kinetics CSVs spell names with blanks or underscores, quoted or not.
        rows.append([classes[val["y"][i]].replace(" ", "_"), yt, int(a), int(b), "val"])
    df = pd.DataFrame(rows, columns=["label", "youtube_id", "time_start", "time_end", "split"])
    df.to_csv(w / "k.csv", index=False)
    ids, labels = read_annotations(w / "k.csv")
    assert ids == val["stems"]
    assert labels is not None and labels.names is not None
    assert labels.names[:2] == [classes[val["y"][0]].replace(" ", "_"), rows[1][0]]
    res = fuse(cfg_for(d, annotations=w / "k.csv", output=w / "f_k"))
    assert res.figures["counts"]["video"]["labels"]["checked"] == 300
    # 5 % of the rows labelled with another class: beyond the 0.5 % tolerance.
    bad = df.copy()
    flip = np.arange(0, 300, 20)
    bad.loc[flip, "label"] = [classes[(val["y"][i] + 1) % 6] for i in flip]
    bad.to_csv(w / "bad.csv", index=False)
    with pytest.raises(VideoScoreError, match=r"for 15 of 300 videos .*says"):
        fuse(cfg_for(d, annotations=w / "bad.csv"))
    res = fuse(cfg_for(d, annotations=w / "bad.csv", label_tolerance=0.1, output=w / "f_b"))
    assert res.figures["counts"]["video"]["labels"]["disagree"] == 15


def _tiny_work(tmp: Path, classes: list[str], audio_classes: list[str]) -> dict[str, Any]:
    """Work folder with n videos whose audio file names its classes ``audio_classes``."""
    work = tmp / "work"
    write_class_list(work / "classes.txt", classes)
    c, n = len(classes), 200
    rng = np.random.default_rng(5)
    y = np.arange(n) % c
    ids = [f"val/{classes[k]}/clip{i:04d}" for i, k in enumerate(y)]
    write_val_manifest(work, ids, classes, y)
    za = rng.normal(size=(n, c))
    za[np.arange(n), y] += 2
    ScoreFile(np.array(ids), audio_classes, softmax(za), np.full(n, 3), np.full(n, "ok")).save(
        work / "scores" / "audio_val.npz"
    )
    zv = rng.normal(size=(n, c))
    zv[np.arange(n), y] += 2
    return {"work": work, "ids": ids, "y": y, "zv": zv, "za": za}


def test_classes_differing_only_in_case_fuse(tmp_path: Path) -> None:
    classes = ["Jogging", "jogging", "air drumming", "zumba"]
    t = _tiny_work(tmp_path, classes, classes)
    # Named in another order and spelling: Jogging is column 1 of the file, jogging column 0.
    df = pd.DataFrame(
        t["zv"][:, [1, 0, 2, 3]], columns=["jogging", "Jogging", "air_drumming", "zumba"]
    )
    df.insert(0, "video_id", t["ids"])
    df.to_csv(t["work"] / "v.csv", index=False)
    res = fuse(
        fuse_cfg(t["work"], video_scores=(t["work"] / "v.csv",), weight_selection="optimistic")
    )
    assert res.figures["counts"]["video"]["classes"]["by_name"]
    w = res.figures["chosen"]["weight"]
    want = (1 - w) * softmax(t["zv"]) + w * softmax(t["za"])
    np.testing.assert_allclose(ScoreFile.load(res.fused_path).scores, want, atol=1e-5)


def fuse_cfg(work: Path, **kw: Any) -> Any:
    from avfuse.fuse import FuseConfig

    return FuseConfig(work, bootstrap=200, **kw)


def test_overflowing_logits_are_an_error_naming_the_row(d: dict[str, Any]) -> None:
    w, val = d["work"], d["val"]
    z = val["zv"].astype(np.float64)
    z[37, 4] = 5e38  # finite in float64, inf in float32
    np.save(w / "huge.npy", z)
    with pytest.raises(VideoScoreError, match=r"huge\.npy: 1 row\(s\) .*float32 .*row 37"):
        fuse(cfg_for(d, video_scores=(w / "huge.npy",)))


def test_fuse_counts_a_nan_audio_row_as_a_miss(d: dict[str, Any]) -> None:
    # Fused NaN cannot come from valid inputs; the rank helper is what every figure uses.
    lv = np.log(softmax(d["val"]["zv"][:5]))
    lv[2] = np.nan
    assert (true_rank(lv, d["val"]["y"][:5]) == 10).sum() == 1


@pytest.mark.parametrize("decimals", [2, 3])
def test_rounded_probabilities_are_probabilities(d: dict[str, Any], decimals: int) -> None:
    w, val = d["work"], d["val"]
    p = softmax(val["zv"]).round(decimals)
    g = infer_kind(p)
    assert g.kind == "probs" and g.resolution == f"{decimals} decimals"
    assert g.tolerance == pytest.approx(10 * 0.5 * 10.0**-decimals)
    df = pd.DataFrame(p, columns=d["classes"])
    df.insert(0, "video_id", val["ids"])
    df.to_csv(w / f"r{decimals}.csv", index=False)
    res = fuse(
        cfg_for(d, video_scores=(w / f"r{decimals}.csv",), annotations=None, output=w / "f_r")
    )
    assert res.figures["counts"]["video"]["kind"] == "probs"
    assert "video scores read as probs" in res.summary()
    saved = json.loads((res.output / "fusion.json").read_text())
    assert saved["counts"]["video"]["kind"] == "probs"


def test_ambiguous_scores_are_refused_in_auto_mode(d: dict[str, Any]) -> None:
    w, val, classes = d["work"], d["val"], d["classes"]
    sig = 1 / (1 + np.exp(-val["zv"]))  # sigmoid outputs: in [0, 1], rows do not sum to 1
    assert infer_kind(sig).kind is None
    neg = softmax(val["zv"]).round(3)
    neg[::7, 0] = -0.001  # probability-like rows with a tiny negative value
    assert infer_kind(neg).kind is None
    assert infer_kind(val["zv"]).kind == "logits"
    for name, arr in (("sig", sig), ("neg", neg)):
        df = pd.DataFrame(arr, columns=classes)
        df.insert(0, "video_id", val["ids"])
        df.to_csv(w / f"{name}.csv", index=False)
        with pytest.raises(VideoScoreError, match="--video-kind"):
            fuse(cfg_for(d, video_scores=(w / f"{name}.csv",), annotations=None))
    res = fuse(
        cfg_for(
            d,
            video_scores=(w / "sig.csv",),
            annotations=None,
            video_kind="probs",
            output=w / "f_sig",
        )
    )
    assert res.figures["counts"]["video"]["kind"] == "probs"
    assert "given" in res.figures["counts"]["video"]["kind_how"]


def test_fusion_keeps_the_video_score_of_silent_videos_like_no_audio(tmp_path: Path) -> None:
    from avfuse.fuse import FuseConfig, fuse

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=2, videos_per_class=6, splits=("val",))
    rng = np.random.default_rng(0)
    ids = man["video_id"].tolist()
    labels = man["label_index"].to_numpy()
    video = rng.dirichlet([1.0, 1.0], len(ids)).astype(np.float32)
    np.savez(
        tmp_path / "video.npz", scores=video, ids=np.asarray(ids), classes=["class_00", "class_01"]
    )
    rows = {}
    for i, vid in enumerate(ids):
        if i in (0, 6):
            rows[vid] = (None, 0, "silent")
        elif i in (1, 7):
            rows[vid] = (None, 0, "no_audio")
        else:
            s = np.full(2, 0.3, np.float32)
            s[labels[i]] = 0.7
            rows[vid] = (s, 1, "ok")
    ScoreFile.from_rows(["class_00", "class_01"], rows).save(work / "scores" / "audio_val.npz")
    res = fuse(
        FuseConfig(
            work,
            video_scores=(tmp_path / "video.npz",),
            weight_selection="optimistic",
            bootstrap=20,
            folds=2,
        )
    )
    fused = ScoreFile.load(res.fused_path)
    got = dict(zip(fused.ids.tolist(), fused.scores))
    for i in (0, 6, 1, 7):  # silent and no_audio alike: the video model's scores, unchanged
        np.testing.assert_allclose(got[ids[i]], video[i], atol=1e-6)
    assert not np.allclose(got[ids[2]], video[2], atol=1e-3)


def test_fuse_output_naming_someones_folder_is_refused_and_left_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from avfuse.cli import main
    from avfuse.io import atomic_dir

    mine = tmp_path / "Documents"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work", "utf-8")
    work = tmp_path / "w"
    work.mkdir()
    (work / "manifest.parquet").touch()
    args = ["fuse", str(work), "--video-scores", str(tmp_path / "v.csv"), "--output", str(mine)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and "refusing to replace" in err[0], err
    with pytest.raises(FileExistsError), atomic_dir(mine, "fusion.json") as tmp:
        (tmp / "fusion.json").write_text("{}", "utf-8")
    assert (mine / "thesis.txt").read_text("utf-8") == "years of work"
    assert sorted(p.name for p in mine.iterdir()) == ["sub", "thesis.txt"]
    # An earlier fusion output (or an empty folder) is replaced as before.
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, "fusion.json") as tmp:
        (tmp / "fusion.json").write_text("{}", "utf-8")
    with atomic_dir(empty, "fusion.json") as tmp:
        (tmp / "fusion.json").write_text('{"second": 1}', "utf-8")
    assert json.loads((empty / "fusion.json").read_text("utf-8")) == {"second": 1}


def test_fuse_outputs_are_replaced_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import avfuse.fuse as fuse_mod

    d = make_work(tmp_path, n=200, seed=3)
    out = tmp_path / "work" / "fusion"
    fuse_mod.fuse(cfg_for(d, method="mean", output=out, bootstrap=50))
    old = tree_bytes(out)
    assert read_json(out / "fusion.json")["method"] == "mean"

    real_report = fuse_mod.write_fusion_report

    def dying_report(folder: Path, figures: dict[str, Any]) -> Any:
        real_report(folder, figures)  # every new file is written ...
        raise KeyboardInterrupt  # ... and the run is stopped before it returns

    monkeypatch.setattr(fuse_mod, "write_fusion_report", dying_report)
    with pytest.raises(KeyboardInterrupt):
        fuse_mod.fuse(cfg_for(d, method="logprob", output=out, bootstrap=50))
    assert tree_bytes(out) == old  # no new fusion.json beside the old report
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []

    monkeypatch.undo()
    res = fuse_mod.fuse(cfg_for(d, method="logprob", output=out, bootstrap=50))
    assert read_json(out / "fusion.json")["method"] == "logprob"
    assert "`logprob`" in (out / "report.md").read_text("utf-8")
    assert res.fused_path.parent == out and res.fused_path.exists()
