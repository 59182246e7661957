"""Where a job's time went: the chunks' stage seconds summed into the summary and the manifest (chunks run now and
chunks committed by an earlier run alike, untimed chunks left out), the device's busy share, the bottleneck named
with what to do, and the lines the report and the CLI table show (none for a job whose workers did not time)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import orjson
import pytest

from flows.monitoring import job_report
from modalkit.batch import timings as timings_module
from modalkit.batch.chunk import marker_identity
from modalkit.batch.job import JobPlan, finalize_job, find_committed
from modalkit.batch.layout import OutputLayout
from modalkit.batch.timings import DEVICE_BOUND, STAGES, find_bottleneck, sum_stages
from modalkit.iomodel import ByteRange, ChunkResult, ChunkSpec, JobSpec, JobSummary, StageSeconds

JOB_ID = "job0123456789abc"


def timed(index: int, seconds: float, skipped: bool = False, **stages: float) -> ChunkResult:
    """A chunk's result as a timing worker reports it: ``seconds`` of wall, the stages' seconds given."""
    busy = stages.get("predict", 0.0) / seconds if seconds else 0.0
    return ChunkResult(index=index, records=10, succeeded=10, seconds=seconds, skipped=skipped,
                       stages=StageSeconds(**stages, device_busy=busy))  # fmt: skip


def untimed(index: int, seconds: float = 5.0) -> ChunkResult:
    """A chunk's result from a worker that does not time its stages (an older Modal worker)."""
    return ChunkResult(index=index, records=10, succeeded=10, seconds=seconds)


def plan_of(tmp_path: Path, chunks: int) -> JobPlan:
    job = JobSpec(job_id=JOB_ID, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_name="m")
    specs = [ChunkSpec(job_id=JOB_ID, index=i, uri=f"{i}.jsonl", key=f"{i}.jsonl", format="jsonl",
                       extent=ByteRange()) for i in range(chunks)]  # fmt: skip
    return JobPlan(job=job, chunks=specs, total_bytes=0)


# --- summing --------------------------------------------------------------------------------------------------


def test_the_job_sums_each_stage_over_its_chunks_and_its_device_busy_share_is_all_predict_over_all_chunk_seconds() -> (
    None
):
    results = [
        timed(0, 4.0, read=0.5, parse=1.0, predict=2.0, write=0.25),
        timed(1, 6.0, read=0.5, parse=2.0, preprocess=0.5, predict=3.0, postprocess=0.25, queue=0.125),
    ]

    timings = sum_stages(results)

    assert timings is not None
    assert timings.stages.model_dump() == {
        "read": 1.0, "parse": 3.0, "preprocess": 0.5, "predict": 5.0, "postprocess": 0.25, "write": 0.25,
        "queue": 0.125, "device_busy": 0.5,  # 5 s of predict over 10 s of chunks, not the mean of 0.5 and 0.5
    }  # fmt: skip
    assert (timings.chunk_seconds, timings.timed_chunks) == (10.0, 2)


def test_the_busy_share_weighs_each_chunk_by_its_seconds_not_each_chunk_alike() -> None:
    timings = sum_stages([timed(0, 1.0, predict=1.0), timed(1, 9.0, predict=0.0)])

    assert timings is not None
    assert timings.stages.device_busy == pytest.approx(0.1)  # the mean of the chunks' shares would say 0.5


def test_chunks_committed_by_an_earlier_run_count_as_the_chunks_run_now_do() -> None:
    timings = sum_stages([timed(0, 2.0, skipped=True, predict=1.0, read=0.5), timed(1, 2.0, predict=1.5)])

    assert timings is not None
    assert (timings.stages.predict, timings.stages.read, timings.timed_chunks) == (2.5, 0.5, 2)


def test_untimed_chunks_are_left_out_of_the_sums_and_out_of_the_busy_share() -> None:
    timings = sum_stages([untimed(0, seconds=100.0), timed(1, 4.0, predict=3.0), untimed(2)])

    assert timings is not None
    assert timings.timed_chunks == 1
    assert timings.chunk_seconds == 4.0  # the untimed chunks' 105 s are not the device's idle time
    assert timings.stages.device_busy == 0.75


def test_the_examples_in_timings_run() -> None:
    assert doctest.testmod(timings_module).failed == 0


def test_a_job_whose_workers_do_not_time_has_no_timings() -> None:
    assert sum_stages([untimed(0), untimed(1, seconds=0.0)]) is None
    assert sum_stages([]) is None


# --- the bottleneck -------------------------------------------------------------------------------------------


