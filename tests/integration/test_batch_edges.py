"""The batch path at its edges: the record invariant holds for every input, every failure and every rerun.

Jobs here run the library's own steps in this process, as the flow runs them (plan, claim, find what is committed,
process each remaining chunk), with the example pipeline on local files or on a real moto_server's S3, and the
memory queue backend: each test is about what lands where, not about Prefect.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from batch_support import write_config

from modalkit.batch import storage
from modalkit.batch.chunk import process_chunk
from modalkit.batch.job import JobPlan, find_committed, plan_job, resolve_job_config, start_job
from modalkit.batch.layout import OutputLayout
from modalkit.exceptions import ConfigError, StorageError
from modalkit.inference_pipeline import InferencePipeline, import_pipeline
from modalkit.iomodel import ChunkResult, FailureRecord
from modalkit.queues import (
    S3_POINTER_CLASS,
    BatchQueueBackend,
    LocalQueueBackend,
    QueueBackend,
    QueueMessage,
    SQSBackend,
)
from modalkit.settings import Settings
from modalkit.task_queue import MemoryBackend

TEXTS = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]


def reviews(n: int, start: int = 0, filler: int = 8) -> bytes:
    return b"".join(
        json.dumps({"id": f"r{i:05d}", "text": f"{TEXTS[i % 3]} ({i}) " + "filler " * filler}).encode() + b"\n"
        for i in range(start, start + n)
    )


class Job:
    """One job's settings and steps, run inline."""

    def __init__(self, tmp_path: Path, **job_config: Any) -> None:
        self.settings = Settings.load(str(write_config(tmp_path)))
        self.config = resolve_job_config(self.settings, **job_config)
        self._pipeline: InferencePipeline | None = None

    def plan(self, input_uri: str, output_uri: str) -> JobPlan:
        return plan_job(self.settings, input_uri, output_uri, None, self.config)

    @property
    def pipeline(self) -> InferencePipeline:
        if self._pipeline is None:
            name, entry = self.settings.model_settings.entry(None)
            assert entry.pipeline is not None
            folder = self.settings.model_settings.local_model_repository_folder
            self._pipeline = import_pipeline(entry.pipeline)(name, folder, {})
        return self._pipeline

    def run(self, input_uri: str, output_uri: str, backend: QueueBackend | None = None) -> list[ChunkResult]:
        plan = self.plan(input_uri, output_uri)
        start_job(plan)
        done = find_committed(plan)
        fresh = [process_chunk(plan.job, c, self.pipeline, backend) for c in plan.chunks if c.index not in done]
        return list(done.values()) + fresh


# --- 1. commit markers are honoured only for this job's own chunk ---------------------------------------------


def test_a_rerun_with_another_chunk_size_after_the_claim_was_deleted_is_refused_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(3000))
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    first = Job(tmp_path, chunk_size="64KiB").run(inp, out)
    assert len(first) > 2
    os.remove(OutputLayout(out).job_claim)

    with pytest.raises(ConfigError, match=f"output {out} holds files .* but no _job.json"):
        Job(tmp_path, chunk_size="128KiB").run(inp, out)


def test_a_marker_of_another_job_is_an_error_naming_it_in_the_flow_and_in_the_worker(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "r.jsonl").write_bytes(reviews(50))
    (tmp_path / "b" / "r.jsonl").write_bytes(reviews(50, start=50))
    job = Job(tmp_path)
    job.run(str(tmp_path / "a"), str(tmp_path / "out-a"))
    plan_b = job.plan(str(tmp_path / "b"), str(tmp_path / "out-b"))
    start_job(plan_b)
    foreign = OutputLayout(str(tmp_path / "out-a")).marker(0)
    mine = OutputLayout(str(tmp_path / "out-b")).marker(0)
    os.makedirs(os.path.dirname(mine))
    Path(mine).write_bytes(Path(foreign).read_bytes())  # a marker copied in from another output

    with pytest.raises(ConfigError, match=f"{mine} commits job .*, not chunk 0 of this run"):
        find_committed(plan_b)
    with pytest.raises(ConfigError, match=f"{mine} commits job "):  # the worker's own guard says the same
        process_chunk(plan_b.job, plan_b.chunks[0], job.pipeline)
    assert not Path(OutputLayout(str(tmp_path / "out-b")).part(0)).exists()


