"""Human-readable reports: Markdown + HTML pages with matplotlib PNG plots.

A :class:`Report` is a list of blocks (headings, paragraphs, tables, images, notes) written
once as ``NAME.md`` and once as a self-contained ``NAME.html`` next to the PNGs it links.
The plotting helpers are small and independent so that other stages can reuse them:
:func:`plot_training_curves` for a run's ``metrics.jsonl``, :func:`status_table` /
:func:`plot_status_counts` for extraction and feature outcomes, and the fusion plots.

Plots use matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global
state, no display needed, safe from worker threads.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from avfuse.io import atomic_write
from avfuse.workdir import FusionLayout

_COLORS = {"video": "#4C72B0", "audio": "#DD8452", "fused": "#55A868", "loss": "#C44E52"}


def _save(fig: Figure, png: str | Path) -> Path:
    png = Path(png)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_write(png) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    return png


# --------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        if math.isnan(float(v)):
            return "n/a"
        return f"{float(v):.2f}" if abs(float(v)) < 1e4 else f"{float(v):.0f}"
    return str(v)


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table of ``df`` (index dropped; floats to 2 decimals, NaN as
    n/a); every cell and header is plain text (:func:`md_escape`)."""
    cols = [md_escape(str(c)) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(md_escape(_fmt(v)) for v in row) + " |")
    return "\n".join(lines)


# Characters that make Markdown markup anywhere in a line, backslash-escaped in plain text:
# code, emphasis, links and images, table cells, strikethrough, and the ":" and "@" of
# autolinked URLs and e-mail addresses; & < > become entities (a raw-HTML tag or an <autolink>
# needs a literal "<"), and control characters and line breaks a space (a line break could
# start a heading, a list or an HTML block). Other punctuation only means something at the
# start of a line, which a value never is.
_MD_PUNCT = set("\\`*_[]!|~:@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
_WWW = re.compile(r"(?i)\b(www)\.")  # GFM autolinks bare www. names


def md_escape(text: str) -> str:
    """``text`` as literal Markdown: no markup, link, image, autolink or HTML can come of it."""
    text = _CONTROL.sub(" ", str(text))
    out = []
    for i, ch in enumerate(text):
        if ch in "&<>":
            out.append(html.escape(ch))
        elif ch == "_" and 0 < i < len(text) - 1 and (text[i - 1] + text[i + 1]).isalnum():
            out.append(ch)  # inside a word (no_audio) an underscore never makes emphasis
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return _WWW.sub(r"\1\\.", "".join(out))


def lit(value: object) -> str:
    """A value (a class, file or split name) as literal text inside a report paragraph, whose
    only markup is `code` and **bold** (see :func:`code`)."""
    return re.sub(r"([\\`*])", r"\\\1", _CONTROL.sub(" ", str(value)))


def code(value: object) -> str:
    """A value as a code span of a report paragraph, whatever characters it holds."""
    return f"`{lit(value)}`"


def _tokens(text: str) -> list[tuple[str, str]]:
    """A paragraph's mini-markup as ``(kind, text)``: ``text``, ``code``, ``bold`` (a toggle).

    Backslash escapes any character (how :func:`lit` protects values); control characters
    become spaces.
    """
    text = _CONTROL.sub(" ", text)
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    in_code = False
    i = 0

    def flush(kind: str) -> None:
        if buf or kind == "code":
            out.append((kind, "".join(buf)))
        buf.clear()

    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i + 1])
            i += 2
            continue
        if ch == "`":
            flush("code" if in_code else "text")
            in_code = not in_code
        elif not in_code and text.startswith("**", i):
            flush("text")
            out.append(("bold", ""))
            i += 1
        else:
            buf.append(ch)
        i += 1
    flush("code" if in_code else "text")
    return out


def _md_code(text: str) -> str:
    # A fence longer than any run of backticks inside, padded so edge backticks stay content.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or longest else ""
    return f"{fence}{pad}{text}{pad}{fence}" if text else ""


