"""Lanes: chunks pulled largest first by a fixed number of lanes, each chunk retried on transient errors only.

The runner here is an in-process one that fails the chunks it is told to, the way the real runners surface an S3
outage (retryable) or a corrupt file (not).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from modalkit.exceptions import RemoteError, StorageError
from modalkit.iomodel import ByteRange, ChunkResult, ChunkSpec, JobSpec
from modalkit.runners.lanes import ChunkFailed, ChunkLanes

log = logging.getLogger("test-lanes")


def _chunk(index: int) -> ChunkSpec:
    return ChunkSpec(job_id="j", index=index, uri="file:///in/a.jsonl", key="a.jsonl", format="jsonl",
                     extent=ByteRange(start=index * 10, end=index * 10 + 10), size=10)  # fmt: skip


class FailingRunner:
    """Runs every chunk at once, except that chunks in ``fail`` raise that error on every attempt."""

    slots = 2

    def __init__(self, fail: dict[int, Exception] | None = None, wall: float = 0.0) -> None:
        self.fail = fail or {}
        self.wall = wall
        self.ran: list[int] = []
        self._lock = threading.Lock()

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        with self._lock:
            self.ran.append(chunk.index)
        time.sleep(self.wall)
        if chunk.index in self.fail:
            raise self.fail[chunk.index]
        return ChunkResult(index=chunk.index, records=1, succeeded=1)

    def close(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def _run_lanes(lanes: ChunkLanes, n: int) -> list[BaseException | int]:
    ends: list[BaseException | int] = []

    def lane() -> None:
        try:
            ends.append(lanes.run_lane(log))
        except ChunkFailed as exc:
            ends.append(exc)

    threads = [threading.Thread(target=lane) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return ends


def test_two_lanes_run_every_chunk_once_and_report_each_outcome_then_their_end() -> None:
    runner = FailingRunner(wall=0.01)
    lanes = ChunkLanes(runner, JobSpec.model_construct(), [_chunk(i) for i in range(20)], retries=2, retry_delay_s=0)

    ends = _run_lanes(lanes, 2)

    assert sorted(runner.ran) == list(range(20))
    assert sum(e for e in ends if isinstance(e, int)) == 20
    items = [lanes.outcomes.get_nowait() for _ in range(22)]
    assert items.count(None) == 2  # one end per lane
    assert sorted(chunk.index for chunk, _ in filter(None, items)) == list(range(20))
    assert lanes.not_started() == []


def test_a_chunk_failed_for_good_stops_every_lane_from_starting_another_and_fails_its_lane() -> None:
    runner = FailingRunner({3: StorageError("a.jsonl: not valid gzip", retryable=False)}, wall=0.02)
    lanes = ChunkLanes(runner, JobSpec.model_construct(), [_chunk(i) for i in range(40)], retries=3, retry_delay_s=0)

    ends = _run_lanes(lanes, 2)

    [failed] = [e for e in ends if isinstance(e, ChunkFailed)]
    assert str(failed) == "chunk 00003 (a.jsonl) failed after 1 attempt: a.jsonl: not valid gzip"
    assert not failed.retryable
    assert runner.ran.count(3) == 1  # not transient: not retried
    assert max(runner.ran) <= 5  # the other lane finished the chunk it was on, and started none after
    assert len(lanes.not_started()) == 40 - len(runner.ran)


def test_stopping_the_lanes_ends_a_retry_wait_at_once_without_another_attempt() -> None:
    runner = FailingRunner({0: RemoteError("s3 unreachable", retryable=True)})
    lanes = ChunkLanes(runner, JobSpec.model_construct(), [_chunk(0), _chunk(1)], retries=3, retry_delay_s=30)
    threading.Timer(0.2, lanes.stop).start()

    started = time.monotonic()
    ends = _run_lanes(lanes, 1)

    assert time.monotonic() - started < 1.0  # not the 30 s retry delay
    assert runner.ran == [0]  # no retry, no next chunk
    assert ends == [1]  # a stopped lane ends without failing: the run stops for the reason that stopped it
    assert [c.index for c in lanes.not_started()] == [1]


@pytest.mark.parametrize("retries", [0, 2])
def test_a_transient_error_is_retried_chunk_retries_times_with_doubling_delays(
    retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    runner = FailingRunner({0: RemoteError("s3 unreachable", retryable=True)})
    lanes = ChunkLanes(runner, JobSpec.model_construct(), [_chunk(0)], retries=retries, retry_delay_s=0.05)

    with caplog.at_level(logging.WARNING, logger="test-lanes"):
        [failed] = _run_lanes(lanes, 1)

    assert isinstance(failed, ChunkFailed)
    assert failed.retryable
    assert runner.ran == [0] * (1 + retries)
    retried = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage() and "failed" not in r.getMessage()]
    assert retried == [f"chunk 00000 attempt {n + 2}/{1 + retries} in {0.05 * 2**n:.1f} s: s3 unreachable"
                       for n in range(retries)]  # fmt: skip