def test_a_marker_for_a_chunk_the_plan_does_not_have_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(20))
    job = Job(tmp_path)
    out = str(tmp_path / "out")
    job.run(str(tmp_path / "in"), out)
    layout = OutputLayout(out)
    Path(layout.marker(7)).write_bytes(Path(layout.marker(0)).read_bytes())
    with pytest.raises(ConfigError, match=r"00007\.json commits a chunk this run does not have"):
        job.run(str(tmp_path / "in"), out)


# --- 2. claiming an output is atomic, and a foreign folder is never written into ----------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_jobs_claiming_one_output_at_once_exactly_one_gets_it(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "r.jsonl").write_bytes(reviews(5))
    (tmp_path / "b" / "r.jsonl").write_bytes(reviews(5, start=5))
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.create_bucket(Bucket="claims")
        out = "s3://claims/out"
    else:
        out = str(tmp_path / "out")
    job = Job(tmp_path)
    plans = [job.plan(str(tmp_path / "a"), out), job.plan(str(tmp_path / "b"), out)]  # both see no claim
    for _ in range(5 if where == "local" else 2):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []
        threads = [threading.Thread(target=claim_at_once, args=(plan, barrier, outcomes)) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes)[0] == "claimed"
        assert "already holds job" in sorted(outcomes)[1], outcomes
        storage.default_store().delete(OutputLayout(out).job_claim)


def claim_at_once(plan: JobPlan, barrier: threading.Barrier, outcomes: list[str]) -> None:
    barrier.wait()
    try:
        start_job(plan)
        outcomes.append("claimed")
    except ConfigError as exc:
        outcomes.append(str(exc))