def inline_markdown(text: str) -> str:
    """A paragraph's mini-markup as Markdown; everything outside the markup is escaped."""
    parts = []
    for kind, val in _tokens(text):
        if kind == "code":
            parts.append(_md_code(val))
        elif kind == "bold":
            parts.append("**")
        else:
            parts.append(md_escape(val))
    return "".join(parts)


def html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def status_table(manifest: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Counts of each stage status per split: one row per (stage, status), one column per split.

    ``manifest`` is :func:`avfuse.manifest.load_manifest` output; the stage columns present
    among ``scan_status``, ``status`` (extract) and ``feature_status`` are counted (missing
    values count as ``not run``). Columns: ``stage, status, <split>..., total``.
    """
    stage_names = {"scan_status": "scan", "status": "extract", "feature_status": "features"}
    cols = [c for c in (columns or stage_names) if c in manifest.columns]
    split = (
        manifest["split"].astype(str)
        if "split" in manifest
        else pd.Series("all", index=manifest.index)
    )
    splits = sorted(split.unique())
    frames = []
    for col in cols:
        st = manifest[col].astype(object).where(manifest[col].notna(), "not run").astype(str)
        counts = pd.crosstab(st, split).reindex(columns=splits, fill_value=0)
        counts["total"] = counts.sum(axis=1)
        counts = counts.sort_values("total", ascending=False)
        counts.insert(0, "status", counts.index)
        counts.insert(0, "stage", stage_names.get(col, col))
        frames.append(counts.reset_index(drop=True))
    if not frames:
        return pd.DataFrame(columns=["stage", "status", "total"])
    out = pd.concat(frames, ignore_index=True)
    out.columns = [str(c) for c in out.columns]
    return out


def plot_status_counts(table: pd.DataFrame, png: str | Path) -> Path:
    """Horizontal bars of :func:`status_table` totals, one group per stage."""
    labels = [f"{s}: {t}" for s, t in zip(table["stage"], table["status"], strict=True)]
    fig = Figure(figsize=(7, 0.35 * len(labels) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    ok = table["status"].isin(["ok", "found", "padded"]).to_numpy()
    ax.barh(y, table["total"], color=np.where(ok, "#55A868", "#C44E52"))
    for yi, v in zip(y, table["total"], strict=True):
        ax.text(float(v), float(yi), f" {int(v)}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("videos")
    ax.set_title("outcome of each stage")
    return _save(fig, png)


# --------------------------------------------------------------------------- plots


def _read_jsonl(path: str | Path) -> pd.DataFrame:
    rows = []
    for line in Path(path).read_text("utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
    return pd.DataFrame(rows)


def plot_training_curves(metrics_jsonl: str | Path, png: str | Path) -> Path:
    """Loss and accuracy curves from a training run's ``metrics.jsonl``.

    Each line is a JSON object; the x axis is ``epoch`` (else ``step``, else the line number).
    Numeric keys containing ``loss`` go on the left panel, the others that look like
    accuracies (``acc``, ``top``, ``map``) on the right. ``val_*`` curves are labelled with the
    record's ``selection_split`` (the split that was actually validated on) when it has one.
    """
    df = _read_jsonl(metrics_jsonl)
    if df.empty:
        raise ValueError(f"{metrics_jsonl}: no metrics recorded")
    df = df.rename(columns=curve_labels(df))
    xcol = next((c for c in ("epoch", "step") if c in df.columns), None)
    x = df[xcol].to_numpy() if xcol else np.arange(len(df))
    numeric = [
        c for c in df.columns if c not in ("epoch", "step") and pd.api.types.is_numeric_dtype(df[c])
    ]
    losses = [c for c in numeric if "loss" in c.lower()]
    accs = [c for c in numeric if any(k in c.lower() for k in ("acc", "top", "map"))]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for c in losses:
        m = df[c].notna().to_numpy()
        ax1.plot(x[m], df[c][m], marker="o", ms=3, label=c)
    for c in accs:
        m = df[c].notna().to_numpy()
        ax2.plot(x[m], df[c][m], marker="o", ms=3, label=c)
    for ax, title in ((ax1, "loss"), (ax2, "accuracy")):
        ax.set_xlabel(xcol or "record")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, png)


def curve_labels(df: pd.DataFrame) -> dict[str, str]:
    """``{"val_top1": "heldout_top1", ...}``: validation curves named after their split."""
    if "selection_split" not in df.columns:
        return {}
    names = [str(v) for v in df["selection_split"].dropna().unique() if str(v)]
    if len(names) != 1 or names[0] == "val":
        return {}
    split = names[0].replace(" ", "_")
    return {c: split + c[3:] for c in df.columns if str(c).startswith("val_")}


def _scored_row(
    split: str, model: str, m: Mapping[str, Any], n: Any, videos: Any
) -> dict[str, Any]:
    """A results-table row from a candidate's or the baseline's metrics."""
    return {
        "split": split,
        "model": model,
        "scored / videos": f"{n} / {videos}",
        "top-1 % (all)": 100 * m["top1_all"],
        "top-5 % (all)": 100 * m["top5_all"],
        "mean class % (all)": 100 * m["mean_class_accuracy_all"],
        "top-1 % (scored)": 100 * m["top1"],
        "top-5 % (scored)": 100 * m["top5"],
        "mAP (scored)": m["mAP"],
    }


def audio_results_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (split, model) from ``evaluate`` metrics JSONs (``{split: metrics}``).

    Figures over all videos of the split (unscored = miss) come first, then over the scored
    videos; the baseline (when evaluated) is the next row, on the same videos.
    """
    rows = []
    for split, m in results.items():
        cov = m.get("coverage", {})
        rows.append(
            {
                "split": split,
                "model": "audio model",
                "scored / videos": f"{cov.get('scored')} / {cov.get('videos')}",
                "top-1 % (all)": 100 * m.get("top1_all", m.get("top1_over_split", math.nan)),
                "top-5 % (all)": 100 * m.get("top5_all", math.nan),
                "mean class % (all)": 100 * m.get("mean_class_accuracy_all", math.nan),
                "top-1 % (scored)": 100 * m["top1"],
                "top-5 % (scored)": 100 * m["top5"],
                "mAP (scored)": m["mAP"],
            }
        )
        cands = (m.get("model_choice") or {}).get("candidates") or {}
        if cands:
            rows.pop()  # the kept audio model is one of the candidates
        for name, c in cands.items():
            model = name + (" (chosen)" if c["chosen"] else "")
            rows.append(_scored_row(split, model, c, c["n"], cov.get("videos")))
        b = m.get("baseline") or {}
        if b.get("top1_all") is not None and not cands:
            model = f"baseline ({b.get('name', 'log-mel statistics')})"
            rows.append(_scored_row(split, model, b, b.get("n"), cov.get("videos")))
    return pd.DataFrame(rows)


def plot_accuracy_bars(
    values: Mapping[str, Mapping[str, float]],
    png: str | Path,
    gain_ci: Mapping[str, tuple[float, float, float]] | None = None,
    title: str = "",
) -> Path:
    """Grouped bars: ``values[metric][model]`` in percent (models: video / audio / fused).

    ``gain_ci[metric] = (gain, low, high)`` in percentage points is written above the fused bar
    and drawn as an error bar around the fused value (video + CI bounds).
    """
    metrics = list(values)
    models = list(next(iter(values.values())))
    fig = Figure(figsize=(2.6 * len(metrics) + 1.5, 4))
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    x = np.arange(len(metrics))
    for j, model in enumerate(models):
        v = np.asarray([values[m][model] for m in metrics], dtype=float)
        pos = x + (j - (len(models) - 1) / 2) * width
        ax.bar(pos, np.nan_to_num(v), width, label=model, color=_COLORS.get(model))
        for p, val in zip(pos, v, strict=True):
            if np.isfinite(val) and val > 8:  # inside the bar, clear of the CI error bar
                ax.text(p, val - 2, f"{val:.1f}", ha="center", va="top", fontsize=7, color="w")
        if model == "fused" and gain_ci and "video" in models:
            for i, m in enumerate(metrics):
                if m not in gain_ci:
                    continue
                g, lo, hi = gain_ci[m]
                base = values[m]["video"]
                ax.errorbar(
                    pos[i],
                    base + g,
                    yerr=[[g - lo], [hi - g]],
                    color="black",
                    capsize=4,
                    lw=1,
                )
                ax.text(
                    pos[i],
                    base + hi + 1.5,
                    f"{g:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                    ha="center",
                    fontsize=7,
                )
    ax.set_xticks(x, metrics)
    ax.set_ylabel("accuracy (%)")
    top = np.nanmax([values[m][k] for m in metrics for k in models])
    ax.set_ylim(0, float(top) + 12)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "accuracy; fused bar: gain over video with 95% bootstrap CI")
    return _save(fig, png)


