"""One run of a job at a time: ``modalkit batch`` twice at once on one output (moto S3 + standard SQS), and a run
that was SIGKILLed, taken over by the next one within the lease's stated time.

The pipeline is ``pipelines:ServeProbe`` slowed by ``PROBE_DELAY`` (seconds per batch), so that a run is still
running when the other starts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from batch_support import drain_sqs, read_parts, write_config

from modalkit.batch import storage
from modalkit.batch.lease import take_lease

TESTS_DIR = Path(__file__).resolve().parents[1]
RECORDS = 48
LEASE_SECONDS = 3.0


@pytest.fixture
def job(tmp_path: Path, s3: Any, sqs: Any, unique: str, prefect_api: str) -> dict[str, Any]:
    """A bucket holding 4 input files (4 chunks: each over half a chunk, so none is packed with another), two
    standard SQS queues, and a settings file."""
    bucket = f"lease-{unique}"
    s3.create_bucket(Bucket=bucket)
    for f in range(4):
        body = "".join(
            json.dumps({"id": f"r{f}-{i:03d}", "text": f"great product number {i}", "pad": "x" * 3000}) + "\n"
            for i in range(RECORDS // 4)
        )
        s3.put_object(Bucket=bucket, Key=f"in/part-{f}.jsonl", Body=body.encode())
    queues = {name: sqs.create_queue(QueueName=f"{name}-{unique}")["QueueUrl"] for name in ("ok", "fail")}
    config = write_config(
        tmp_path,
        pipeline="pipelines:ServeProbe",
        queue_config={"backend": "sqs"},
        batch_config={"max_batch_size": 4},
        job_config={"local_workers": 1, "lease_seconds": LEASE_SECONDS, "retry_delay_seconds": 0.2},
    )
    args = ["batch", f"s3://{bucket}/in/", f"s3://{bucket}/same/", "--config", str(config), "--id-field", "id",
            "--success-queue", f"ok-{unique}", "--failure-queue", f"fail-{unique}", "--json"]  # fmt: skip
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PROBE_DELAY": "0.4",  # 12 batches of 4: about 5 s of predict in one worker
    }
    return {"bucket": bucket, "queues": queues, "args": args, "env": env, "cwd": tmp_path}


def start(job: dict[str, Any], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "modalkit.cli", *job["args"], *extra],
        cwd=job["cwd"], env=job["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: a SIGKILL takes its workers along, as a lost machine would
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def sent_once(sqs: Any, job: dict[str, Any]) -> Counter[str]:
    """The record ids on both queues, counted; asserts that none came twice."""
    bodies = drain_sqs(sqs, job["queues"]["ok"]) + drain_sqs(sqs, job["queues"]["fail"])
    ids = Counter(str(b["record_id"]) for b in bodies)
    assert {i: n for i, n in ids.items() if n > 1} == {}
    return ids


def committed(s3: Any, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="same/_chunks/").get("Contents", [])
    return [o["Key"] for o in listing if not o["Key"].endswith(".progress.json")]


def lease_files(s3: Any, bucket: str) -> dict[str, dict[str, Any]]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="same/_lease/").get("Contents", [])
    return {o["Key"]: orjson.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listing}


def test_two_runs_of_one_job_at_once_send_each_record_once_and_one_says_why_it_did_not_run(
    job: dict[str, Any], sqs: Any
) -> None:
    first, second = start(job), start(job)
    outcomes = [finish(first), finish(second)]

    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], [(code, err[-2000:]) for code, _, err in outcomes]
    ran = next(o for o in outcomes if o[0] == 0)
    refused = next(o for o in outcomes if o[0] == 2)
    summary = json.loads(ran[1].strip().splitlines()[-1])
    assert (summary["records"], summary["chunks_skipped"]) == (RECORDS, 0)
    [line] = [line for line in refused[2].splitlines() if "already running" in line] or [refused[2][-3000:]]
    running_pid = (first if ran is outcomes[0] else second).pid
    assert f"pid {running_pid}" in line
    assert "--wait" in line
    assert refused[1].strip() == ""  # no summary: it did nothing
    assert sum(sent_once(sqs, job).values()) == RECORDS


def test_a_sigkilled_runs_lease_is_taken_over_at_once_on_its_machine_and_the_rerun_resumes_the_rest(
    job: dict[str, Any], sqs: Any, s3: Any
) -> None:
    doomed = start(job)
    deadline = time.monotonic() + 90
    while not committed(s3, job["bucket"]):  # it has committed a chunk: it holds the lease, mid-job
        assert doomed.poll() is None, doomed.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(doomed.pid, signal.SIGKILL)
    killed_at = dt.datetime.now(dt.UTC)
    doomed.communicate()

    # on the machine it ran on, its process is known to be gone: taken over at once, without waiting for its ttl
    output = f"s3://{job['bucket']}/same"
    store = storage.default_store()
    job_id = orjson.loads(store.read_bytes(f"{output}/_job.json"))["job_id"]
    take_lease(store, output, job_id, LEASE_SECONDS).release()  # no wait: it would raise LeaseHeld
    assert (dt.datetime.now(dt.UTC) - killed_at).total_seconds() <= LEASE_SECONDS + 1.0

    code, out, err = finish(start(job, "--wait"))  # the job resumes where the dead run left it
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["records"] == RECORDS
    assert 0 < summary["chunks_skipped"] < summary["chunks"]
    [lease] = lease_files(s3, job["bucket"]).values()  # older generations are deleted by each taker
    assert lease["released_at"]
    # a SIGKILL between a send and its journal entry may repeat that one batch; nothing is ever missing
    bodies = drain_sqs(sqs, job["queues"]["ok"]) + drain_sqs(sqs, job["queues"]["fail"])
    assert {b["record_id"] for b in bodies} == {row["record_id"] for row in read_parts(f"s3://{job['bucket']}/same")}


def test_a_run_with_wait_waits_for_the_running_one_then_finds_every_chunk_committed(
    job: dict[str, Any], sqs: Any, s3: Any
) -> None:
    first = start(job)
    while not committed(s3, job["bucket"]):
        assert first.poll() is None, first.communicate()
        time.sleep(0.2)
    waiting = start(job, "--wait")
    (code_first, out_first, err_first), (code, out, err) = finish(first), finish(waiting)

    assert (code_first, code) == (0, 0), (err_first, err)
    assert "waiting for the run" in err
    assert f"pid {first.pid}" in err
    ran, waited = (json.loads(o.strip().splitlines()[-1]) for o in (out_first, out))
    assert ran["chunks_skipped"] == 0
    assert waited["chunks_skipped"] == waited["chunks"]
    assert sum(sent_once(sqs, job).values()) == RECORDS


def test_a_run_whose_lease_was_taken_over_stops_its_workers_and_fails_saying_so(
    job: dict[str, Any], s3: Any, sqs: Any
) -> None:
    run = start(job)
    while not committed(s3, job["bucket"]):
        assert run.poll() is None, run.communicate()
        time.sleep(0.2)
    newer = {"job_id": "x", "host": "elsewhere", "pid": 1, "started_at": "2999-01-01T00:00:00+00:00",
             "renewed_at": "2999-01-01T00:00:00+00:00", "ttl_seconds": 60.0, "released_at": None}  # fmt: skip
    # as a run that took the job over after this one stalled past its lease would: the next generation
    s3.put_object(Bucket=job["bucket"], Key="same/_lease/99999999.json", Body=orjson.dumps(newer))
    taken_over = time.monotonic()

    code, out, err = finish(run)

    assert code == 1, err
    assert "lost its lease" in err
    assert time.monotonic() - taken_over < LEASE_SECONDS + 5  # a renewal (every ttl/3) finds it, then it stops
    assert out.strip() == ""
    assert len(committed(s3, job["bucket"])) < 4  # it stopped before the end: the holder runs the rest