def test_a_folder_with_foreign_files_and_no_claim_is_refused_and_left_untouched(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.jsonl").write_bytes(b"somebody else's results\n")
    with pytest.raises(ConfigError, match=r"holds files \(part-00000.jsonl\) but no _job.json"):
        Job(tmp_path).run(str(tmp_path / "in"), str(out))
    assert [p.name for p in out.iterdir()] == ["part-00000.jsonl"]
    assert (out / "part-00000.jsonl").read_bytes() == b"somebody else's results\n"


def test_files_a_job_writes_get_the_modes_its_part_files_get(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(20))
    out = tmp_path / "out"
    Job(tmp_path).run(str(tmp_path / "in"), str(out))
    layout = OutputLayout(str(out))
    modes = {name: os.stat(path).st_mode & 0o777 for name, path in
             [("part", layout.part(0)), ("claim", layout.job_claim), ("marker", layout.marker(0))]}  # fmt: skip
    assert len(set(modes.values())) == 1, modes


# --- 3. a queue never holds a record that no output file holds -------------------------------------------------


def test_a_chunk_failing_on_a_truncated_gzip_has_queued_no_record(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    whole = gzip.compress(reviews(4000, filler=2))
    (tmp_path / "in" / "r.jsonl.gz").write_bytes(whole[: len(whole) * 3 // 4])
    backend = MemoryBackend()
    job = Job(tmp_path, success_queue="ok", failure_queue="bad")
    with pytest.raises(StorageError, match=r"r.jsonl.gz"):
        job.run(str(tmp_path / "in"), str(tmp_path / "out"), backend)
    assert backend.messages("ok") == []
    assert backend.messages("bad") == []


def test_a_chunk_whose_part_file_cannot_be_written_has_queued_no_record(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(2000, filler=2))
    backend = MemoryBackend()
    job = Job(tmp_path, success_queue="ok")
    plan = job.plan(str(tmp_path / "in"), str(tmp_path / "out"))
    start_job(plan)
    os.makedirs(OutputLayout(plan.job.output_uri).part(0))  # a folder where the part file must go
    with pytest.raises(StorageError):
        process_chunk(plan.job, plan.chunks[0], job.pipeline, backend)
    assert backend.messages("ok") == []


# --- 6. bytes that are not UTF-8 fail their record, in every format; a BOM is accepted in every format --------


BAD_UTF8 = b"caf\xe9 was lovely"  # Latin-1, not UTF-8


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_record_that_is_not_utf8_fails_naming_the_byte_and_the_others_succeed(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "in").mkdir()
    if fmt == "csv":
        lines = [b"id,text\n", b"a,fine\n", b"b," + BAD_UTF8 + b"\n", b"c,also fine\n"]
    else:
        lines = [b'{"id":"a","text":"fine"}\n', b'{"id":"b","text":"' + BAD_UTF8 + b'"}\n', b'{"id":"c","text":"ok"}\n']
    (tmp_path / "in" / f"r.{fmt}").write_bytes(b"".join(lines))
    bad_at = len(b"".join(lines[: 2 if fmt == "csv" else 1])) + lines[2 if fmt == "csv" else 1].index(b"\xe9")
    out = tmp_path / "out"
    (result,) = Job(tmp_path, id_field="id" if fmt == "jsonl" else None).run(str(tmp_path / "in"), str(out))
    assert (result.succeeded, result.failed) == (2, 1)
    (failure,) = [json.loads(line) for line in (out / "_failures" / "part-00000.jsonl").read_bytes().splitlines()]
    assert failure["stage"] == "parse"
    assert failure["error_type"] == "UnicodeDecodeError"
    assert f"invalid UTF-8 at byte {bad_at}" in failure["error"]


def test_a_utf8_byte_order_mark_at_the_start_of_a_jsonl_file_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(b"\xef\xbb\xbf" + reviews(3))
    (result,) = Job(tmp_path, id_field="id").run(str(tmp_path / "in"), str(tmp_path / "out"))
    assert (result.succeeded, result.failed) == (3, 0)


# --- 10. the hint to run again only where a rerun can succeed; a broken pipeline is named --------------------


def test_a_pipeline_whose_init_raises_fails_the_job_naming_it_without_a_resume_hint(
    tmp_path: Path, prefect_api: str
) -> None:
    from flows.batch_inference import batch_inference
    from modalkit.exceptions import JobFailed

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(10))
    config = write_config(tmp_path, pipeline="pipelines:BrokenInit")
    with pytest.raises(JobFailed) as failed:
        batch_inference(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), config=str(config))
    message = str(failed.value)
    assert "the pipeline pipelines.BrokenInit could not be built" in message
    assert "OSError: weights.bin: no such file in the model folder" in message
    assert "run the job again" not in message
    assert failed.value.retryable is False


# --- 7. Parquet output keeps the data: typed ids, computed and extra fields, round-trip ----------------------


def test_parquet_output_keeps_integer_ids_computed_and_extra_fields_like_jsonl(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    lines = [json.dumps({"id": i, "text": TEXTS[i % 3]}).encode() + b"\n" for i in range(6)]
    (tmp_path / "in" / "r.jsonl").write_bytes(b"".join(lines))
    rows = {}
    for fmt in ("jsonl", "parquet"):
        job = Job(tmp_path, id_field="id", output_format=fmt)
        job.settings = Settings.load(str(write_config(tmp_path, pipeline="pipelines:TaggedSentiment")))
        out = tmp_path / f"out-{fmt}"
        job.run(str(tmp_path / "in"), str(out))
        part = OutputLayout(str(out), fmt).part(0)
        if fmt == "jsonl":
            rows[fmt] = [json.loads(line) for line in Path(part).read_bytes().splitlines()]
        else:
            table = pq.read_table(part)
            assert str(table.schema.field("record_id").type) == "int64"
            assert str(table.schema.field("confident").type) == "bool"
            rows[fmt] = []
            for r in table.to_pylist():
                extra = json.loads(r.pop("_extra"))
                rows[fmt].append({**r, **extra})
    assert rows["parquet"] == rows["jsonl"]
    assert rows["jsonl"][0].keys() == {"record_id", "label", "score", "confident", "words"}
    assert [r["record_id"] for r in rows["parquet"]] == list(range(6))


# --- 8. a pipeline that breaks its contract for every record stops the job at once --------------------------


def test_a_pipeline_returning_no_outputs_stops_the_chunk_naming_the_stage_and_both_counts(tmp_path: Path) -> None:
    from modalkit.inference_pipeline import ContractBroken

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(300))
    job = Job(tmp_path)
    job.settings = Settings.load(str(write_config(tmp_path, pipeline="pipelines:ReturnsNothing")))
    with pytest.raises(ContractBroken) as broken:
        job.run(str(tmp_path / "in"), str(tmp_path / "out"))
    assert "ReturnsNothing.postprocess broke the pipeline contract: it returned 0 outputs for 1 inputs" in str(
        broken.value
    )
    assert "(the first batch it failed on: returned 0 outputs for 64 inputs)" in str(broken.value)
    assert broken.value.retryable is False
    assert not (tmp_path / "out" / "_failures" / "part-00000.jsonl").exists()  # nothing committed as failures


# --- 12. blank lines and empty files: one rule for every format ----------------------------------------------


def test_blank_lines_are_not_records_and_empty_files_hold_none_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b'{"text":"good"}\n   \n\n{"text":"fine"}\n')
    (tmp_path / "in" / "b.csv").write_bytes(b"text\ngood\n   \n\nfine\n")
    for name in ("empty.jsonl", "empty.csv", "empty.parquet", "blank.csv"):
        (tmp_path / "in" / name).write_bytes(b"" if name.startswith("empty") else b"\n  \n")
    (tmp_path / "in" / "header-only.csv").write_bytes(b"text\n")
    results = Job(tmp_path).run(str(tmp_path / "in"), str(tmp_path / "out"))
    assert sum(r.records for r in results) == 4
    assert sum(r.failed for r in results) == 0


# --- 13. files that are not data are counted and named, not dropped without a word ---------------------------


def test_skipped_hidden_files_are_counted_in_the_summary(tmp_path: Path) -> None:
    from modalkit.batch.job import finalize_job

    (tmp_path / "in" / "_tmp").mkdir(parents=True)
    (tmp_path / "in" / "a.jsonl").write_bytes(reviews(3))
    (tmp_path / "in" / "_tmp" / "b.jsonl").write_bytes(reviews(3))
    (tmp_path / "in" / ".c.jsonl").write_bytes(reviews(3))
    job = Job(tmp_path)
    plan = job.plan(str(tmp_path / "in"), str(tmp_path / "out"))
    assert plan.skipped_files == [".c.jsonl", "_tmp/b.jsonl"]
    results = job.run(str(tmp_path / "in"), str(tmp_path / "out"))
    summary = finalize_job(plan, results, 1.0)
    assert summary.files_skipped == 2
    assert summary.records == 3


# --- 18. S3 errors keep the AWS error code -------------------------------------------------------------------


def test_a_storage_error_from_s3fs_keeps_the_aws_error_code() -> None:
    from botocore.exceptions import ClientError

    from modalkit.exceptions import storage_errors

    aws = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "The AWS Access Key Id you provided does "
                                 "not exist in our records."}}, "ListObjectsV2")  # fmt: skip
    translated = PermissionError("Forbidden")  # what s3fs raises for a 403, with the AWS error as its cause
    translated.__cause__ = aws
    expected = "permission denied \\(InvalidAccessKeyId: The AWS Access Key Id"
    with pytest.raises(StorageError, match=expected), storage_errors("listing s3://bucket/in"):
        raise translated


