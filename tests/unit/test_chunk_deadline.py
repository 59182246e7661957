"""The straggler limit: ``job_config.chunk_timeout_s`` when set, else learnt from the chunks that finished."""

from __future__ import annotations

import time

import pytest

from modalkit.iomodel import ByteRange, ChunkSpec
from modalkit.runners.deadline import ChunkDeadline, ChunkTimedOut
from modalkit.settings import JobConfig


def _chunk() -> ChunkSpec:
    return ChunkSpec(job_id="j", index=3, uri="file:///in/a.jsonl", key="a.jsonl", format="jsonl",
                     extent=ByteRange(start=0, end=10), size=10)  # fmt: skip


def test_adaptive_limit_waits_for_five_chunks_then_is_ten_median_walls_at_least_600_s() -> None:
    deadline = ChunkDeadline(None)
    for wall in (100.0, 70.0, 80.0, 90.0):
        deadline.finished(wall)
        assert deadline.limit() is None  # too few chunks to know what is normal
    deadline.finished(3000.0)  # one straggler that finished does not move the median far
    assert deadline.limit() == 900.0
    fast = ChunkDeadline(None)
    for _ in range(5):
        fast.finished(2.0)
    assert fast.limit() == 600.0  # the floor: warm-ups and cold starts never look like a hang


def test_a_set_chunk_timeout_applies_from_the_first_chunk_and_is_the_default_off() -> None:
    assert JobConfig().chunk_timeout_s is None
    assert ChunkDeadline(JobConfig(chunk_timeout_s=2).chunk_timeout_s).limit() == 2.0


def test_wait_past_the_limit_names_the_chunk_the_limit_and_the_setting() -> None:
    def never_done(seconds: float) -> None:
        time.sleep(seconds)
        raise TimeoutError

    began = time.time()
    with pytest.raises(ChunkTimedOut) as caught:
        ChunkDeadline(0.2).wait(never_done, lambda: began, _chunk())
    message = str(caught.value)
    assert "chunk 3 (a.jsonl)" in message
    assert "0.2 s" in message
    assert "app_settings.job_config.chunk_timeout_s" in message
    assert caught.value.retryable


def test_wait_counts_from_when_a_worker_began_the_chunk_not_from_the_submit() -> None:
    polls: list[float] = []
    deadline = ChunkDeadline(0.5)

    def done_on_third_poll(seconds: float) -> str:
        polls.append(seconds)
        if len(polls) < 3:
            time.sleep(0.3)  # queued behind a worker's warm-up: no clock yet
            raise TimeoutError
        return "result"

    assert deadline.wait(done_on_third_poll, lambda: None if len(polls) < 2 else time.time(), _chunk()) == "result"
