"""The Prefect way, end to end with the real parts: a ``prefect server start`` on a free loopback port,
``prefect --no-prompt deploy --all`` from ``prefect.yaml`` in a fresh clone of this repo, a process worker
started the way ``make worker`` starts it, ``prefect deployment run ... --watch``, and data in a real
``moto_server`` (S3 and SQS).

Every test here reads back what the server recorded through the Prefect API: the deployments as written, the flow
runs' names, tags, states and artifacts, and the ``modalkit.job.*`` events.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from batch_support import assert_record_invariant, drain_sqs, read_manifest, write_config
from support import MotoServer, free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UTC = dt.UTC

pytestmark = pytest.mark.slow


class Stack:
    """The server, the clone, the worker and the environment they share."""

    def __init__(self, root: Path, moto: MotoServer) -> None:
        self.root = root
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.clone = root / "clone"
        self.bucket = f"deploy-{os.getpid()}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MODALKIT_", "AWS_"))},
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # as `make server` starts it: runs' logs streamed out, so that `--watch` prints them
            "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
            "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            "AWS_ENDPOINT_URL": moto.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONPATH": str(root / "clone" / "tests"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:  # the child keeps its own copy of the handle
            proc = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def prefect(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "prefect"), *args], cwd=self.clone, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the worker before the server
            stop_process(proc, timeout=30)


def fresh_clone(dest: Path) -> None:
    """``git clone`` of this repo at the state of its working tree (HEAD, plus uncommitted edits of tracked files
    while one develops; CI runs on a clean clone, where the two are the same)."""
    snapshot = subprocess.run(["git", "stash", "create"], cwd=REPO, capture_output=True, text=True, check=True)
    commit = snapshot.stdout.strip() or "HEAD"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=dest, check=True)


@pytest.fixture(scope="module")
def stack(moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("deployments"), moto_server)
    fresh_clone(s.clone)
    try:
        server = s.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(s.port)], s.root)  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, s.log("server")
            try:
                if httpx.get(f"{s.api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.5)
        # what `make worker` does: create the pool if it is missing, start a process worker; then `make deploy`
        assert s.prefect("work-pool", "create", "modalkit", "--type", "process").returncode == 0
        s.start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "modalkit", "--type", "process"],
                s.clone)  # fmt: skip
        deploy = s.prefect("--no-prompt", "deploy", "--all")
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=s.bucket)  # fmt: skip
        yield s
    finally:
        s.stop()


def client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def config_in(stack: Stack, name: str, **app: Any) -> Path:
    """A settings file (the probe-aware sentiment model) in its own folder of the stack."""
    folder = stack.root / name
    folder.mkdir(exist_ok=True)
    return write_config(folder, **app)


@pytest.fixture
def api(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """This test process's Prefect client and boto3/s3fs pointed at the stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from modalkit.aws import reset_clients

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, stack.env[key])
    reset_clients()
    with temporary_settings(updates={PREFECT_API_URL: stack.api}):
        yield stack