# --- 17. what a job leaves behind: staging folders of killed workers, empty part files -----------------------


def test_staging_folders_left_by_a_killed_worker_are_gone_after_the_job_ends(tmp_path: Path) -> None:
    from modalkit.batch.job import finalize_job

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(5))
    out = tmp_path / "out"
    job = Job(tmp_path)
    plan = job.plan(str(tmp_path / "in"), str(out))
    start_job(plan)
    (out / ".staging-0123456789ab").mkdir()  # what a SIGKILLed worker leaves
    (out / ".staging-0123456789ab" / "part").write_bytes(b"half a part file")
    finalize_job(plan, job.run(str(tmp_path / "in"), str(out)), 1.0)
    assert sorted(p.name for p in out.iterdir()) == ["_chunks", "_job.json", "_manifest.json", "part-00000.jsonl"]


def test_chunks_that_own_no_record_leave_a_marker_and_no_empty_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    long_line = json.dumps({"id": "long", "text": "word " * 60_000}).encode() + b"\n"  # 300 KB: five chunks
    (tmp_path / "in" / "r.jsonl").write_bytes(long_line + reviews(1))
    out = tmp_path / "out"
    results = Job(tmp_path, chunk_size="64KiB").run(str(tmp_path / "in"), str(out))
    assert len(results) == 5
    assert sum(r.records for r in results) == 2
    # the long record fails (text over the model's max_length): chunk 0 has a failure file and, with no success,
    # no part file
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00004.jsonl"]
    assert sorted(p.name for p in (out / "_failures").iterdir()) == ["part-00000.jsonl"]
    assert len(list((out / "_chunks").glob("*.json"))) == 5