def plot_weight_curve(
    weights: np.ndarray,
    curves: Mapping[str, np.ndarray],
    png: str | Path,
    chosen: Sequence[float] = (),
    xlabel: str = "audio weight",
    title: str = "",
) -> Path:
    """Accuracy (%) against the fusion weight, one line per curve; chosen weights marked."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for name, y in curves.items():
        style = "--" if "held" in name else "-"
        ax.plot(weights, y, style, marker="o", ms=3, label=name)
    for i, w in enumerate(sorted(set(float(c) for c in chosen))):
        ax.axvline(w, color="black", ls=":", lw=1, label="chosen weight" if i == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlim(float(np.min(weights)) - 0.02, float(np.max(weights)) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy against the audio weight")
    return _save(fig, png)


def plot_class_gain(
    classes: Sequence[str],
    gains: np.ndarray,
    png: str | Path,
    n: int = 10,
    counts: Sequence[int] | None = None,
) -> Path:
    """Bars for the ``n`` classes that gain most and the ``n`` that lose most (points).

    ``counts``: videos per class, shown next to the names (a 20-point swing on 10 videos is
    two videos).
    """
    gains = np.asarray(gains, dtype=float)
    order = np.argsort(gains, kind="stable")
    idx = list(order[::-1][:n]) + [i for i in order[:n] if i not in order[::-1][:n]]
    idx = sorted(set(idx), key=lambda i: -gains[i])
    fig = Figure(figsize=(7, 0.3 * len(idx) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(idx))
    g = gains[idx]
    ax.barh(y, g, color=np.where(g >= 0, _COLORS["fused"], _COLORS["loss"]))
    names = [classes[i] + (f" (n={counts[i]})" if counts is not None else "") for i in idx]
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("top-1 accuracy change with audio (points)")
    ax.set_title("classes that gain and lose most from audio")
    return _save(fig, png)


# --------------------------------------------------------------------------- report


@dataclass
class Report:
    """An ordered list of blocks rendered to Markdown and HTML."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def note(self, text: str) -> None:
        """A highlighted warning (e.g. an optimistic result)."""
        self.blocks.append(("note", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def image(self, png: str | Path, caption: str) -> None:
        """Link a PNG; it must sit in (or below) the folder the report is written to."""
        self.blocks.append(("image", (Path(png), caption)))

    def media_table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table whose cells are plain text or :class:`Audio` players (links in Markdown)."""
        self.blocks.append(("media", (list(columns), [list(r) for r in rows])))

    def to_markdown(self, folder: Path) -> str:
        out = [f"# {md_escape(self.title)}", ""]
        for kind, val in self.blocks:
            if kind == "heading":
                out += ["#" * val[0] + " " + md_escape(val[1]), ""]
            elif kind == "paragraph":
                out += [inline_markdown(val), ""]
            elif kind == "note":
                out += [f"> **Note:** {inline_markdown(val)}", ""]
            elif kind == "table":
                out += [markdown_table(val), ""]
            elif kind == "image":
                cap = md_escape(val[1])
                out += [f"![{cap}]({_url(val[0], folder)})", "", f"*{cap}*", ""]
            elif kind == "media":
                out += [_media_markdown(val, folder), ""]
        return "\n".join(out)

    def to_html(self, folder: Path) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, val in self.blocks:
            if kind == "heading":
                body.append(f"<h{val[0]}>{html.escape(val[1])}</h{val[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline_html(val)}</p>")
            elif kind == "note":
                body.append(f'<p class="note"><b>Note:</b> {_inline_html(val)}</p>')
            elif kind == "table":
                body.append(html_table(val))
            elif kind == "image":
                rel = html.escape(_url(val[0], folder))
                cap = html.escape(val[1])
                body.append(
                    f'<figure><img src="{rel}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
                )
            elif kind == "media":
                body.append(_media_html(val, folder))
        return _HTML.format(title=html.escape(self.title), body="\n".join(body))

    def write(self, md: str | Path, page: str | Path) -> tuple[Path, Path]:
        """Write the Markdown file ``md`` and the HTML page ``page``, both in one folder (the
        one their relative links start from); returns both paths."""
        md, page = Path(md), Path(page)
        if md.parent != page.parent:
            raise ValueError(f"{md} and {page}: a report's two files share one folder")
        with atomic_write(md) as tmp:
            tmp.write_text(self.to_markdown(md.parent), "utf-8")
        with atomic_write(page) as tmp:
            tmp.write_text(self.to_html(page.parent), "utf-8")
        return md, page


@dataclass(frozen=True)
class Audio:
    """A sound file in (or below) the report's folder, shown as a player."""

    path: Path
    mime: str = "audio/ogg"


def _url(path: Path, folder: Path) -> str:
    """A relative link to ``path`` from ``folder``, every component percent-encoded."""
    return quote(_rel(Path(path), folder), safe="/")


def _media_markdown(val: tuple[list[str], list[list[Any]]], folder: Path) -> str:
    cols, rows = val
    head = "| " + " | ".join(md_escape(c) for c in cols) + " |"
    lines = [head, "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in rows:
        cells = [
            f"[listen]({_url(c.path, folder)})" if isinstance(c, Audio) else md_escape(_fmt(c))
            for c in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _media_html(val: tuple[list[str], list[list[Any]]], folder: Path) -> str:
    cols, rows = val
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, Audio):
                src = html.escape(_url(c.path, folder))
                mime = html.escape(c.mime)
                cells.append(
                    f'<td><audio controls preload="metadata"><source src="{src}" '
                    f'type="{mime}"><a href="{src}">listen</a></audio></td>'
                )
            else:
                cells.append(f"<td>{html.escape(_fmt(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="media"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _rel(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _inline_html(text: str) -> str:
    # The paragraphs we write use only `code` and **bold** inline markup.
    parts = []
    bold = False
    for kind, val in _tokens(text):
        if kind == "code":
            parts.append(f"<code>{html.escape(val)}</code>")
        elif kind == "bold":
            parts.append("</b>" if bold else "<b>")
            bold = not bold
        else:
            parts.append(html.escape(val))
    return "".join(parts) + ("</b>" if bold else "")


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
figcaption {{ font-size: 0.9em; color: #555; }}
.note {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
table.media {{ font-size: 0.85em; }}
table.media td {{ text-align: left; vertical-align: middle; }}
table.media audio {{ width: 170px; height: 32px; }}
</style></head>
<body>
{body}
</body></html>
"""


# --------------------------------------------------------------------------- fusion report


def describe_choice(chosen: dict[str, Any]) -> str:
    """One line for the chosen weights / temperatures / stacker."""

    def one(p: dict[str, Any]) -> str:
        if "weight" in p:
            txt = f"w={p['weight']:.2f}"
        else:
            txt = f"α={p.get('alpha', math.nan):.2f} β={p.get('beta', math.nan):.2f}"
        if p.get("t_video", 1.0) != 1.0 or p.get("t_audio", 1.0) != 1.0:
            txt += f" (T video {p['t_video']:.2f}, audio {p['t_audio']:.2f})"
        return txt

    if "folds" in chosen:
        return "per fold: " + "; ".join(one(p) for p in chosen["folds"])
    return one(chosen)


_ID_COUNTS = ("matched", "missing", "extra", "duplicates")  # IdMatch.counts() keys


def write_fusion_report(folder: Path, figures: dict[str, Any]) -> tuple[Path, Path]:
    """Markdown + HTML report with three plots from ``fusion.json``-style ``figures``."""
    out = FusionLayout(folder)
    opt = figures["optimistic"]
    tag = " (OPTIMISTIC)" if opt else ""
    r = Report(f"Audio + video late fusion, split {figures['split']}{tag}")  # escaped there
    if opt:
        r.note(
            "the fusion weight was tuned on the very videos it is evaluated on "
            "(weight_selection=optimistic); these figures overstate what fusion gives on new "
            "videos. Use cross-validation or held-out data for a figure to publish."
        )
    counts = figures["counts"]
    sel = {
        "cv": f"{len(figures['chosen'].get('folds', []))}-fold cross-validation on the evaluated "
        "split: every video is fused with a weight chosen on the other folds",
        "heldout": "held-out videos (disjoint from the evaluated ones)",
        "optimistic": "the evaluated videos themselves (optimistic)",
    }[figures["weight_selection"]]
    r.paragraph(
        f"Method `{figures['method']}`; weights chosen on {sel}. "
        f"{counts['videos_fused']} videos fused, {counts['with_audio']} with audio; the "
        f"{counts['without_audio']} without audio keep their video-only scores and count in "
        "every **all videos** figure."
    )
    r.paragraph(f"Chosen: {describe_choice(figures['chosen'])}.")
    _fusion_metric_tables(r, figures["metrics"], opt)
    _fusion_accuracy_plots(r, out, figures)
    _fusion_class_gain(r, out, figures["per_class"])
    if "changed" in figures:
        changed_section(r, figures, out.root, out.audio_errors_plot)
    _fusion_alignment(r, counts)
    r.paragraph(f"Full figures: `{out.figures.name}`.")
    return r.write(out.report_md, out.report_html)


def _fusion_metric_tables(r: Report, metrics: dict[str, Any], opt: bool) -> None:
    """One table per scope (all videos, videos with audio) with the fused gains."""
    for scope, title in (("all", "All videos"), ("with_audio", "Videos with audio")):
        m = metrics[scope]
        rows = []
        for model in ("video", "audio", "fused"):
            rows.append(
                {
                    "model": model + (" (optimistic)" if opt and model == "fused" else ""),
                    "top-1 %": 100 * m[model]["top1"],
                    "top-5 %": 100 * m[model]["top5"],
                    "mean class %": 100 * m[model]["mean_class"],
                    "videos": m[model]["n"],
                }
            )
        gains = []
        for k in (1, 5):
            g, lo, hi = m[f"gain_top{k}"]
            gains.append(
                f"top-{k} gain {100 * g:+.2f} points (95% CI {100 * lo:+.2f} to {100 * hi:+.2f})"
            )
        r.heading(title)
        r.table(pd.DataFrame(rows))
        r.paragraph(
            "Fused minus video-only: " + "; ".join(gains) + ". Paired bootstrap over videos."
        )
        if scope == "all" and m["audio"]["n"]:
            r.paragraph("Audio-only on all videos counts a video without audio as a miss.")


def _fusion_accuracy_plots(r: Report, out: FusionLayout, figures: dict[str, Any]) -> None:
    """The accuracy bars and the accuracy-against-weight curves."""
    m = figures["metrics"]["all"]
    vals = {
        f"top-{k}": {model: 100 * m[model][f"top{k}"] for model in ("video", "audio", "fused")}
        for k in (1, 5)
    }
    ci = {f"top-{k}": tuple(100 * x for x in m[f"gain_top{k}"]) for k in (1, 5)}
    bars = plot_accuracy_bars(vals, out.accuracy_plot, ci)  # type: ignore[arg-type]
    r.heading("Accuracy")
    r.image(bars, "video-only, audio-only and fused accuracy, all videos; gain with 95% CI")

    cv = figures["curve"]
    curves = {
        "all videos": np.asarray(cv["top1_all"]),
        "videos with audio": np.asarray(cv["top1_with_audio"]),
    }
    if cv.get("heldout_top1"):
        curves["held-out videos (chose the weight)"] = np.asarray(cv["heldout_top1"])
    ch = figures["chosen"]
    marks = [f["weight"] for f in ch.get("folds", []) if "weight" in f] or (
        [ch["weight"]] if "weight" in ch else []
    )
    png = plot_weight_curve(
        np.asarray(cv["weights"]),
        curves,
        out.weight_curve_plot,
        marks,
        title=f"top-1 against the audio weight ({cv['method']})",
    )
    r.heading("Accuracy against the audio weight")
    r.paragraph(
        "Curves over the evaluated videos, for diagnosis only: reading the best weight off "
        "them would be tuning on the test videos. Dotted lines: the weight(s) actually used"
        + (" (one per fold)." if ch.get("folds") else ".")
        + (
            f" `{figures['method']}` fits a model, not one weight; the curve shows "
            f"`{cv['method']}`."
            if figures["method"] != cv["method"]
            else ""
        )
    )
    r.image(png, "top-1 accuracy against the audio weight")


def _fusion_class_gain(r: Report, out: FusionLayout, pc: dict[str, Any]) -> None:
    """Per-class top-1 change (plot + the 10 best and 10 worst classes), if any class has videos."""
    n = np.asarray(pc["n"])
    present = n > 0
    cls = [c for c, k in zip(pc["classes"], present, strict=True) if k]
    vt = np.asarray([x for x, k in zip(pc["video_top1"], present, strict=True) if k], float)
    ft = np.asarray([x for x, k in zip(pc["fused_top1"], present, strict=True) if k], float)
    gain = 100 * (ft - vt)
    if not len(cls):
        return
    png = plot_class_gain(cls, gain, out.class_gain_plot, counts=[int(k) for k in n[present]])
    r.heading("Classes that gain and lose most from audio")
    r.image(png, "per-class top-1 change, fused minus video-only (points)")
    order = np.argsort(-gain, kind="stable")
    pick = list(order[:10]) + [i for i in order[::-1][:10] if i not in order[:10]]
    r.table(
        pd.DataFrame(
            {
                "class": [cls[i] for i in pick],
                "videos": [int(n[present][i]) for i in pick],
                "video top-1 %": [100 * vt[i] for i in pick],
                "fused top-1 %": [100 * ft[i] for i in pick],
                "gain": [gain[i] for i in pick],
            }
        )
    )


def _fusion_alignment(r: Report, counts: dict[str, Any]) -> None:
    """How the rows and class columns of both score files were matched."""
    r.heading("Alignment")
    r.table(
        pd.DataFrame(
            [
                {"side": side, **{k: counts[side]["ids"][k] for k in _ID_COUNTS}}
                for side in ("video", "audio")
            ]
        )
    )
    v = counts["video"]
    r.paragraph(
        f"Video scores read as {code(v['kind'])} from {code(v['source'])}; class columns "
        + (
            "matched by name"
            if v["classes"]["by_name"]
            else "**assumed** to be in class-list order (the file does not name them; "
            "give --video-label-map to be sure)"
        )
        + f" ({v['classes']['missing']} missing, {v['classes']['extra']} unknown). "
        f"{counts['not_on_disk_without_video_scores']} videos of the split are not on disk and "
        "have no video scores; they are left out."
    )


# --------------------------------------------------------------------------- what audio changed

_KIND_TEXT = {"fixed": "fixed by audio", "broken": "broken by audio", "changed": "still wrong"}


def _top_text(top: list[list[Any]] | None) -> str:
    if not top:
        return "no audio"
    return " · ".join(f"{name} {p:.2f}" for name, p in top)


def plot_audio_errors(errors: Mapping[str, Any], png: str | Path) -> Path:
    """Confusion counts of audio-only errors: true class (rows) against predicted (columns),
    for the classes with most errors (``audio_error_matrix`` of :mod:`avfuse.fuse`)."""
    names = list(errors["classes"])
    m = np.asarray(errors["matrix"], dtype=float).reshape(len(names), len(names) + 1)
    size = 2.5 + 0.45 * len(names)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Oranges", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="videos")
    for (i, j), val in np.ndenumerate(m):
        if val:
            ax.text(j, i, f"{int(val)}", ha="center", va="center", fontsize=8)
    short = [n if len(n) <= 22 else n[:21] + "…" for n in names]
    ax.set_xticks(range(len(names) + 1), [*short, "other"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), short, fontsize=8)
    ax.set_xlabel("audio model's top-1")
    ax.set_ylabel("true class")
    ax.set_title("audio-only errors, classes with most of them", fontsize=10)
    return _save(fig, png)


def changed_section(
    r: Report, figures: Mapping[str, Any], fusion_dir: Path, errors_png: Path
) -> None:
    """'What audio changed': the videos whose fused top-1 differs from the video model's, with
    a player of each sound track where ``fusion.json``'s rows name an excerpt in
    ``fusion_dir``, and the audio-only confusions (a PNG written to ``errors_png``)."""
    ch = figures["changed"]
    counts = ch["counts"]
    rows = ch["rows"]
    r.heading("What audio changed")
    with_links = any(row.get("audio_file") for row in rows)
    r.paragraph(
        f"Of the evaluated videos, audio **fixed {counts['fixed']}** (the video model was wrong, "
        f"fusion is right), **broke {counts['broken']}** (the reverse) and moved "
        f"{counts['changed']} from one wrong class to another. Listed: {len(rows)} of them "
        f"(at most {ch.get('limit', len(rows))} of each kind), fixed first, each kind by the "
        "fused decision's confidence; top-3 classes with their probabilities. "
        + (
            "Each sound is a short excerpt of the video's track (Ogg Opus, in `audio/` beside "
            "the fusion report)."
            if with_links
            else "Audio excerpts are not included."
        )
    )
    if rows:
        cols = ["video", "true class", "change"]
        cols += ["sound"] if with_links else []
        cols += ["video top-3", "audio top-3", "fused top-3"]
        table = []
        for row in rows:
            cells: list[Any] = [row["video_id"], row["true"], _KIND_TEXT.get(row["kind"], "")]
            if with_links:
                f = row.get("audio_file")
                cells.append(Audio(fusion_dir / f) if f else "no excerpt")
            cells += [_top_text(row["video"]), _top_text(row["audio"]), _top_text(row["fused"])]
            table.append(cells)
        r.media_table(cols, table)
    errors = figures.get("audio_errors") or {}
    if errors.get("classes"):
        png = plot_audio_errors(errors, errors_png)
        r.image(png, "audio-only errors: true class against the audio model's top-1")
