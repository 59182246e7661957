"""Prefect task runs grow with the job's concurrency, not with its chunks; per-chunk retries stay.

The jobs run flow ``batch-inference`` on Prefect's test server with the real local worker pool (two spawned
processes), on one JSONL file cut into about 60 byte ranges of 64 KiB (the smallest chunk size). Transient and
permanent chunk failures are injected by a runner that wraps the real one (the ``ChunkRunner`` seam), as an S3
outage or a corrupt object would surface from it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from batch_support import assert_record_invariant, write_config

from flows.batch_inference import build_batch_flow
from modalkit.batch.layout import OutputLayout
from modalkit.exceptions import JobFailed, StorageError
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.runners import ChunkRunner, open_runner
from modalkit.settings import JobConfig, Settings

pytestmark = pytest.mark.slow

CONCURRENCY = 2


def write_big_file(folder: Path, n: int = 3600) -> list[str]:
    """One JSONL file of ``n`` reviews of about 1 KiB: ``n // 60`` chunks of 64 KiB. Returns the ids."""
    folder.mkdir()
    texts = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]
    ids = [f"r{i:05d}" for i in range(n)]
    lines = [
        json.dumps({"id": rid, "text": f"{texts[i % 3]} (review {i}) " + "filler " * 140}) for i, rid in enumerate(ids)
    ]
    (folder / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ids


class FlakyRunner:
    """The real runner, except that chunk ``index`` first raises ``errors`` (one per attempt, in order)."""

    def __init__(self, inner: ChunkRunner, index: int, errors: list[BaseException]) -> None:
        self.inner = inner
        self.slots = inner.slots
        self.index = index
        self.errors = list(errors)
        self.attempts: list[float] = []  # when each attempt of chunk ``index`` reached the runner
        self.chunks: list[int] = []
        self._lock = threading.Lock()

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        with self._lock:
            self.chunks.append(chunk.index)
            error = None
            if chunk.index == self.index:
                self.attempts.append(time.monotonic())
                error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return self.inner.run_chunk(job, chunk)

    def close(self) -> None:
        self.inner.close()

    def cancel(self) -> None:
        self.inner.cancel()


def flaky(index: int, errors: list[BaseException], made: list[FlakyRunner]) -> Any:
    def factory(settings: Settings, model_name: str, job_config: JobConfig) -> ChunkRunner:
        made.append(FlakyRunner(open_runner(settings, model_name, job_config), index, errors))
        return made[-1]

    return factory


class LaneLog(logging.Handler):
    """The lines the job's task runs log (Prefect's ``prefect.task_runs`` logger)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lane_log() -> Iterator[LaneLog]:
    handler = LaneLog()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def task_runs(flow_run_id: Any) -> list[Any]:
    """Every task run of the flow run, read back through the Prefect API once the server has them all.

    Prefect 3 reports task runs as events that the server records a moment later: read until the count holds still
    for a second, with every run in a final state."""
    runs: list[Any] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.0)
        again = _read_task_runs(flow_run_id)
        if runs and len(again) == len(runs) and all(r.state and r.state.is_final() for r in again):
            return again
        runs = again
    return runs


def _read_task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list[Any] = []
    only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(flow_run_filter=only, limit=50, offset=len(runs)):
            runs += page
    return runs


def summary_table(job_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [table] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"batch-summary-{job_id}"]))
        )
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return {row["field"]: row["value"] for row in rows}


def test_task_runs_of_a_sixty_chunk_job_are_bounded_by_concurrency_not_chunks(tmp_path: Path, prefect_api: str) -> None:
    ids = write_big_file(tmp_path / "in")
    config = write_config(tmp_path, job_config={"concurrency": CONCURRENCY})
    out = str(tmp_path / "out")

    state = build_batch_flow()(input_uri=str(tmp_path / "in"), output_uri=out, config=str(config), id_field="id",
                               return_state=True)  # fmt: skip
    summary = state.result()

    assert summary["status"] == "completed"
    assert summary["chunks"] >= 55
    runs = task_runs(state.state_details.flow_run_id)
    assert len(runs) <= 2 * CONCURRENCY + 10, sorted(r.name for r in runs)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]
    layout = OutputLayout(out)
    assert all(Path(layout.marker(i)).exists() for i in range(summary["chunks"]))  # every chunk committed
    assert_record_invariant(out, ids, summary=summary)


def test_a_chunk_failing_transiently_twice_is_retried_with_backoff_and_committed_once(
    tmp_path: Path, prefect_api: str, lane_log: LaneLog
) -> None:
    ids = write_big_file(tmp_path / "in", n=600)  # ten chunks
    delay = 0.3
    config = write_config(
        tmp_path, job_config={"concurrency": CONCURRENCY, "chunk_retries": 3, "retry_delay_seconds": delay}
    )
    out = str(tmp_path / "out")
    made: list[FlakyRunner] = []
    outage = [StorageError(f"s3 unreachable ({n})", retryable=True) for n in (1, 2)]

    summary = build_batch_flow(flaky(3, outage, made))(input_uri=str(tmp_path / "in"), output_uri=out,
                                                       config=str(config), id_field="id")  # fmt: skip

    [runner] = made
    assert summary["status"] == "completed"
    assert len(runner.attempts) == 3  # two failures, then the attempt that committed
    gaps = [b - a for a, b in zip(runner.attempts, runner.attempts[1:], strict=False)]
    assert gaps[0] >= delay * 0.9, gaps  # exponential backoff: delay, then twice the delay
    assert gaps[1] >= 2 * delay * 0.9, gaps
    assert "chunk 00003 attempt 2/4 in 0.3 s: s3 unreachable (1)" in lane_log.lines, lane_log.lines
    assert "chunk 00003 attempt 3/4 in 0.6 s: s3 unreachable (2)" in lane_log.lines, lane_log.lines
    assert runner.chunks.count(3) == 3
    assert sorted(set(runner.chunks)) == list(range(summary["chunks"]))
    assert_record_invariant(out, ids, summary=summary)  # committed once: every record once


def test_a_chunk_failing_for_good_is_named_in_the_failure_the_summary_artifact_and_a_failed_lane(
    tmp_path: Path, prefect_api: str, lane_log: LaneLog
) -> None:
    write_big_file(tmp_path / "in", n=600)  # ten chunks
    config = write_config(tmp_path, job_config={"concurrency": CONCURRENCY, "retry_delay_seconds": 0.05})
    made: list[FlakyRunner] = []
    corrupt = [StorageError("reviews.jsonl: not valid gzip", retryable=False)]

    state = build_batch_flow(flaky(2, corrupt, made))(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                                                      config=str(config), id_field="id", return_state=True)  # fmt: skip

    with pytest.raises(JobFailed, match=r"chunk 00002: reviews.jsonl: not valid gzip") as failed:
        state.result()

    [runner] = made
    assert runner.chunks.count(2) == 1  # not transient: never retried
    assert not failed.value.retryable
    assert failed.value.summary is not None
    table = summary_table(failed.value.summary["job_id"])
    assert table["chunk 00002 error"] == "reviews.jsonl: not valid gzip"
    assert any(
        line.startswith("chunk 00002 (") and "failed after 1 attempt" in line and "not valid gzip" in line
        for line in lane_log.lines
    ), lane_log.lines
    lanes = [r for r in task_runs(state.state_details.flow_run_id) if r.name.startswith("chunk-lane-")]
    assert 1 <= len(lanes) <= CONCURRENCY
    failed_lanes = [r for r in lanes if r.state.is_failed()]
    assert len(failed_lanes) == 1, [(r.name, r.state.name) for r in lanes]
    assert "chunk 00002" in (failed_lanes[0].state.message or ""), failed_lanes[0].state.message