# --- 5. duplicate record ids: every repeat fails on its own, and the queues hold what the files hold ------------


def test_repeated_ids_fail_as_duplicates_and_the_queues_hold_exactly_the_files_records(tmp_path: Path) -> None:
    from batch_support import read_failures, read_parts

    (tmp_path / "in").mkdir()
    ids: list[Any] = ["a", "a", "a", "b", "b", 7, "7", "c", "d", "e", "f"]
    (tmp_path / "in" / "r.jsonl").write_bytes(
        b"".join(json.dumps({"id": i, "text": TEXTS[n % 3]}).encode() + b"\n" for n, i in enumerate(ids))
    )
    backend = MemoryBackend()  # drops a message whose dedup id it has seen on that queue, as SQS FIFO queues do
    out = str(tmp_path / "out")
    (result,) = Job(tmp_path, id_field="id", success_queue="ok", failure_queue="bad").run(
        str(tmp_path / "in"), out, backend
    )
    parts, failures = read_parts(out), read_failures(out)
    assert [r["record_id"] for r in parts] == ["a", "b", 7, "c", "d", "e", "f"]
    assert [(f["record_id"], f["error_type"]) for f in failures] == [
        ("a", "DuplicateRecordId"), ("a", "DuplicateRecordId"), ("b", "DuplicateRecordId"), ("7", "DuplicateRecordId")
    ]  # fmt: skip
    assert "is already the id of the record at r.jsonl at byte 0" in failures[0]["error"]
    assert len(parts) + len(failures) == len(ids)
    assert [json.loads(m)["record_id"] for m in backend.messages("ok")] == [r["record_id"] for r in parts]
    assert len(backend.messages("bad")) == len(failures)  # no failure record dropped as a repeat
    assert (result.queued_success, result.queued_failure) == (len(parts), len(failures))


# --- 9. a record that kills its worker fails alone, as WorkerCrashed --------------------------------------------


def test_a_record_that_kills_its_worker_fails_alone_and_the_rest_of_its_chunk_is_scored(
    tmp_path: Path, prefect_api: str
) -> None:
    from batch_support import assert_record_invariant, read_failures

    from flows.batch_inference import batch_inference

    (tmp_path / "in").mkdir()
    lines = reviews(600).splitlines(keepends=True)
    lines[321] = json.dumps({"id": "killer", "text": "KILL-WORKER right here"}).encode() + b"\n"
    (tmp_path / "in" / "r.jsonl").write_bytes(b"".join(lines))
    config = write_config(tmp_path, pipeline="pipelines:KillsItsWorker", job_config={"chunk_size": "1MiB"})
    out = str(tmp_path / "out")
    summary = batch_inference(input_uri=str(tmp_path / "in"), output_uri=out, config=str(config), id_field="id")
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (600, 599, 1)
    (failure,) = read_failures(out)
    assert (failure["record_id"], failure["error_type"]) == ("killer", "WorkerCrashed")
    ids = [json.loads(line)["id"] for line in lines]
    assert_record_invariant(out, ids, summary=summary)


