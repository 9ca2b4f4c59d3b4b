"""The run's result and report: the console summary, and what the report reads back from the
training metrics."""

from __future__ import annotations

import json
from pathlib import Path

from avfuse.run_report import RunResult, StageOutcome, _selection_details, _selection_split


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
