"""The markdown report a person opens in the Prefect UI after a job: the numbers, where to look, and why records
failed (grouped by error_type, first failure of each, most common first)."""

from __future__ import annotations

import pytest

from flows.monitoring import job_report
from modalkit.iomodel import ChunkResult, JobSummary


def summary(**kw: object) -> JobSummary:
    fields: dict[str, object] = {
        "job_id": "abc123", "records": 1000, "succeeded": 990, "failed": 10, "chunks": 3, "chunks_skipped": 1,
        "seconds": 12.5, "records_per_s": 80.0, "output_uri": "s3://b/scored/2026-11-20", "failure_rate": 0.01,
        "input_uri": "s3://b/reviews/2026-11-20/", "model_name": "sentiment",
    }  # fmt: skip
    fields.update(kw)
    return JobSummary(**fields)  # type: ignore[arg-type]


def test_the_report_shows_counts_rate_throughput_wall_time_and_where_the_output_and_failures_are() -> None:
    text = job_report(summary(), [], [], 0.05)
    assert text.startswith("# Batch job `abc123`: completed\n")
    for cell in ("| records | 1,000 |", "| succeeded | 990 |", "| failed | 10 (1.00%; the job fails over 5.00%) |",
                 "| chunks | 3 (1 committed by an earlier run) |", "| throughput | 80 records/s |",
                 "| wall time | 12.5 s |", "| input | `s3://b/reviews/2026-11-20/` |",
                 "| output | `s3://b/scored/2026-11-20` (manifest: `s3://b/scored/2026-11-20/_manifest.json`) |",
                 "| failures | `s3://b/scored/2026-11-20/_failures/` |", "| model | `sentiment` |"):  # fmt: skip
        assert cell in text


def test_the_report_of_a_job_without_failures_points_at_no_failures_folder() -> None:
    text = job_report(summary(succeeded=1000, failed=0, failure_rate=0.0), [], [], 0.05)
    assert "| failures | none (no `_failures/` written) |" in text
    assert "s3://b/scored/2026-11-20/_failures/" not in text


def test_failures_are_grouped_by_error_type_across_chunks_most_common_first_with_the_first_failure_of_each() -> None:
    results = [
        ChunkResult(index=1, errors_by_type={"ValidationError": 2, "ValueError": 5},
                    error_examples={"ValidationError": "validate: line 9: text: Field required",
                                    "ValueError": "predict: line 3: bad | token"}),
        ChunkResult(index=0, errors_by_type={"ValidationError": 3},
                    error_examples={"ValidationError": "validate: line 1: id: Input should be an integer"}),
    ]  # fmt: skip
    text = job_report(summary(), results, [], 0.05)
    table = text.split("## Failures by error type\n", 1)[1].strip().splitlines()
    assert table[2:] == [
        "| `ValidationError` | 5 | validate: line 1: id: Input should be an integer |",  # chunk 0's comes first
        "| `ValueError` | 5 | predict: line 3: bad \\| token |",
    ]


def test_a_failed_job_says_so_and_lists_the_chunks_that_failed_for_good() -> None:
    text = job_report(summary(), [], [(4, OSError("s3 unreachable\nafter 3 tries"))], 0.05)
    assert text.startswith("# Batch job `abc123`: failed\n")
    assert "- chunk 00004: `s3 unreachable after 3 tries`" in text


def test_only_the_five_most_common_error_types_are_listed_and_the_rest_counted() -> None:
    counts = {f"E{i}": 10 - i for i in range(8)}
    text = job_report(summary(), [ChunkResult(index=0, errors_by_type=counts)], [], 0.05)
    assert "| `E4` | 6 |" in text
    assert "`E5`" not in text
    assert "| (3 more types) | | see the failures folder |" in text


def test_the_report_names_the_ids_that_occur_more_than_once_with_their_files_and_positions() -> None:
    repeats = [
        {
            "record_id": 0,
            "count": 2,
            "occurrences": [{"key": "x.jsonl", "position": 0}, {"key": "y.jsonl", "position": 0}],
        },
        {"record_id": "a|b", "count": 7, "occurrences": [{"key": "x.jsonl", "position": 40}] * 5},
    ]
    text = job_report(summary(duplicate_ids=2, duplicate_examples=repeats), [], [], 0.05)
    section = text.split("## 2 id(s) occur more than once\n", 1)[1]
    assert "| `0` | 2 | x.jsonl at 0, y.jsonl at 0 |" in section
    assert (
        "| `a\\|b` | 7 | x.jsonl at 40, x.jsonl at 40, x.jsonl at 40, x.jsonl at 40, x.jsonl at 40 and 2 more |"
        in section
    )


def test_a_job_without_repeated_ids_has_no_repeats_section() -> None:
    assert "more than once" not in job_report(summary(), [], [], 0.05)


def test_the_cli_table_names_the_repeated_ids(capsys: pytest.CaptureFixture[str]) -> None:
    from modalkit.cli import _print_summary

    repeats = [{"record_id": 0, "count": 2, "occurrences": [{"key": "x.jsonl", "position": 0},
                                                            {"key": "y.jsonl", "position": 0}]}]  # fmt: skip
    _print_summary(summary(duplicate_ids=5, duplicate_examples=repeats).model_dump())
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicate_ids" in out
    assert "5 ids occur more than once: 0 (x.jsonl at 0, y.jsonl at 0)" in out.replace("│ ", "").replace(" │", "")