# --- 14. a local file's identity is its content, not its modification time -------------------------------------


def test_touching_an_input_keeps_the_job_and_changing_it_makes_another(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "r.jsonl"
    path.write_bytes(reviews(30))
    job = Job(tmp_path)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    first = job.plan(inp, out).job.job_id
    job.run(inp, out)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # touch
    assert job.plan(inp, out).job.job_id == first
    job.run(inp, out)  # resumes: nothing "already holds job ..."
    data = bytearray(path.read_bytes())
    data[data.index(b"great")] = ord("G")  # same size, other content
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="already holds job"):
        job.plan(inp, out)


# --- 16. a model entry's keys are validated against the pipeline's declared parameters -------------------------


def test_a_typo_in_a_model_entry_fails_the_job_before_it_writes_anything(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(3))
    job = Job(tmp_path)
    job.settings = Settings.load(
        str(write_config(tmp_path, pipeline="modalkit.examples.sentiment:SentimentPipeline")),
        data={"model_settings": {"model_entries": {"sentiment": {"n_featurs": 1024}}}},
    )
    with pytest.raises(
        ConfigError, match=r"model_entries\.sentiment\.n_featurs: unknown key; did you mean 'n_features'"
    ):
        job.plan(str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- 11. a queue gets every body whole that it can take; the size policy is the queue backend's ------------------

HUGE = {"id": "huge", "text": 12345, "notes": ["x" * 1000] * 200}  # 200 KB, and text is not a string


def huge_failure_job(tmp_path: Path, backend: QueueBackend) -> list[dict[str, Any]]:
    """Runs a job whose first record (HUGE) fails validation, with the failure queue ``bad``; its failure rows."""
    from batch_support import read_failures

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(json.dumps(HUGE).encode() + b"\n" + reviews(2))
    out = str(tmp_path / "out")
    Job(tmp_path, id_field="id", failure_queue="bad").run(str(tmp_path / "in"), out, backend)
    failures = read_failures(out)
    assert [f["input"] for f in failures] == [HUGE]  # the failure file has it whole, whatever the queue
    return failures


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_huge_failure_reaches_a_queue_without_a_size_limit_whole(tmp_path: Path, kind: str) -> None:
    backend = LocalQueueBackend(tmp_path / "queues") if kind == "local" else MemoryBackend()
    failures = huge_failure_job(tmp_path, backend)
    (message,) = backend.messages("bad")
    queued = FailureRecord.model_validate_json(message)
    assert queued.input == HUGE
    assert not queued.input_truncated
    assert json.loads(message) == failures[0]
    backend.close()


def test_a_huge_failure_on_sqs_goes_to_s3_and_its_pointer_resolves_to_the_whole_record(
    tmp_path: Path, s3: Any, sqs: Any, unique: str
) -> None:
    s3.create_bucket(Bucket=f"big-{unique}")
    url = sqs.create_queue(QueueName=f"bad-{unique}")["QueueUrl"]
    backend = SQSBackend(sqs, s3_client=s3, large_message_threshold=64 * 1024, large_message_uri=f"s3://big-{unique}/q")
    failures = huge_failure_job(tmp_path, _Renamed(backend, {"bad": f"bad-{unique}"}))
    (message,) = [m["Body"] for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]]
    assert message.startswith(f'["{S3_POINTER_CLASS}"')
    assert json.loads(backend.resolve_body(message)) == failures[0]


