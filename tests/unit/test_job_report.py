"""The markdown report a person opens in the Prefect UI after a job: the numbers, where to look, and why records
failed (grouped by error_type, first failure of each, most common first)."""

from __future__ import annotations

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
