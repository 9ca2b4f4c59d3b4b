"""The run's result and report: the console summary, and what the report reads back from the
training metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from avfuse.fuse import fuse
from avfuse.run_report import RunResult, StageOutcome, _selection_details, _selection_split
from avfuse.scores import ScoreFile
from tests.synthetic import make_synthetic_work
from tests.test_report import _assert_inert, _decoded_seconds, _render_markdown, make_work, parse


def _result(stages: list[StageOutcome]) -> RunResult:
    return RunResult(
        Path("w"),
        stages,
        report=Path("w/report.md"),
        fusion_report=None,
        status_counts={"status": {"ok": 3, "no_audio": 5}},
        accuracy={"all videos (n=4)": {"video": 0.5, "audio": 0.25, "fused": 0.75}},
        gain={"all videos (n=4)": [0.25, -0.125, 0.5]},
    )


def test_summary_is_each_stage_summary_in_order_then_the_table() -> None:
    stages = [
        StageOutcome("scan", "ran", 1.0, "4 videos"),
        StageOutcome("extract", "ran", 2.0, "ok 3", summary="EXTRACT SAYS\n  ok: 3"),
        StageOutcome("features", "skipped", detail="up to date"),
        StageOutcome("fuse", "resumed", 3.0, "fused", summary="FUSE SAYS"),
    ]
    lines = _result(stages).summary().splitlines()
    assert lines[:4] == ["EXTRACT SAYS", "  ok: 3", "FUSE SAYS", "avfuse run -> w"]
    table = lines[5:9]
    assert [ln.split()[:2] for ln in table] == [
        ["scan", "ran"],
        ["extract", "ran"],
        ["features", "skipped"],
        ["fuse", "resumed"],
    ]
    assert table[1].split()[2] == "2.0s" and "s" not in table[2].split()[2]
    # Statuses most frequent first; figures in percent, the gain with its interval.
    assert "  videos by extract status: no_audio 5, ok 3" in lines
    row = next(ln for ln in lines if ln.startswith("  all videos (n=4)"))
    assert row.split()[3:] == ["50.0", "25.0", "75.0", "+25.0", "[-12.5,", "+50.0]"]


def test_a_run_that_skipped_everything_prints_only_the_table() -> None:
    text = _result([StageOutcome("scan", "skipped", detail="up to date")]).summary()
    assert text.startswith("avfuse run -> w\n")


def _metrics(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", "utf-8")
    return path


def test_selection_split_is_the_last_records_and_val_for_older_runs(tmp_path: Path) -> None:
    recs = [{"epoch": 1, "selection_split": "heldout"}, {"epoch": 2, "selection_split": "dev"}]
    assert _selection_split(_metrics(tmp_path, recs)) == "dev"
    assert _selection_split(_metrics(tmp_path, [{"epoch": 1}])) == "val"
    assert _selection_split(_metrics(tmp_path, [])) == ""


def test_selection_details_name_the_epoch_kept_and_when_it_saturated(tmp_path: Path) -> None:
    recs = [
        {"epoch": 1, "selection_saturated": False},
        {"epoch": 2, "selection_saturated": True},
        {"epoch": 3, "selection_n": 12, "best_epoch": 2, "best_reason": "highest top-1"},
    ]
    text = _selection_details(_metrics(tmp_path, recs))
    assert "12 videos" in text and "saturated (top-1 100 %) at epoch 2" in text
    assert "`best.pt` holds epoch 2: highest top-1." in text
    assert _selection_details(_metrics(tmp_path, [{"epoch": 1}])) == ""  # an older run


def test_console_line_and_run_report_show_coverage_and_the_baseline(tmp_path: Path) -> None:
    from avfuse.pipeline import _run_evaluate
    from avfuse.run_report import write_run_report
    from avfuse.runconfig import RunConfig, stage_configs

    work = tmp_path / "w"
    man = make_synthetic_work(work, n_classes=2, videos_per_class=4, structured=False)
    rows = {}
    for r in man[man["split"] == "val"].itertuples(index=False):
        k = int(r.label_index)
        if r.video_id.endswith("v000"):
            rows[r.video_id] = (None, 0, "silent")
        else:
            s = np.full(2, 0.2, np.float32)
            s[k] = 0.8
            rows[r.video_id] = (s, 1, "ok")
    ScoreFile.from_rows(["class_00", "class_01"], rows).save(work / "scores" / "audio_val.npz")
    cfg = RunConfig(root=tmp_path, work=work)
    sc = stage_configs(cfg)
    detail, said = _run_evaluate(sc, False, False, None, cfg)
    assert "scored 6/8 videos" in said  # the stage's own summary, for the CLI to print
    assert detail.startswith("val scored 6/8: audio top-1 75.0% over all (100.0% over scored)")
    assert ", baseline " in detail
    md, _ = write_run_report(sc)
    text = md.read_text()
    assert "| val | audio model | 6 / 8 | 75.00 |" in text
    assert "| val | baseline (" in text


def test_run_summary_without_fusion_names_no_none() -> None:
    from avfuse.run_report import RunResult, StageOutcome

    empty: dict[str, Any] = {"status_counts": {}, "accuracy": {}, "gain": {}}
    report = Path("w/report.md")
    skipped = [StageOutcome("fuse", "not configured")]
    text = RunResult(Path("w"), skipped, report=report, fusion_report=None, **empty).summary()
    assert "None" not in text
    assert "report: w/report.md; fusion: not configured (set fuse.video_scores)" in text
    # Configured but not run this time (e.g. stop_after): nothing said about fusion.
    stopped = [StageOutcome("fuse", "not run")]
    text = RunResult(Path("w"), stopped, report=report, fusion_report=None, **empty).summary()
    assert "None" not in text and "fusion" not in text
    fused = Path("w/fusion/report.md")
    text = RunResult(Path("w"), [], report=report, fusion_report=fused, **empty).summary()
    assert "report: w/report.md (fusion details: w/fusion/report.md)" in text


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


def test_status_counts_match_a_full_join(tmp_path) -> None:
    from avfuse.io import write_table
    from avfuse.manifest import load_manifest
    from avfuse.run_report import status_counts

    ids = [f"v{i:03d}" for i in range(50)]
    write_table(pd.DataFrame({"video_id": ids, "split": "train"}), tmp_path / "manifest.parquet")
    rng = np.random.default_rng(0)
    ext_ids = [*ids[:45], "gone"]  # five never extracted, one no longer in the manifest
    write_table(
        pd.DataFrame(
            {"video_id": ext_ids, "status": rng.choice(["ok", "no_audio", "partial"], 46)}
        ),
        tmp_path / "extract.parquet",
    )
    write_table(
        pd.DataFrame({"video_id": ids[:30], "feature_status": ["ok"] * 28 + ["error"] * 2}),
        tmp_path / "features.parquet",
    )
    man = load_manifest(tmp_path)
    expected = {
        col: {str(k): int(v) for k, v in man[col].fillna("not run").value_counts().items()}
        for col in ("status", "feature_status")
    }
    assert status_counts(tmp_path) == expected
    assert expected["feature_status"]["not run"] == 20 and expected["status"]["not run"] == 5


@pytest.mark.parametrize("order", ["manifest order", "shuffled", "one replaced"])
def test_status_counts_streamed_in_manifest_order_match_a_full_join(tmp_path, order) -> None:
    """The block-wise path (a stage table in the manifest's order, over two blocks) and the
    look-up it falls back to give the full join's counts."""
    from avfuse.io import write_table
    from avfuse.manifest import load_manifest
    from avfuse.run_report import status_counts

    n = 70_000  # more than one 65,536-row block
    ids = [f"v{i:06d}" for i in range(n)]
    write_table(pd.DataFrame({"video_id": ids, "split": "train"}), tmp_path / "manifest.parquet")
    rng = np.random.default_rng(1)
    status = rng.choice(np.array(["ok", "no_audio", None], dtype=object), n)
    ext = pd.DataFrame({"video_id": ids, "status": status})
    if order == "shuffled":
        ext = ext.sample(frac=1.0, random_state=0)
    elif order == "one replaced":
        ext.loc[n - 1, "video_id"] = "not-in-the-manifest"
    write_table(ext, tmp_path / "extract.parquet")
    man = load_manifest(tmp_path)
    want = {str(k): int(v) for k, v in man["status"].fillna("not run").value_counts().items()}
    assert status_counts(tmp_path)["status"] == want
