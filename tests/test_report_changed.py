"""'What audio changed' in the fusion report, its audio players, and escaping of names."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pytest

from avfuse import report as rp
from avfuse.audio import write_audio
from avfuse.fuse import FuseConfig, fuse
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.scores import ScoreFile

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "a|b `tick` **bold**",
    "www.example.com <script>alert(2)</script>",
]
SR = 16000


class Page(HTMLParser):
    """Tags with their attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html_text: str) -> Page:
    p = Page()
    p.feed(html_text)
    return p


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def make_work(tmp: Path, classes: list[str], n: int = 80, seed: int = 0) -> dict[str, Any]:
    """Manifest, audio scores, video logits and an extracted tone per val video (video i's
    tone lasts 1 + i % 7 seconds); some videos have no audio."""
    work = tmp / "work"
    c = len(classes)
    write_class_list(work / "classes.txt", classes)
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    zv = rng.normal(size=(n, c))
    zv[np.arange(n), y] += 1.0
    za = rng.normal(size=(n, c))
    za[np.arange(n), y] += 2.0
    ids = [f"val/{classes[y[i]]}/clip {i:03d} <b>" for i in range(n)]
    noa = np.arange(n) % 9 == 4
    pa = _softmax(za).astype(np.float32)
    pa[noa] = np.nan
    ScoreFile(
        np.array(ids), classes, pa, np.where(noa, 0, 3), np.where(noa, "no_audio", "ok")
    ).save(work / "scores" / "audio_val.npz")
    pd.DataFrame({"video_id": ids, **{k: zv[:, j] for j, k in enumerate(classes)}}).to_csv(
        work / "video_val.csv", index=False
    )
    rows, ext = [], []
    for i, vid in enumerate(ids):
        rows.append(
            {
                "video_id": vid,
                "split": "val",
                "label": classes[y[i]],
                "label_index": int(y[i]),
                "path": f"/nonexistent/{i}.mp4",
                "size_bytes": 1,
                "scan_status": "found",
            }
        )
        rel = f"audio/val/{i:03d}.flac"
        if not noa[i]:
            t = np.arange(int((1 + i % 7) * SR)) / SR
            write_audio(work / rel, 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), SR)
        ext.append({"video_id": vid, "status": "no_audio" if noa[i] else "ok", "audio_path": rel})
    write_table(pd.DataFrame(rows), work / "manifest.parquet")
    write_table(pd.DataFrame(ext), work / "extract.parquet")
    return {"work": work, "ids": ids, "y": y, "zv": zv, "noa": noa, "classes": classes}


def _cfg(d: dict[str, Any], **kw: Any) -> FuseConfig:
    return FuseConfig(
        d["work"],
        video_scores=(d["work"] / "video_val.csv",),
        weight_selection="optimistic",
        method="logprob",
        bootstrap=50,
        changed_rows=1000,
        output=d["work"] / "fusion",
        **kw,
    )


def _decoded_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)) / stream.rate


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


def _render_markdown(md: str) -> Page:
    markdown_it = pytest.importorskip("markdown_it")
    # CommonMark with raw HTML enabled: whatever escaping lets through would show up as tags.
    return parse(markdown_it.MarkdownIt("commonmark").enable("table").render(md))


def _assert_inert(page: Page, folder: Path) -> None:
    for tag, attrs in page.tags:
        assert tag not in ("script", "iframe", "object", "embed", "svg"), tag
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        for key in ("src", "href"):
            v = attrs.get(key)
            if v is not None:
                assert not v.lower().startswith(("javascript:", "data:", "http", "//")), v
                assert (folder / v).exists(), v  # only our own files are linked
        if tag == "img":
            assert str(attrs["src"]).endswith(".png")


def test_hostile_class_and_file_names_are_escaped_everywhere(tmp_path: Path) -> None:
    d = make_work(tmp_path, HOSTILE, n=64, seed=1)
    res = fuse(_cfg(d))
    html_page = parse(res.report_html.read_text())
    _assert_inert(html_page, res.output)
    text = " ".join(html_page.text)
    md_page = _render_markdown(res.report_md.read_text())
    _assert_inert(md_page, res.output)
    md_text = " ".join(md_page.text)
    for name in HOSTILE:
        assert name in text  # shown as text, not interpreted
        assert name in md_text
    rows = res.figures["changed"]["rows"]
    assert rows and all(r["video_id"] in md_text and r["video_id"] in text for r in rows)


def test_report_paragraphs_escape_values_and_keep_their_markup(tmp_path: Path) -> None:
    r = rp.Report("title <i>x</i>")
    r.paragraph(
        f"root {rp.code('/d/`odd`<img src=x onerror=1>')} and **bold** {rp.lit('*[a](b)*')}"
    )
    r.table(
        pd.DataFrame(
            {"class": ["[x](javascript:alert(1))", "a|b", "_em_ no_audio"], "n": [1, 2, 3]}
        )
    )
    md, page = r.write(tmp_path / "report.md", tmp_path / "report.html")
    rendered = _render_markdown(md.read_text())
    _assert_inert(rendered, tmp_path)
    words = " ".join(rendered.text)
    assert "/d/`odd`<img src=x onerror=1>" in words and "*[a](b)*" in words
    assert "[x](javascript:alert(1))" in words and "a|b" in words and "_em_ no_audio" in words
    assert not [t for t, _ in rendered.tags if t == "em"]
    assert "| no_audio |" in rp.markdown_table(pd.DataFrame({"s": ["no_audio"]}))  # readable
    assert ("strong", {}) in rendered.tags and ("code", {}) in rendered.tags
    h = parse(page.read_text())
    _assert_inert(h, tmp_path)
    assert "/d/`odd`<img src=x onerror=1>" in " ".join(h.text)
    assert ("b", {}) in h.tags


def test_run_report_lists_the_changes_with_working_players(tmp_path: Path) -> None:
    from avfuse.run_report import write_run_report
    from avfuse.runconfig import FuseSection, RunConfig, stage_configs

    d = make_work(tmp_path, ["dog", "cat", "rain <i>"], n=60, seed=2)
    root = tmp_path / "data [x](javascript:alert(1)) <img src=y onerror=z>"
    root.mkdir()
    fz = FuseSection(
        video_scores=(d["work"] / "video_val.csv",),
        weight_selection="optimistic",
        method="logprob",
        bootstrap=50,
    )
    sc = stage_configs(RunConfig(root=root, work=d["work"], fuse=fz))
    assert sc.fuse is not None
    res = fuse(sc.fuse)
    md, page = write_run_report(sc)
    h = parse(page.read_text())
    _assert_inert(h, d["work"])
    sources = [a["src"] for t, a in h.tags if t == "source"]
    assert len(sources) == len(res.figures["changed"]["rows"]) > 0
    for src in sources:
        assert src is not None and src.startswith("fusion/audio/")
        assert _decoded_seconds(d["work"] / src) > 0.5
    rendered = _render_markdown(md.read_text())
    _assert_inert(rendered, d["work"])
    assert str(root.resolve()) in " ".join(rendered.text)
