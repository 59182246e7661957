"""The lease of a job's output on local files (the same calls as on S3): one holder at a time, kept alive by its
renewals, released for the next run at once, and a holder that was taken over learns it and stops."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import orjson
import pytest

from modalkit.batch.layout import OutputLayout
from modalkit.batch.lease import LeaseHeld, LeaseLost, take_lease
from modalkit.batch.storage import default_store


def test_a_second_run_is_refused_naming_the_holder_while_renewals_keep_it_past_its_ttl(tmp_path: Path) -> None:
    store, output = default_store(), str(tmp_path / "out")
    held = take_lease(store, output, "job-1", ttl_seconds=1.0, flow_run_id="run-42")
    try:
        time.sleep(2.5)  # more than twice the ttl: only the renewals keep it
        with pytest.raises(LeaseHeld) as refused:
            take_lease(store, output, "job-1", ttl_seconds=1.0)
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, Prefect flow run run-42" in message
        assert "started at" in message
        assert "last renewed" in message
        assert "--wait" in message
    finally:
        held.release()


def test_a_released_lease_is_taken_at_once_and_older_generations_are_deleted(tmp_path: Path) -> None:
    store, output = default_store(), str(tmp_path / "out")
    take_lease(store, output, "job-1", ttl_seconds=60.0).release()
    second = take_lease(store, output, "job-1", ttl_seconds=60.0)  # no wait: the first said it was done
    second.release()
    assert store.list_names(OutputLayout(output).lease_dir) == ["00000002.json"]


def test_a_holder_that_was_taken_over_learns_it_at_its_next_renewal_and_leaves_the_new_lease_alone(
    tmp_path: Path,
) -> None:
    store, output = default_store(), str(tmp_path / "out")
    layout = OutputLayout(output)
    stalled = take_lease(store, output, "job-1", ttl_seconds=1.0)
    newer = {"job_id": "job-1", "host": "elsewhere", "pid": 1, "renewed_at": "2999-01-01T00:00:00+00:00",
             "ttl_seconds": 60.0, "released_at": None}  # fmt: skip
    assert store.create_exclusive(layout.lease(2), orjson.dumps(newer))  # as a run taking over after a pause would
    deadline = time.monotonic() + 3
    while not stalled.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLost, match="stopped sending"):
        stalled.check()
    stalled.release()
    assert orjson.loads(store.read_bytes(layout.lease(2)))["released_at"] is None
