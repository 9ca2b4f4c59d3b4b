"""What a run reports: ``WORK/report.md`` / ``report.html``, and the result
:func:`avfuse.pipeline.run` returns, whose :meth:`RunResult.summary` ``avfuse run`` prints.

Both are read back from the files the stages wrote (the manifest and stage tables, the training
metrics, the metrics files of ``evaluate`` and ``fuse``), so a skipped stage reports as a
finished one does.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from avfuse.io import read_json
from avfuse.runconfig import StageConfigs, fusion_dir, metrics_path
from avfuse.workdir import WorkDir


@dataclass
class StageOutcome:
    """One stage of a run: what happened to it, in how long, and what it said."""

    name: str
    status: str  # ran | skipped | resumed | not configured | not run
    seconds: float = 0.0
    detail: str = ""  # one line for the summary table
    summary: str = ""  # the stage's own summary (what its command prints); "" when it did not run


@dataclass
class RunResult:
    """What :func:`avfuse.pipeline.run` did and where the results are."""

    work: Path
    stages: list[StageOutcome]
    report: Path | None
    fusion_report: Path | None
    status_counts: dict[str, dict[str, int]]  # stage column -> status -> count
    accuracy: dict[str, dict[str, float]]  # scope -> model -> top-1
    gain: dict[str, list[float]]  # scope -> [gain, low, high]

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status in ("ran", "resumed")]

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]

    def summary(self) -> str:
        """The summary of each stage that ran, in order, then the run's table and figures."""
        lines = [s.summary for s in self.stages if s.summary]
        lines += [f"avfuse run -> {self.work}", f"  {'stage':<10}{'status':<16}{'time':>8}  detail"]
        for s in self.stages:
            t = f"{s.seconds:.1f}s" if s.status in ("ran", "resumed") else ""
            lines.append(f"  {s.name:<10}{s.status:<16}{t:>8}  {s.detail}")
        for col, title in (("status", "extract"), ("feature_status", "features")):
            counts = self.status_counts.get(col)
            if counts:
                lines.append(f"  videos by {title} status: {by_count(counts)}")
        if self.accuracy:
            lines.append(f"  {'top-1 %':<26}{'video':>8}{'audio':>8}{'fused':>8}  gain (95% CI)")
            for scope, acc in self.accuracy.items():
                g = self.gain.get(scope)
                gtxt = f"{100 * g[0]:+.1f} [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]" if g else ""
                lines.append(
                    f"  {scope:<26}"
                    + "".join(
                        f"{100 * acc[m]:>8.1f}" if m in acc else f"{'-':>8}"
                        for m in ("video", "audio", "fused")
                    )
                    + f"  {gtxt}"
                )
        if self.report:
            fusion = ""
            if self.fusion_report:
                fusion = f" (fusion details: {self.fusion_report})"
            elif any(s.name == "fuse" and s.status == "not configured" for s in self.stages):
                fusion = "; fusion: not configured (set fuse.video_scores)"
            lines.append(f"  report: {self.report}{fusion}")
        return "\n".join(lines)