def put_reviews(s3: Any, bucket: str, prefix: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` reviews in two JSONL files under ``prefix``, three of them bad; returns (all ids, the bad ones).

    Each record is padded (a field the model ignores) so that each file of 30 is over half a 64 KiB chunk: the two
    files are two chunks, not packed into one."""
    pad = "x" * 1200
    lines = [json.dumps({"id": f"{prefix}-{i}", "text": f"a great product, really good {i}", "pad": pad})
             for i in range(n)]  # fmt: skip
    bad = {i: r for i, r in ((5, {"id": f"{prefix}-5"}), (17, {"id": f"{prefix}-17", "text": "POISON-PREDICT"}))
           if i < n}  # fmt: skip
    for i, record in bad.items():
        lines[i] = json.dumps(record)
    half = n // 2
    for name, part in (("a.jsonl", lines[:half]), ("b.jsonl", lines[half:])):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=("\n".join(part) + "\n").encode())
    return [f"{prefix}-{i}" for i in range(n)], [f"{prefix}-{i}" for i in bad]


def wait_final(run_id: Any, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    with client() as c:
        while True:
            run = c.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {run_id} is still {run.state}"
            time.sleep(0.5)


def events_named(name: str, timeout: float = 60) -> list[Any]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    since = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    deadline = time.monotonic() + timeout
    with client() as c:
        while True:
            page = c.read_events(
                filter=EventFilter(event=EventNameFilter(name=[name]), occurred=EventOccurredFilter(since=since)),
                limit=50,
            )
            if page.events or time.monotonic() > deadline:
                return list(page.events)
            time.sleep(1)


# --- the tests -----------------------------------------------------------------------------------------------------


def test_deploy_from_a_fresh_clone_then_an_adhoc_run_watched_to_the_end_scores_s3_data_onto_sqs(api: Stack) -> None:
    stack = api
    s3 = boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    ids, bad = put_reviews(s3, stack.bucket, "adhoc-in", 60)
    ok_url = sqs.create_queue(QueueName=f"ok-{stack.bucket}")["QueueUrl"]
    err_url = sqs.create_queue(QueueName=f"err-{stack.bucket}")["QueueUrl"]
    config = config_in(stack, "adhoc", queue_config={"backend": "sqs"})
    output = f"s3://{stack.bucket}/adhoc-out"

    watched = stack.prefect(
        "deployment", "run", "batch-inference/adhoc", "--watch", "--watch-timeout", "240",
        "--param", f"input_uri=s3://{stack.bucket}/adhoc-in/", "--param", f"output_uri={output}",
        "--param", f"config={config}", "--param", "id_field=id", "--param", f"success_queue=ok-{stack.bucket}",
        "--param", f"failure_queue=err-{stack.bucket}", "--param", "max_failure_rate=0.5",
        timeout=300,
    )  # fmt: skip

    assert watched.returncode == 0, watched.stdout[-3000:] + stack.log("worker")[-3000:]
    manifest = read_manifest(output)
    assert (manifest["records"], manifest["succeeded"], manifest["failed"]) == (60, 58, 2)
    assert manifest["chunks"] >= 2
    queued = {"success": drain_sqs(sqs, ok_url), "failure": drain_sqs(sqs, err_url)}
    assert_record_invariant(output, ids, queued, manifest)
    assert sorted(m["record_id"] for m in queued["failure"]) == sorted(bad)

    with client() as c:
        deployment = c.read_deployment_by_name("batch-inference/adhoc")
        (run,) = c.read_flow_runs(deployment_filter=_by_deployment(deployment.id))
        artifacts = {a.key: a for a in c.read_artifacts(flow_run_filter=_by_run(run.id))}
    today = run.expected_start_time.astimezone(UTC).date()
    assert run.name == f"batch-inference/sentiment/{today}"
    assert {"modalkit", "adhoc", "model:sentiment", "backend:local", "deployment:adhoc"} <= set(run.tags)
    report = artifacts[f"batch-report-{manifest['job_id']}"]
    assert report.type == "markdown"
    assert "| records | 60 |" in report.data
    assert "| failed | 2 (3.33%;" in report.data
    assert f"| failures | `{output}/_failures/` |" in report.data
    assert "| `ValidationError` | 1 |" in report.data
    assert "| `RuntimeError` | 1 |" in report.data
    assert artifacts[f"batch-progress-{manifest['job_id']}"].data == 100.0

    (event,) = [e for e in events_named("modalkit.job.completed") if e.payload.get("job_id") == manifest["job_id"]]
    assert {k: event.payload[k] for k in ("records", "succeeded", "failed", "chunks", "output_uri")} == {
        k: manifest[k] for k in ("records", "succeeded", "failed", "chunks", "output_uri")
    }
    assert event.resource.id == f"modalkit.job.{manifest['job_id']}"
    assert event.resource["modalkit.outcome"] == "with-failures"
    assert str(run.id) in {r.id.rsplit(".", 1)[-1] for r in event.related}  # tied to its flow run in the UI


def test_the_nightly_deployment_reads_back_with_its_cron_utc_and_concurrency_limit_as_written(api: Stack) -> None:
    with client() as c:
        nightly = c.read_deployment_by_name("batch-inference/nightly")
        names = {d.name for d in c.read_deployments()}
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    limit = nightly.global_concurrency_limit.limit if nightly.global_concurrency_limit else nightly.concurrency_limit
    assert limit == 1
    assert nightly.parameters == {"input_uri": "data/nightly/{date}/", "output_uri": "results/nightly/{date}/"}
    assert nightly.work_pool_name == "modalkit"
    assert {"nightly", "adhoc"} <= names
    with client() as c:
        replay = c.read_deployment_by_name("replay-failures/adhoc")
    assert replay.work_pool_name == "modalkit"


def test_a_nightly_run_scheduled_for_a_past_night_reads_that_nights_partition_and_a_missing_one_fails_naming_it(
    api: Stack,
) -> None:
    from prefect.states import Scheduled

    stack = api
    s3 = boto3.client("s3", endpoint_url=stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    put_reviews(s3, stack.bucket, "nightly/2026-11-20", 30)
    put_reviews(s3, stack.bucket, "nightly/2026-11-21", 12)  # the next night's: it must not be read
    config = config_in(stack, "nightly")
    params = {"input_uri": f"s3://{stack.bucket}/nightly/{{date}}/", "config": str(config), "id_field": "id",
              "output_uri": f"s3://{stack.bucket}/scored/{{date:%Y/%m/%d}}", "max_failure_rate": 0.5}  # fmt: skip
    script = stack.clone / "scripts" / "create_alerts.py"  # what `make alerts SLACK_WEBHOOK_URL=...` runs
    alerts = subprocess.run([sys.executable, str(script), "--slack-webhook-url", "http://127.0.0.1:9/never"],
                            env=stack.env, capture_output=True, text=True, check=False)  # fmt: skip
    assert alerts.returncode == 0, alerts.stderr
    with client() as c:
        (alert,) = c.read_automations_by_name("modalkit job failed")
        nightly = c.read_deployment_by_name("batch-inference/nightly")
        good = c.create_flow_run_from_deployment(
            nightly.id, parameters=params, state=Scheduled(scheduled_time=dt.datetime(2026, 11, 20, 2, 0, tzinfo=UTC))
        )
    good_run = wait_final(good.id)
    with client() as c:
        missing = c.create_flow_run_from_deployment(
            nightly.id, parameters=params, state=Scheduled(scheduled_time=dt.datetime(2026, 11, 19, 2, 0, tzinfo=UTC))
        )
    missing_run = wait_final(missing.id)

    assert good_run.state.is_completed(), (good_run.state.message, stack.log("worker")[-3000:])
    manifest = read_manifest(f"s3://{stack.bucket}/scored/2026/11/20")
    assert (manifest["records"], manifest["input_uri"]) == (30, f"s3://{stack.bucket}/nightly/2026-11-20")
    assert good_run.name == "batch-inference/sentiment/2026-11-20"
    assert {"nightly", "deployment:nightly", "model:sentiment"} <= set(good_run.tags)

    assert missing_run.state.is_failed()
    assert f"s3://{stack.bucket}/nightly/2026-11-19" in missing_run.state.message
    assert "the partition for 2026-11-19" in missing_run.state.message
    failed = [e for e in events_named("modalkit.job.failed")
              if e.resource.get("modalkit.input_uri") == f"s3://{stack.bucket}/nightly/2026-11-19/"]  # fmt: skip
    assert len(failed) == 1
    assert f"s3://{stack.bucket}/nightly/2026-11-19 does not exist" in failed[0].payload["error"]
    # the README's automation fired on it (its Slack webhook goes nowhere here; the trigger is what is tested)
    triggered = [e for e in events_named("prefect.automation.triggered")
                 if e.resource.id == f"prefect.automation.{alert.id}"]  # fmt: skip
    assert triggered


def test_an_adhoc_run_whose_input_does_not_exist_fails_with_a_state_message_naming_the_uri(api: Stack) -> None:
    stack = api
    missing = f"s3://{stack.bucket}/no-such-input/"
    watched = stack.prefect(
        "deployment", "run", "batch-inference/adhoc", "--watch", "--watch-timeout", "240",
        "--param", f"input_uri={missing}", "--param", f"output_uri=s3://{stack.bucket}/never",
        "--param", f"config={config_in(stack, 'missing')}",
        timeout=300,
    )  # fmt: skip
    assert watched.returncode != 0
    with client() as c:
        deployment = c.read_deployment_by_name("batch-inference/adhoc")
        runs = c.read_flow_runs(deployment_filter=_by_deployment(deployment.id))
    (run,) = [r for r in runs if r.parameters.get("input_uri") == missing]
    assert run.state.is_failed()
    assert missing.rstrip("/") in run.state.message
    assert "Traceback" not in run.state.message


def _by_deployment(deployment_id: Any) -> Any:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


def _by_run(run_id: Any) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))


def test_a_nightly_run_with_a_bad_date_fails_within_a_second_of_its_start_and_watch_prints_why(api: Stack) -> None:
    stack = api
    started = time.monotonic()
    watched = stack.prefect(
        "deployment", "run", "batch-inference/nightly", "--watch", "--watch-timeout", "240",
        "--param", "date=2026-13-01", timeout=300,
    )  # fmt: skip
    wall = time.monotonic() - started

    assert watched.returncode != 0
    reason = "parameter date: '2026-13-01' is not a date; use YYYY-MM-DD"
    printed = " ".join(watched.stdout.split())  # --watch wraps its lines to the terminal's width
    assert f"batch-inference failed: {reason}" in printed, watched.stdout  # among --watch's own lines
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client() as c:
        deployment = c.read_deployment_by_name("batch-inference/nightly")
        runs = c.read_flow_runs(deployment_filter=_by_deployment(deployment.id))
        (run,) = [r for r in runs if r.parameters.get("date") == "2026-13-01"]
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert run.state.is_failed()
    assert reason in run.state.message
    [failure] = [log for log in logs if log.level >= 40 and log.message.startswith("batch-inference failed: ")]
    seconds = (failure.timestamp - run.start_time).total_seconds()
    print(f"bad date: the reason logged {seconds:.3f} s after the run started; {wall:.1f} s from `deployment run`")
    assert seconds < 1.0