def test_a_device_busy_most_of_the_time_is_the_bottleneck_and_more_host_cores_would_not_help() -> None:
    stages = StageSeconds(read=0.1, parse=0.5, predict=9.0, write=0.1, device_busy=0.9)

    found = find_bottleneck(stages, 10.0)

    assert found is not None
    assert found.kind == "device"
    assert found.note.startswith("device: busy 90% of the chunks' time")
    assert "more host cores would not" in found.note


def test_a_device_that_waited_names_the_slowest_host_stage_with_its_share_and_what_to_raise() -> None:
    stages = StageSeconds(read=0.5, parse=3.8, preprocess=1.0, predict=4.6, postprocess=0.4, write=0.2, queue=0.1,
                          device_busy=0.46)  # fmt: skip

    found = find_bottleneck(stages, 10.0)

    assert found is not None
    assert (found.kind, found.stage) == ("host", "parse")
    assert found.note.startswith("host: the device waited 54% of the chunks' time; the slowest host stage is parse "
                                 "(3.80 s, 38% of the chunks' time): ")  # fmt: skip
    assert "job_config.prefetch_batches" in found.note  # the setting that overlaps a host stage with predict


def test_a_job_slowest_at_reading_is_told_to_read_further_ahead() -> None:
    found = find_bottleneck(StageSeconds(read=5.0, parse=1.0, predict=2.0, device_busy=0.2), 10.0)

    assert found is not None
    assert (found.kind, found.stage) == ("host", "read")
    assert "prefetch" in found.note


def test_the_device_is_the_bottleneck_from_the_stated_busy_share_up() -> None:
    assert find_bottleneck(StageSeconds(predict=8.0, device_busy=DEVICE_BOUND), 10.0).kind == "device"  # type: ignore[union-attr]
    below = StageSeconds(parse=2.1, predict=7.9, device_busy=DEVICE_BOUND - 0.01)
    assert find_bottleneck(below, 10.0).kind == "host"  # type: ignore[union-attr]


def test_chunks_that_took_no_time_name_no_bottleneck() -> None:
    assert find_bottleneck(StageSeconds(), 0.0) is None


# --- the summary and the manifest -----------------------------------------------------------------------------


def test_the_summary_and_the_manifest_carry_the_stage_seconds_busy_share_and_bottleneck(tmp_path: Path) -> None:
    results = [timed(0, 4.0, read=0.4, parse=1.6, predict=1.8, write=0.2),
               timed(1, 6.0, read=0.6, parse=2.4, predict=2.8, queue=0.2), untimed(2)]  # fmt: skip

    summary = finalize_job(plan_of(tmp_path, 3), results, 7.0)

    assert summary.stage_seconds == {"read": 1.0, "parse": 4.0, "preprocess": 0.0, "predict": 4.6, "postprocess": 0.0,
                                     "write": 0.2, "queue": 0.2}  # fmt: skip
    assert list(summary.stage_seconds) == list(STAGES)
    assert summary.device_busy_fraction == 0.46
    assert (summary.chunk_seconds, summary.timed_chunks) == (10.0, 2)
    assert summary.bottleneck == "host"
    assert summary.bottleneck_note is not None
    assert "slowest host stage is parse" in summary.bottleneck_note
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_bytes())
    assert {k: manifest[k] for k in ("stage_seconds", "device_busy_fraction", "bottleneck", "timed_chunks")} == {
        "stage_seconds": summary.stage_seconds, "device_busy_fraction": 0.46, "bottleneck": "host", "timed_chunks": 2,
    }  # fmt: skip


def test_the_manifest_stays_the_same_size_however_many_chunks_were_timed(tmp_path: Path) -> None:
    few = finalize_job(plan_of(tmp_path / "a", 2), [timed(i, 2.0, predict=1.0) for i in range(2)], 1.0)
    many = finalize_job(plan_of(tmp_path / "b", 2000), [timed(i, 2.0, predict=1.0) for i in range(2000)], 1.0)

    assert (few.timed_chunks, many.timed_chunks) == (2, 2000)
    sizes = [len((tmp_path / p / "out" / "_manifest.json").read_bytes()) for p in ("a", "b")]
    assert sizes[1] - sizes[0] < 200  # the same keys; only the figures grow a digit or two


def test_a_summary_of_untimed_chunks_has_no_timings_and_says_nothing_of_a_bottleneck(tmp_path: Path) -> None:
    summary = finalize_job(plan_of(tmp_path, 2), [untimed(0), untimed(1)], 1.0)

    assert (summary.stage_seconds, summary.device_busy_fraction, summary.bottleneck) == (None, None, None)
    assert (summary.bottleneck_note, summary.timed_chunks) == (None, 0)
    assert json.loads((tmp_path / "out" / "_manifest.json").read_bytes())["stage_seconds"] is None


