"""The lease of a job's output on local files (the same calls as on S3): one holder at a time, kept alive by its
renewals, released for the next run at once, and a holder that was taken over learns it and stops."""

from __future__ import annotations

import datetime as dt
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


def test_the_lease_of_a_run_killed_on_this_machine_is_taken_at_once_not_after_its_ttl(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    store, output = default_store(), str(tmp_path / "out")
    holder = subprocess.Popen(  # a run that takes the lease and is then SIGKILLed: it never releases it
        [sys.executable, "-c", "import sys, time; from modalkit.batch.lease import take_lease; "
         "from modalkit.batch.storage import default_store; "
         "take_lease(default_store(), sys.argv[1], 'job-1', ttl_seconds=600.0); print('held', flush=True); "
         "time.sleep(600)", output],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld):  # alive: refused
            take_lease(store, output, "job-1", ttl_seconds=600.0)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        taken = take_lease(store, output, "job-1", ttl_seconds=600.0)  # no --wait: the holder is gone
        taken.release()
        assert time.monotonic() - started < 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_lease_whose_holder_on_another_machine_stopped_renewing_is_taken_over_within_its_ttl(tmp_path: Path) -> None:
    store, output = default_store(), str(tmp_path / "out")
    layout = OutputLayout(output)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    elsewhere = {"job_id": "job-1", "host": "another-machine", "pid": os.getpid(), "started_at": now,
                 "renewed_at": now, "ttl_seconds": 2.0, "released_at": None}  # fmt: skip
    assert store.create_exclusive(layout.lease(1), orjson.dumps(elsewhere))  # SIGKILLed there right after this
    with pytest.raises(LeaseHeld, match="host another-machine"):
        take_lease(store, output, "job-1", ttl_seconds=2.0)
    started = time.monotonic()
    take_lease(store, output, "job-1", ttl_seconds=2.0, wait=True).release()
    waited = time.monotonic() - started
    assert 1.0 < waited <= 2.0 + 1.0


def test_a_run_that_sees_no_claim_and_then_the_claim_of_its_own_job_made_meanwhile_goes_on(tmp_path: Path) -> None:
    """Two runs of one job started at once: one reads no ``_job.json``, the other claims before the first lists the
    output. The first must see its own job's claim, not "files but no _job.json" (seen as a rare exit 2)."""
    from modalkit.batch.job import _check_owner
    from modalkit.batch.storage import Store

    output = tmp_path / "out"
    claim = orjson.dumps({"job_id": "job-1", "input_uri": "in", "model_name": "m"})

    class TheOtherRunClaimsRightAfterThisReads(Store):
        def exists(self, uri: str) -> bool:
            found = super().exists(uri)
            if uri.endswith("_job.json") and not found:
                self.create_exclusive(uri, claim)  # what the other run's start_job does at that moment
            return found

    _check_owner(TheOtherRunClaimsRightAfterThisReads(), str(output), "job-1")  # raised ConfigError before