def test_a_huge_failure_on_sqs_without_large_message_uri_is_queued_with_the_start_of_its_input(
    tmp_path: Path, sqs: Any, unique: str
) -> None:
    url = sqs.create_queue(QueueName=f"bad-{unique}")["QueueUrl"]
    backend = SQSBackend(sqs, large_message_threshold=64 * 1024)
    failures = huge_failure_job(tmp_path, _Renamed(backend, {"bad": f"bad-{unique}"}))
    (message,) = [m["Body"] for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]]
    assert len(message.encode()) <= 64 * 1024
    queued = FailureRecord.model_validate_json(message)
    assert queued.input_truncated
    assert orjson.dumps(HUGE).decode().startswith(queued.input.removesuffix("..."))
    assert queued.model_dump(exclude={"input", "input_truncated"}) == FailureRecord.model_validate(
        failures[0]
    ).model_dump(exclude={"input", "input_truncated"})


class _Renamed(BatchQueueBackend):
    """Sends to ``backend`` under other queue names (each test's SQS queue has a unique name)."""

    def __init__(self, backend: BatchQueueBackend, names: dict[str, str]) -> None:
        self.backend, self.names = backend, names

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        return self.backend.send_batch(self.names[queue_name], messages)


def test_a_pipeline_lacking_a_method_fails_at_planning_before_the_output_is_claimed(tmp_path: Path) -> None:
    from modalkit.exceptions import PipelineError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(3))
    job = Job(tmp_path)
    job.settings = Settings.load(str(write_config(tmp_path, pipeline="pipelines:LacksPostprocess")))
    with pytest.raises(PipelineError, match="LacksPostprocess cannot be built: it lacks postprocess"):
        job.plan(str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- 4. split_csv: a chunk commits only when it is proven to start at a record boundary -----------------------


def quoted_trap_csv() -> bytes:
    """A CSV whose third record holds 1,500 quoted lines shaped like records, around 200 KB: cut at 64 KiB, the
    chunks after the first start inside that quoted field."""
    rows = [b"id,text\n", b"r1,fine\n", b"r2,also fine\n"]
    fake = b"".join(b"fake%04d,looks like a record %s\n" % (i, b"x" * 100) for i in range(1500))
    rows.append(b'r3,"' + fake + b'end of the field"\n')
    rows += [b"r4,after\n", b"r5,last\n"]
    return b"".join(rows)


def test_split_csv_never_commits_records_cut_out_of_a_quoted_field(tmp_path: Path) -> None:
    from batch_support import read_parts

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.csv").write_bytes(quoted_trap_csv())
    job = Job(tmp_path, chunk_size="64KiB", split_csv=True, id_field="id")
    out = str(tmp_path / "out")
    plan = job.plan(str(tmp_path / "in"), out)
    start_job(plan)
    assert len(plan.chunks) >= 3
    errors = {}
    for chunk in reversed(plan.chunks):  # the later chunks first, as a worker beside chunk 0 may run them
        try:
            process_chunk(plan.job, chunk, job.pipeline)
        except StorageError as exc:
            errors[chunk.index] = str(exc)
    assert set(errors) == {c.index for c in plan.chunks}, "a chunk committed though no chunk before it is proven"
    assert "odd number of quote characters" in errors[0]
    assert all("split_csv to false" in e for e in errors.values())
    assert not [r for r in read_parts(out) if str(r["record_id"]).startswith("fake")]
    assert not list((tmp_path / "out" / "_chunks").glob("*.json"))


def test_split_csv_without_quoted_line_breaks_is_cut_and_proven_whatever_order_the_chunks_run_in(
    tmp_path: Path,
) -> None:
    from batch_support import read_parts

    (tmp_path / "in").mkdir()
    lines = [b"id,text\n"] + [b'r%05d,"a ""quoted"" review, number %d %s"\n' % (i, i, b"y" * 60) for i in range(3000)]
    (tmp_path / "in" / "t.csv").write_bytes(b"".join(lines))
    job = Job(tmp_path, chunk_size="64KiB", split_csv=True, id_field="id")
    out = str(tmp_path / "out")
    plan = job.plan(str(tmp_path / "in"), out)
    start_job(plan)
    assert len(plan.chunks) >= 3
    results = [process_chunk(plan.job, chunk, job.pipeline) for chunk in reversed(plan.chunks)]
    assert sum(r.records for r in results) == 3000
    assert sorted(r["record_id"] for r in read_parts(out)) == [f"r{i:05d}" for i in range(3000)]