def test_a_resumed_job_sums_the_stages_its_committed_markers_recorded(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, 3)
    layout = OutputLayout(plan.job.output_uri)
    committed = {0: timed(0, 3.0, predict=2.0, parse=0.5), 1: untimed(1)}  # 1: a marker of an older worker
    for index, result in committed.items():
        marker = {**marker_identity(JOB_ID, plan.chunks[index]), **result.model_dump()}
        Path(layout.marker(index)).parent.mkdir(parents=True, exist_ok=True)
        Path(layout.marker(index)).write_bytes(orjson.dumps(marker))

    done = find_committed(plan)
    summary = finalize_job(plan, [*done.values(), timed(2, 1.0, predict=0.5)], 2.0)

    assert summary.chunks_skipped == 2
    assert summary.stage_seconds is not None
    assert (summary.stage_seconds["predict"], summary.stage_seconds["parse"]) == (2.5, 0.5)
    assert (summary.timed_chunks, summary.chunk_seconds, summary.device_busy_fraction) == (2, 4.0, 0.625)


# --- what the report and the CLI table show -------------------------------------------------------------------


def summary_with(tmp_path: Path, *results: ChunkResult) -> JobSummary:
    return finalize_job(plan_of(tmp_path, len(results)), list(results), 5.0)


def test_the_report_shows_where_the_time_went_stage_by_stage_the_busy_share_and_the_bottleneck(
    tmp_path: Path,
) -> None:
    summary = summary_with(tmp_path, timed(0, 10.0, read=0.5, parse=3.8, preprocess=1.0, predict=4.6,
                                           postprocess=0.4, write=0.2, queue=0.1))  # fmt: skip

    text = job_report(summary, [], [], 0.05)

    section = text.split("## Where the time went\n", 1)[1]
    assert "The device was busy 46% of the chunks' 10.0 s." in section
    assert "| stage | seconds | share of the chunks' time |" in section
    assert "| parse | 3.80 | 38% |" in section
    assert "| predict (device) | 4.60 | 46% |" in section
    assert "**Bottleneck:** host: the device waited 54% of the chunks' time; the slowest host stage is parse" in section


def test_the_report_of_an_untimed_job_has_no_timing_section(tmp_path: Path) -> None:
    text = job_report(summary_with(tmp_path, untimed(0)), [], [], 0.05)

    assert "Where the time went" not in text
    assert "Bottleneck" not in text
    assert "device" not in text


def cli_table(summary: JobSummary, capsys: pytest.CaptureFixture[str]) -> str:
    from modalkit.cli import _print_summary

    _print_summary(summary.model_dump())
    return " ".join(capsys.readouterr().out.replace("│", " ").split())


def test_the_cli_table_says_where_the_time_went_how_busy_the_device_was_and_the_bottleneck(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = summary_with(tmp_path, timed(0, 10.0, read=0.5, parse=1.0, predict=8.5))

    out = cli_table(summary, capsys)

    assert "where the time went predict 8.50 s (85%), parse 1.00 s (10%), read 0.50 s (5%)" in out
    assert "device busy 85% of the chunks' 10.0 s" in out
    assert "bottleneck device: busy 85% of the chunks' time" in out


def test_the_cli_table_of_an_untimed_job_has_no_timing_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_table(summary_with(tmp_path, untimed(0)), capsys)

    assert "records" in out
    assert "where the time went" not in out
    assert "device busy" not in out
    assert "bottleneck" not in out


def test_the_cli_table_says_how_many_chunks_the_timings_cover_when_some_were_not_timed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = cli_table(summary_with(tmp_path, timed(0, 2.0, predict=1.0), untimed(1)), capsys)

    assert "device busy 50% of the chunks' 2.0 s (1 of 2 chunks timed)" in out


def test_the_summary_table_in_prefect_has_no_timing_rows_for_an_untimed_job_and_readable_ones_for_a_timed_one(
    tmp_path: Path,
) -> None:
    from flows.monitoring import summary_rows

    untimed_rows = {row["field"]: row["value"] for row in summary_rows(summary_with(tmp_path / "a", untimed(0)), [])}
    timed_rows = summary_rows(summary_with(tmp_path / "b", timed(0, 10.0, parse=1.0, predict=8.5)), [])

    assert "records" in untimed_rows
    assert not {"stage_seconds", "device_busy_fraction", "chunk_seconds", "timed_chunks", "bottleneck"} & set(
        untimed_rows
    )
    fields = {row["field"]: row["value"] for row in timed_rows}
    assert fields["stage_seconds"] == (
        "read 0.00 s, parse 1.00 s, preprocess 0.00 s, predict 8.50 s, postprocess 0.00 s, write 0.00 s, queue 0.00 s"
    )
    assert (fields["device_busy_fraction"], fields["bottleneck"]) == ("0.85", "device")
