"""Video scores that do not line up with the videos are refused; numbers that would lie too."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from avfuse.fuse import fuse
from avfuse.fusion import infer_kind, video_above_chance
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.metrics import accuracy, metrics, true_rank
from avfuse.scores import ScoreFile
from avfuse.video_scores import VideoScoreError, read_annotations
from tests.test_fuse import cfg_for, make_work, softmax


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


# --------------------------------------------------------------------------- list order


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


# --------------------------------------------------------------------------- label map


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


# --------------------------------------------------------------------------- class names


def _tiny_work(tmp: Path, classes: list[str], audio_classes: list[str]) -> dict[str, Any]:
    """Work folder with n videos whose audio file names its classes ``audio_classes``."""
    work = tmp / "work"
    write_class_list(work / "classes.txt", classes)
    c, n = len(classes), 200
    rng = np.random.default_rng(5)
    y = np.arange(n) % c
    ids = [f"val/{classes[k]}/clip{i:04d}" for i, k in enumerate(y)]
    write_table(
        pd.DataFrame(
            {
                "video_id": ids,
                "split": "val",
                "label": [classes[k] for k in y],
                "label_index": y,
                "path": "",
                "size_bytes": 1,
                "scan_status": "found",
            }
        ),
        work / "manifest.parquet",
    )
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


# --------------------------------------------------------------------------- numbers


def test_overflowing_logits_are_an_error_naming_the_row(d: dict[str, Any]) -> None:
    w, val = d["work"], d["val"]
    z = val["zv"].astype(np.float64)
    z[37, 4] = 5e38  # finite in float64, inf in float32
    np.save(w / "huge.npy", z)
    with pytest.raises(VideoScoreError, match=r"huge\.npy: 1 row\(s\) .*float32 .*row 37"):
        fuse(cfg_for(d, video_scores=(w / "huge.npy",)))


def test_nan_rows_are_never_correct() -> None:
    s = np.array([[np.nan, np.nan, np.nan], [0.1, np.nan, 0.0], [0.2, 0.5, 0.3]])
    y = np.array([0, 0, 1])
    assert true_rank(s, y).tolist() == [3, 3, 0]
    assert accuracy(s, y)["top1"] == pytest.approx(1 / 3)
    m = metrics(s, y)
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(1 / 3)
    assert m["per_class"]["correct"] == [0, 1, 0]


def test_fuse_counts_a_nan_audio_row_as_a_miss(d: dict[str, Any]) -> None:
    # Fused NaN cannot come from valid inputs; the rank helper is what every figure uses.
    lv = np.log(softmax(d["val"]["zv"][:5]))
    lv[2] = np.nan
    assert (true_rank(lv, d["val"]["y"][:5]) == 10).sum() == 1


# --------------------------------------------------------------------------- probs or logits


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
