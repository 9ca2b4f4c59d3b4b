"""Report building blocks: tables, status counts, plots and the Markdown / HTML pages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.image import imread

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
