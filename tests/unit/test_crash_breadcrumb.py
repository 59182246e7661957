"""The breadcrumb a worker leaves before each pipeline call names exactly the records in flight, however they are
spread, and its size does not grow with a sub-batch's records when they are consecutive (it is rewritten twice per
sub-batch, so a per-record cost there is paid by every record of every job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalkit.batch.crashes import CrashLog, CrashPlan, CrashTracker, read_breadcrumb, spans


@pytest.mark.parametrize(
    "positions",
    [[], [7], [0, 1, 2, 3], list(range(256, 512)), [1, 3, 5], [0, 1, 2, 9, 10, 40], [*range(10), 12]],
)
def test_the_breadcrumb_reads_back_exactly_the_positions_written(tmp_path: Path, positions: list[int]) -> None:
    log = CrashLog(CrashPlan(str(tmp_path / "crumb")))
    log.note("batch", positions)
    log.close()
    assert read_breadcrumb(str(tmp_path / "crumb")) == ("batch", tuple(positions))


def test_a_run_of_consecutive_records_is_written_as_one_span_whatever_its_length() -> None:
    assert spans(range(0, 10_000)) == "0-9999"
    assert spans([5]) == "5"
    assert spans([1, 2, 4]) == "1-2 4"


def test_several_sub_batches_in_flight_read_back_as_all_their_records(tmp_path: Path) -> None:
    log = CrashLog(CrashPlan(str(tmp_path / "crumb")))
    log.note_spans("batch", " ".join([spans(range(0, 256)), spans([256, 258]), spans(range(512, 768))]))
    log.close()
    tracker = CrashTracker(str(tmp_path / "crumb"))
    assert read_breadcrumb(tracker.breadcrumb) == ("batch", (*range(0, 256), 256, 258, *range(512, 768)))


def test_a_breadcrumb_that_is_not_one_reads_as_nothing_in_flight(tmp_path: Path) -> None:
    (tmp_path / "crumb").write_bytes(b"batch 1-x\n")
    assert read_breadcrumb(str(tmp_path / "crumb")) is None
