"""The checks a user runs before and after a job, through the real ``modalkit`` command: the id field checked
before the output is claimed, ``modalkit validate`` (the dry run), ``--queue-backend`` and where the queue records
went, ``modalkit queue`` (what a consumer of the local queue would get), and ``modalkit init`` (a new project that
works in one command). Each run is a real subprocess (``python -m modalkit.cli``) against the session's Prefect
test server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from batch_support import write_config

TESTS_DIR = Path(__file__).resolve().parents[1]
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(prefect_api: str, tmp_path: Path) -> Cli:
    """Run ``python -m modalkit.cli ARGS`` in ``tmp_path`` (or ``cwd``) against the session's Prefect server, in
    the environment of the moment (the ``aws`` fixture's variables included)."""

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "PREFECT_API_URL": prefect_api,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "COLUMNS": "200",
        }
        return subprocess.run([sys.executable, "-m", "modalkit.cli", *args], cwd=cwd or tmp_path, env=env,
                              capture_output=True, text=True, timeout=240, check=False)  # fmt: skip

    return run


def write_orders(folder: Path, n: int = 30) -> list[dict[str, Any]]:
    """Two JSONL files of reviews keyed by ``order_id`` (ints)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"order_id": i, "text": f"great value, order {i}"} for i in range(n)]
    half = n // 2
    for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return rows


def last_json_line(stdout: str) -> dict[str, Any]:
    summary = json.loads([line for line in stdout.splitlines() if line.strip()][-1])
    assert isinstance(summary, dict)
    return summary


# --- the id field, checked before the output is claimed ----------------------------------------------------------


def test_batch_with_a_misspelled_id_field_fails_in_one_line_naming_the_fields_and_writes_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    write_orders(tmp_path / "in")
    config = write_config(tmp_path)
    out = tmp_path / "out"

    started = time.monotonic()
    proc = cli("batch", str(tmp_path / "in"), str(out), "--config", str(config), "--id-field", "oder_id",
               "--success-queue", "ok")  # fmt: skip
    seconds = time.monotonic() - started

    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: --id-field 'oder_id'"), line
    assert "a.jsonl (the first has: order_id, text); did you mean 'order_id'?" in line, line
    assert not out.exists()  # no _job.json, no part, no marker: the output is free for the corrected command
    assert not (tmp_path / "queues").exists()
    print(f"misspelled --id-field refused after {seconds:.2f} s (the whole command, interpreter start included)")


# --- modalkit validate: the dry run ------------------------------------------------------------------------------


def test_validate_on_a_good_input_prints_one_ok_line_per_check_writes_nothing_and_exits_0(
    cli: Cli, tmp_path: Path
) -> None:
    write_orders(tmp_path / "in", n=40)
    config = write_config(tmp_path)
    out = tmp_path / "out"

    proc = cli("validate", str(tmp_path / "in"), str(out), "--config", str(config), "--id-field", "order_id",
               "--success-queue", "ok", "--failure-queue", "bad")  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {line.split()[1].rstrip(":"): line.split()[0] for line in proc.stdout.splitlines() if line[:1] != " "
              and len(line.split()) > 1 and line.split()[0] in ("ok", "problem", "warning")}  # fmt: skip
    assert checks == dict.fromkeys(["config", "pipeline", "input", "records", "id_field", "queues", "output"], "ok")
    assert "40 records" in proc.stdout  # how many were checked
    assert proc.stdout.strip().splitlines()[-1] == "validate: a job would start"
    assert not out.exists()
    assert not (tmp_path / "queues").exists()


def test_validate_on_a_bad_input_names_each_problem_with_file_and_position_and_exits_non_zero(
    cli: Cli, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = [json.dumps({"id": f"r{i}", "text": "fine"}) for i in range(3)]
    lines = [good[0], '{"id": "r9", "text": ', json.dumps({"id": "r10", "txt": "typo in the field"}), *good[1:]]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = write_config(tmp_path)

    proc = cli("validate", str(folder), str(tmp_path / "out"), "--config", str(config), "--id-field", "idd")

    assert proc.returncode != 0
    out = proc.stdout
    problems = [line for line in out.splitlines() if line.startswith("problem")]
    assert any(line.startswith("problem  id_field") and "did you mean 'id'?" in line for line in problems), out
    bad_json_at = (folder / "a.jsonl").read_bytes().index(b'{"id": "r9"')
    typo_at = (folder / "a.jsonl").read_bytes().index(b'{"id": "r10"')
    assert f"a.jsonl at byte {bad_json_at}: invalid JSON" in out
    assert f"a.jsonl at byte {typo_at}: field 'text': Field required" in out
    assert "2 of 5 records" in out
    assert out.strip().splitlines()[-1].startswith("validate: a job would not start")
    assert not (tmp_path / "out").exists()


# --- --queue-backend, and where the queue records went -----------------------------------------------------------


def test_batch_names_the_local_queue_file_in_the_summary_and_modalkit_queue_reads_then_drains_it(
    cli: Cli, tmp_path: Path
) -> None:
    rows = write_orders(tmp_path / "in", n=12)
    config = write_config(tmp_path)
    queue_file = tmp_path / "queues" / "queues.sqlite3"

    proc = cli("batch", str(tmp_path / "in"), str(tmp_path / "out"), "--config", str(config), "--id-field",
               "order_id", "--success-queue", "scored", "--queue-backend", "local", "--json")  # fmt: skip
    # the same job again, without --json: resumed, and the table names the queue file too
    table = cli("batch", str(tmp_path / "in"), str(tmp_path / "out"), "--config", str(config), "--id-field",
                "order_id", "--success-queue", "scored")  # fmt: skip
    read = cli("queue", "scored", "--config", str(config))
    drain = cli("queue", "scored", "--drain", "--config", str(config))
    after = cli("queue", "scored", "--config", str(config))

    assert proc.returncode == 0, proc.stderr
    summary = last_json_line(proc.stdout)
    assert summary["queues"] == {"backend": "local", "location": str(queue_file), "success_queue": "scored",
                                 "failure_queue": None}  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert f"local: {queue_file} (success scored)" in table.stdout
    assert read.returncode == 0, read.stderr
    bodies = [json.loads(line) for line in read.stdout.splitlines()]
    assert sorted(b["record_id"] for b in bodies) == [r["order_id"] for r in rows]
    assert {b["status"] for b in bodies} == {"success"}
    assert drain.returncode == 0
    assert len(drain.stdout.splitlines()) == len(rows)
    assert after.returncode == 0
    assert after.stdout == ""  # drained: a consumer would get nothing more


def test_batch_on_sqs_names_the_endpoint_and_queue_url_and_memory_is_refused_with_the_reason(
    cli: Cli, tmp_path: Path, sqs: Any, aws: Any, unique: str
) -> None:
    write_orders(tmp_path / "in", n=6)
    url = sqs.create_queue(QueueName=f"scored-{unique}")["QueueUrl"]
    config = write_config(tmp_path)

    proc = cli("batch", str(tmp_path / "in"), str(tmp_path / "out"), "--config", str(config), "--id-field",
               "order_id", "--success-queue", f"scored-{unique}", "--queue-backend", "sqs", "--json")  # fmt: skip
    memory = cli("batch", str(tmp_path / "in"), str(tmp_path / "out2"), "--config", str(config),
                 "--success-queue", "x", "--queue-backend", "memory")  # fmt: skip
    typo = cli("batch", str(tmp_path / "in"), str(tmp_path / "out3"), "--queue-backend", "sqss")

    assert proc.returncode == 0, proc.stderr
    queues = last_json_line(proc.stdout)["queues"]
    assert queues == {"backend": "sqs", "location": aws.url, "success_queue": url, "failure_queue": None}
    assert memory.returncode == 2
    [line] = memory.stderr.strip().splitlines()
    assert line.startswith(
        "error: --queue-backend memory: the queue records would be kept in the worker processes' "
        "memory and vanish when the job ends; use --queue-backend local"
    ), line
    assert not (tmp_path / "out2").exists()
    assert typo.returncode == 2
    assert typo.stderr.strip() == "error: --queue-backend 'sqss': not a queue backend; use one of local, sqs, memory"


# --- modalkit init ------------------------------------------------------------------------------------------------


def test_init_writes_a_project_that_validates_and_runs_a_batch_and_never_overwrites(cli: Cli, tmp_path: Path) -> None:
    project = tmp_path / "project"

    init = cli("init", str(project))
    again = cli("init", str(project))

    assert init.returncode == 0, init.stdout + init.stderr
    written = sorted(p.name for p in project.iterdir())
    assert {"modalkit.yaml", "pipeline.py", "app.py"} <= set(written)
    assert again.returncode == 2
    assert "modalkit.yaml" in again.stderr
    assert "exists already" in again.stderr
    folder = project / "data"
    folder.mkdir()
    (folder / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "text": f"text number {i}"}) + "\n" for i in range(25)), encoding="utf-8"
    )
    validate = cli("validate", "data", "results", "--id-field", "id", cwd=project)
    batch = cli("batch", "data", "results", "--id-field", "id", "--json", cwd=project)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert batch.returncode == 0, batch.stdout + batch.stderr
    summary = last_json_line(batch.stdout)
    assert (summary["records"], summary["succeeded"]) == (25, 25)
    # the Modal app builds offline, as `modal deploy app.py` imports it (nothing reaches Modal)
    build = "import app; web = app.web_endpoints.local(); print(app.app.name, sorted(r.path for r in web.routes))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))}
    built = subprocess.run([sys.executable, "-W", "error", "-c", build], cwd=project, env=env, capture_output=True,
                           text=True, timeout=120, check=False)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("my-model-dev [")
    assert "'/predict_sync'" in built.stdout


def test_validate_on_s3_reports_a_missing_sqs_queue_and_an_output_another_job_holds(
    cli: Cli, tmp_path: Path, s3: Any, sqs: Any, unique: str
) -> None:
    bucket = f"validate-{unique}"
    s3.create_bucket(Bucket=bucket)
    body = "".join(json.dumps({"id": f"r{i}", "text": "fine"}) + "\n" for i in range(8))
    s3.put_object(Bucket=bucket, Key="in/a.jsonl", Body=body.encode())
    s3.put_object(Bucket=bucket, Key="out/_job.json", Body=json.dumps({"job_id": "someone-else"}).encode())
    config = write_config(tmp_path)

    proc = cli("validate", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--config", str(config), "--id-field", "id",
               "--queue-backend", "sqs", "--success-queue", f"nowhere-{unique}")  # fmt: skip
    sqs.create_queue(QueueName=f"nowhere-{unique}")
    again = cli("validate", f"s3://{bucket}/in/", f"s3://{bucket}/out/", "--config", str(config), "--id-field",
                "id", "--queue-backend", "sqs", "--success-queue", f"nowhere-{unique}")  # fmt: skip

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"problem  queues: SQS queue 'nowhere-{unique}' does not exist" in proc.stdout
    assert "ok       records: 8 records from 1 file(s) parse and validate against Review" in proc.stdout
    assert again.returncode == 2, again.stdout
    assert f"problem  output: output s3://{bucket}/out already holds job someone-else" in again.stdout
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["in/a.jsonl", "out/_job.json"]  # nothing written


def test_validate_while_a_run_of_the_job_holds_its_lease_names_that_run_and_says_a_job_would_not_start(
    cli: Cli, tmp_path: Path
) -> None:
    from modalkit.batch.lease import take_lease
    from modalkit.batch.storage import default_store

    write_orders(tmp_path / "in", n=10)
    config = write_config(tmp_path)
    out = tmp_path / "out"
    first = cli("batch", str(tmp_path / "in"), str(out), "--config", str(config), "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    held = take_lease(default_store(), str(out), last_json_line(first.stdout)["job_id"], ttl_seconds=60.0,
                      flow_run_id="run-7")  # fmt: skip
    try:
        proc = cli("validate", str(tmp_path / "in"), str(out), "--config", str(config))
    finally:
        held.release()

    assert proc.returncode != 0, proc.stdout + proc.stderr
    [line] = [ln for ln in proc.stdout.splitlines() if ln.split()[:2] == ["problem", "output:"]]
    assert "already running" in line, line
    assert "Prefect flow run run-7" in line, line
    assert "--wait" in line, line
    assert proc.stdout.strip().splitlines()[-1].startswith("validate: a job would not start")
