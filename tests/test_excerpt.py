"""The audio excerpts the reports play: they decode, and only videos with sound get one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from avfuse.fuse import fuse
from avfuse.scores import ScoreFile
from tests.test_report import _cfg, _decoded_seconds, _softmax, make_work, parse


def test_changed_videos_are_listed_with_players_that_decode(tmp_path: Path) -> None:
    classes = ["dog", "cat", "rain", "car"]
    d = make_work(tmp_path, classes)
    res = fuse(_cfg(d, excerpt_seconds=3.0))
    fused = ScoreFile.load(res.fused_path)
    pos = fused.index()
    ids, y = d["ids"], d["y"]
    pv = d["zv"].argmax(1)
    pf = np.array([fused.scores[pos[v]].argmax() for v in ids])
    expect = {
        "fixed": {v for v, a, b, t in zip(ids, pv, pf, y) if a != b and b == t},
        "broken": {v for v, a, b, t in zip(ids, pv, pf, y) if a != b and a == t},
        "changed": {v for v, a, b, t in zip(ids, pv, pf, y) if a != b and t not in (a, b)},
    }
    assert expect["fixed"] and expect["broken"], "the data must make audio fix and break some"
    ch = res.figures["changed"]
    assert ch["counts"] == {k: len(s) for k, s in expect.items()}
    for kind, s in expect.items():
        assert {r["video_id"] for r in ch["rows"] if r["kind"] == kind} == s

    page = parse(res.report_html.read_text())
    sources = [a["src"] for t, a in page.tags if t == "source"]
    assert len(sources) == len(ch["rows"])  # every changed video has audio (no_audio can't change)
    for row, src in zip(ch["rows"], sources, strict=True):
        assert src is not None and not src.startswith(("/", "data:", "http"))
        path = res.output / src
        i = ids.index(row["video_id"])
        assert _decoded_seconds(path) == pytest.approx(min(3.0, 1 + i % 7), abs=0.03)
    # the top-3 of the video model, by hand, for one listed video
    row = ch["rows"][0]
    i = ids.index(row["video_id"])
    p = _softmax(d["zv"][i : i + 1])[0]
    order = np.argsort(-p)[:3]
    assert [c for c, _ in row["video"]] == [classes[k] for k in order]
    assert [round(q, 4) for _, q in row["video"]] == [round(float(p[k]), 4) for k in order]
    text = " ".join(page.text)
    assert f"{classes[order[0]]} {p[order[0]]:.2f}" in text
    assert "What audio changed" in text
    # the audio error matrix, by hand
    err = res.figures["audio_errors"]
    has = ~d["noa"]
    audio = ScoreFile.load(d["work"] / "scores" / "audio_val.npz")
    apos = audio.index()
    ap = np.array([audio.scores[apos[v]].argmax() if h else -1 for v, h in zip(ids, has)])
    wrong = has & (ap != y)
    for name, row_counts in zip(err["classes"], err["matrix"], strict=True):
        k = classes.index(name)
        assert sum(row_counts) == int((wrong & (y == k)).sum())
    assert any(t == "img" and a["src"] == "audio_errors.png" for t, a in page.tags)

    # A copied report folder keeps working: every link is relative.
    copy = tmp_path / "elsewhere" / "fusion"
    shutil.copytree(res.output, copy)
    for src in sources:
        assert src is not None and (copy / src).is_file()


def test_no_audio_links_leaves_audio_out(tmp_path: Path) -> None:
    d = make_work(tmp_path, ["dog", "cat", "rain"], n=60, seed=3)
    res = fuse(_cfg(d, audio_links=False))
    page = parse(res.report_html.read_text())
    assert not [t for t, _ in page.tags if t in ("audio", "source")]
    assert not (res.output / "audio").exists()
    assert res.figures["changed"]["rows"], "rows are still listed, without players"
    assert "listen" not in res.report_md.read_text()