def by_count(counts: dict[str, int]) -> str:
    """``"ok 40, no_audio 2"``: statuses, most frequent first."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))


# fusion.json's metric scopes and how the reports name them.
FUSION_SCOPES = (("all", "all videos"), ("with_audio", "videos with audio"))


def fusion_figures(sc: StageConfigs) -> dict[str, Any] | None:
    if sc.fuse is None:
        return None
    path = fusion_dir(sc.fuse).figures
    return read_json(path) if path.exists() else None


def outputs(work: Path) -> list[Path]:
    """The files the run report leaves: ``WORK/report.md`` and ``WORK/report.html``."""
    return [WorkDir(work).report_md, WorkDir(work).report_html]


def write_run_report(sc: StageConfigs) -> tuple[Path, Path]:
    """``WORK/report.md`` + ``.html``: stage outcomes, training curves, audio and fused results."""
    import pandas as pd

    from avfuse import report as rp
    from avfuse.manifest import load_manifest

    work = Path(sc.scan.work)
    wd = WorkDir(work)
    wd.figures.mkdir(parents=True, exist_ok=True)
    r = rp.Report("avfuse run report")
    man = load_manifest(work)
    r.paragraph(
        f"Dataset {rp.code(sc.scan.root)}, work folder {rp.code(work)}: {len(man)} videos, "
        f"{man['label'].nunique()} classes. Settings of this run: `{wd.run_settings.name}`."
    )

    r.heading("Stage outcomes")
    table = rp.status_table(man)
    r.table(table)
    r.image(rp.plot_status_counts(table, wd.status_counts_plot), "videos per stage status")
    bad = man[man.get("status", pd.Series("ok", index=man.index)).astype(str) != "ok"]
    if len(bad) and "reason" in bad:
        r.paragraph("Videos whose sound track could not be used (first 10):")
        r.table(bad[["video_id", "status", "reason"]].head(10))

    metrics = wd.run_metrics(sc.train.name)
    if metrics.exists():
        r.heading("Audio model training")
        chosen = _selection_split(metrics)
        r.paragraph(
            f"Model {rp.code(sc.train.model)}, {sc.train.epochs} epochs; run folder "
            f"{rp.code(wd.run(sc.train.name).relative_to(wd.root).as_posix())} (TensorBoard: "
            f"{rp.code(f'tensorboard --logdir {wd.runs}')}). "
            + (
                f"The epoch kept in `best.pt` was chosen on **{rp.lit(chosen)}**. "
                + _selection_details(metrics)
                if chosen
                else "No selection split: `best.pt` holds the last epoch."
            )
        )
        if chosen and chosen in sc.evaluate:
            r.note(
                f"The model was chosen on {rp.code(chosen)}: its {rp.code(chosen)} figures below are "
                "OPTIMISTIC (measured on the split that picked the epoch)."
            )
        r.image(rp.plot_training_curves(metrics, wd.training_curves_plot), "training curves")

    results = {}
    for split, ec in sc.evaluate.items():
        mp = metrics_path(ec)
        if mp.exists():
            results[split] = read_json(mp)
    if results:
        r.heading("Audio-only results")
        r.paragraph(
            "Over all videos of the split (a video without a score counts as a miss) and over "
            "the scored ones; mean class accuracy counts a class without a scored video as 0. "
            "The baseline (log-mel statistics, logistic regression, fitted on the videos the "
            "network trained on) is evaluated on the same videos."
        )
        r.table(rp.audio_results_table(results))
        choice = next((m["model_choice"] for m in results.values() if m.get("model_choice")), None)
        if choice:
            r.paragraph(_choice_paragraph(choice))

    fig = fusion_figures(sc)
    if fig is not None and sc.fuse is not None:
        out = fusion_dir(sc.fuse)
        r.heading("Audio + video fusion")
        for scope, title in FUSION_SCOPES:
            m = fig["metrics"][scope]
            g = m["gain_top1"]
            r.paragraph(
                f"**{title}** (n={m['fused']['n']}): top-1 video {100 * m['video']['top1']:.1f} %, "
                f"audio {100 * m['audio']['top1']:.1f} %, fused {100 * m['fused']['top1']:.1f} %; "
                f"gain {100 * g[0]:+.1f} points (95% CI {100 * g[1]:+.1f} to {100 * g[2]:+.1f})."
            )
        for png, cap in (
            (out.accuracy_plot, "video-only, audio-only and fused accuracy with the gain's 95% CI"),
            (out.class_gain_plot, "per-class top-1 change from adding audio"),
            (out.weight_curve_plot, "top-1 against the audio weight"),
        ):
            if png.exists():
                r.image(png, cap)
        if "changed" in fig:
            rp.changed_section(r, fig, out.root, wd.audio_errors_plot)
        r.paragraph(
            f"Details (alignment, chosen weights, classes): {rp.code(_rel(out.report_md, work))}."
        )
    return r.write(wd.report_md, wd.report_html)


def _choice_paragraph(choice: dict[str, Any]) -> str:
    """The audio model kept and why, with its selection-split figures."""
    cands = choice.get("candidates") or {}
    figs = ", ".join(
        f"{name} {100 * c['selection_top1']:.1f} %"
        for name, c in cands.items()
        if c.get("selection_top1") is not None
    )
    from avfuse.report import code, lit

    mode = choice.get("mode")
    text = (
        f"**Audio model kept: {lit(choice.get('chosen'))}** "
        f"({code(f'predict.model_choice = {mode}')}). "
    )
    if figs:
        text += (
            f"Top-1 on {code(choice.get('selection_split'))} ({choice.get('selection_videos')} videos, "
            f"the split that chose `best.pt`, never the evaluated one): {figs}; the ensemble's "
            "figure is cross-validated there. "
        )
    ens = choice.get("ensemble")
    if ens:
        text += (
            f"Ensemble: network weight {ens['weight_network']:.2f}, temperatures "
            f"{ens['temperature_network']:.2f} (network) and {ens['temperature_baseline']:.2f} "
            "(baseline). "
        )
    return text + f"Rule: {lit(choice.get('reason'))}."


def _selection_split(metrics_jsonl: Path) -> str:
    """The split that chose ``best.pt``, from the run's last metrics record (``val`` before
    runs recorded it)."""
    lines = [ln for ln in metrics_jsonl.read_text("utf-8").splitlines() if ln.strip()]
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        return str(rec.get("selection_split", "val"))
    return ""


def _selection_details(metrics_jsonl: Path) -> str:
    """The selection split's size, whether it saturated, the epoch kept and why (train's
    ``selection_n``, ``selection_saturated``, ``best_epoch``, ``best_reason`` records)."""
    recs = []
    for line in metrics_jsonl.read_text("utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            recs.append(json.loads(line))
    last = recs[-1] if recs else {}
    if "best_epoch" not in last:
        return ""  # a run from before these records
    sat = next((r["epoch"] for r in recs if r.get("selection_saturated")), None)
    return (
        f"It has {last['selection_n']} videos and "
        + (f"saturated (top-1 100 %) at epoch {sat}. " if sat else "did not saturate. ")
        + f"`best.pt` holds epoch {last['best_epoch']}: {last['best_reason']}."
    )


def _rel(p: Path, base: Path) -> str:
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


def status_counts(work: str | Path) -> dict[str, dict[str, int]]:
    """Videos of the manifest per extract ``status`` and per ``feature_status``.

    A video without a record counts as ``"not run"``. Reads only the ``video_id`` and status
    columns of each table: joining whole tables costs gigabytes at Kinetics scale.
    """
    wd = WorkDir(work)
    if not wd.manifest.exists():
        return {}
    counts: dict[str, dict[str, int]] = {}
    for path, col in ((wd.extract_table, "status"), (wd.features_table, "feature_status")):
        if not path.exists() or col not in pq.read_schema(path).names:
            continue
        vc = _counts_in_manifest_order(wd.manifest, path, col)
        if vc is None:  # another order or other videos: one look-up per record
            ids = pq.read_table(wd.manifest, columns=["video_id"]).column("video_id")
            t = pq.read_table(path, columns=["video_id", col])
            t = t.filter(pc.is_in(t.column("video_id"), value_set=ids))
            vc = _value_counts(t.column(col))
            unrecorded = len(ids) - len(t)
            if unrecorded:
                vc["not run"] = vc.get("not run", 0) + unrecorded
            del ids, t
        counts[col] = vc
    return counts


def _value_counts(column: Any, into: dict[str, int] | None = None) -> dict[str, int]:
    vc = {} if into is None else into
    status = pc.fill_null(column.cast("string"), "not run")
    for item in pc.value_counts(status).to_pylist():
        vc[str(item["values"])] = vc.get(str(item["values"]), 0) + int(item["counts"])
    return vc


def _counts_in_manifest_order(manifest: Path, table: Path, col: str) -> dict[str, int] | None:
    """Counts of ``col`` if ``table`` holds exactly the manifest's videos in its order (as the
    stages write it), streamed in blocks beside the manifest; ``None`` otherwise."""
    man, tab = pq.ParquetFile(manifest), pq.ParquetFile(table)
    if man.metadata.num_rows != tab.metadata.num_rows:
        return None
    vc: dict[str, int] = {}
    blocks = zip(
        man.iter_batches(batch_size=65536, columns=["video_id"]),
        tab.iter_batches(batch_size=65536, columns=["video_id", col]),
        strict=False,  # the row counts are equal: unequal blocks fail the comparison below
    )
    for a, b in blocks:
        if not a.column(0).equals(b.column(0)):
            return None
        _value_counts(b.column(1), vc)
    return vc


def run_result(work: Path, sc: StageConfigs, outcomes: list[StageOutcome]) -> RunResult:
    """What a run hands back: its stage outcomes, the report files, status counts and the fusion
    figures (read back from the files the stages wrote)."""
    counts = status_counts(work)
    accuracy: dict[str, dict[str, float]] = {}
    gain: dict[str, list[float]] = {}
    fig = fusion_figures(sc)
    if fig is not None:
        for scope, title in FUSION_SCOPES:
            m = fig["metrics"][scope]
            n = m["fused"]["n"]
            key = f"{title} (n={n})"
            accuracy[key] = {k: float(m[k]["top1"]) for k in ("video", "audio", "fused")}
            gain[key] = [float(x) for x in m["gain_top1"]]
    report = WorkDir(work).report_md
    fusion_report = None
    if sc.fuse is not None:
        fusion_report = fusion_dir(sc.fuse).report_md
    return RunResult(
        work,
        outcomes,
        report if report.exists() else None,
        fusion_report if fusion_report and fusion_report.exists() else None,
        counts,
        accuracy,
        gain,
    )
