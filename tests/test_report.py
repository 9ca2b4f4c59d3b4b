"""Report building blocks: tables, status counts, plots and the Markdown / HTML pages; what audio
changed, and hostile names escaped everywhere."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from avfuse import report as rp
from avfuse.audio import write_audio
from avfuse.fuse import FuseConfig, fuse
from avfuse.io import write_table
from avfuse.manifest import write_class_list
from avfuse.report import (
    Report,
    markdown_table,
    plot_accuracy_bars,
    plot_class_gain,
    plot_status_counts,
    plot_training_curves,
    plot_weight_curve,
    status_table,
)
from avfuse.scores import ScoreFile


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table() -> None:
    df = pd.DataFrame({"model": ["video", "a|b"], "top-1 %": [71.1234, float("nan")], "n": [3, 4]})
    lines = markdown_table(df).splitlines()
    assert lines[0] == "| model | top-1 % | n |"
    assert lines[2] == "| video | 71.12 | 3 |"
    assert lines[3] == "| a\\|b | n/a | 4 |"


def test_status_table_counts_per_split() -> None:
    m = pd.DataFrame(
        {
            "video_id": list("abcdefg"),
            "split": ["train"] * 4 + ["val"] * 3,
            "status": ["ok", "ok", "no_audio", None, "ok", "unreadable", "ok"],
            "feature_status": ["ok", "too_short", None, None, "ok", None, "ok"],
        }
    )
    t = status_table(m)
    ext = t[t["stage"] == "extract"].set_index("status")
    assert ext.loc["ok", "train"] == 2 and ext.loc["ok", "val"] == 2 and ext.loc["ok", "total"] == 4
    assert ext.loc["not run", "train"] == 1 and ext.loc["unreadable", "val"] == 1
    feat = t[t["stage"] == "features"].set_index("status")
    assert feat.loc["not run", "total"] == 3 and feat.loc["too_short", "train"] == 1
    # Every video is counted once per stage.
    assert (t.groupby("stage")["total"].sum() == 7).all()


def test_plots_write_pngs(tmp_path: Path) -> None:
    m = pd.DataFrame({"split": ["val"] * 3, "status": ["ok", "ok", "no_audio"]})
    pngs = [
        plot_status_counts(status_table(m), tmp_path / "status.png"),
        plot_accuracy_bars(
            {"top-1": {"video": 70.0, "audio": 20.0, "fused": 72.0}},
            tmp_path / "bars.png",
            {"top-1": (2.0, 1.0, 3.0)},
        ),
        plot_weight_curve(
            np.linspace(0, 1, 5),
            {"all": np.array([70, 71, 72, 60, 20.0])},
            tmp_path / "w.png",
            [0.5],
        ),
        plot_class_gain([f"c{i}" for i in range(30)], np.arange(30) - 15.0, tmp_path / "g.png"),
    ]
    for p in pngs:
        assert is_png(p)
        h, w = imread(p).shape[:2]
        assert h > 100 and w > 100


def test_plot_training_curves(tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {"epoch": e, "train_loss": 2 / (e + 1), "val_loss": 2.5 / (e + 1), "val_top1": e}
        )
        for e in range(5)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 5, "trunc')
    png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert is_png(png)
    (tmp_path / "empty.jsonl").write_text("")
    try:
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")
    except ValueError as exc:
        assert "empty.jsonl: no metrics recorded" in str(exc)
    else:
        raise AssertionError("an empty metrics file must be an error")


def test_report_markdown_and_html(tmp_path: Path) -> None:
    png = plot_weight_curve(np.linspace(0, 1, 3), {"x": np.ones(3)}, tmp_path / "curve.png")
    r = Report("Fusion <val>")
    r.note("tuned on the test set")
    r.heading("Figures")
    r.paragraph("Method `mean`, **all videos**.")
    r.table(pd.DataFrame({"model": ["fused"], "top-1 %": [72.5]}))
    r.image(png, "accuracy against weight")
    md, page = r.write(tmp_path / "report.md", tmp_path / "report.html")
    text = md.read_text()
    assert text.startswith("# Fusion &lt;val&gt;\n")  # Markdown carries no raw HTML
    assert "> **Note:** tuned on the test set" in text
    assert "| fused | 72.50 |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["curve.png"] and (tmp_path / links[0]).exists()
    html = page.read_text()
    assert "<title>Fusion &lt;val&gt;</title>" in html
    assert '<img src="curve.png"' in html
    assert "<code>mean</code>" in html and "<b>all videos</b>" in html
    assert "<td>72.50</td>" in html


def test_training_curves_are_named_after_the_selection_split() -> None:
    from avfuse.report import audio_results_table, curve_labels

    df = pd.DataFrame({"epoch": [1], "val_top1": [0.5], "selection_split": ["heldout"]})
    assert curve_labels(df) == {"val_top1": "heldout_top1"}
    carved = pd.DataFrame({"val_top1": [0.5], "selection_split": ["train carve-out"]})
    assert curve_labels(carved) == {"val_top1": "train_carve-out_top1"}
    assert curve_labels(pd.DataFrame({"val_top1": [0.5]})) == {}
    m = {
        "top1": 0.9,
        "top5": 1.0,
        "mAP": 0.8,
        "top1_all": 0.45,
        "top5_all": 0.5,
        "mean_class_accuracy_all": 0.4,
        "coverage": {"scored": 5, "videos": 10},
    }
    table = audio_results_table({"val": m})
    row = table.iloc[0]
    assert row["scored / videos"] == "5 / 10"
    assert row["top-1 % (all)"] == pytest.approx(45) and row["top-1 % (scored)"] == pytest.approx(
        90
    )


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
