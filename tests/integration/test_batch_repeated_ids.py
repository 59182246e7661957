"""Ids that occur more than once in a job: no queue message is lost, the counts agree, the job names the repeats.

Two files each holding ``order_id`` 0-4 (one packed chunk when small, two chunks when large). Each of their ten
records is its own message on the success queue (the deduplication id names the input record: job, file and
position, never the record id alone), the manifest's queued counts are what the queue holds, and the summary, the
manifest, the report and the CLI table say which ids occur more than once, in which files and where. Jobs run the
library's steps inline, as the flow does.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from batch_support import drain_sqs, read_manifest, read_parts, write_config

from modalkit.batch.chunk import process_chunk
from modalkit.batch.job import JobPlan, finalize_job, find_committed, plan_job, resolve_job_config, start_job
from modalkit.inference_pipeline import import_pipeline
from modalkit.iomodel import ChunkResult, JobSummary
from modalkit.queues import LocalQueueBackend, QueueBackend, SQSBackend
from modalkit.settings import Settings

TEXTS = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]


def two_files_sharing_ids(tmp_path: Path, pad: int = 0) -> str:
    """``x.jsonl`` and ``y.jsonl``, each with order_id 0-4 (the new user's input), packed into one chunk; with
    ``pad`` bytes more a record (in a field the pipeline ignores) each file can be a chunk of its own."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("x", "y"):
        rows = [json.dumps({"order_id": i, "text": f"{TEXTS[i % 3]} {name}", "pad": "x" * pad}) for i in range(5)]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(folder)


class Job:
    """One job run inline: plan, claim, skip what is committed, process the rest (``only`` limits that), finalize."""

    def __init__(self, tmp_path: Path, **job_config: Any) -> None:
        self.settings = Settings.load(str(write_config(tmp_path)))
        self.config = resolve_job_config(self.settings, **job_config)
        name, entry = self.settings.model_settings.entry(None)
        assert entry.pipeline is not None
        self.pipeline = import_pipeline(entry.pipeline)(name, str(tmp_path / "models"), {})

    def run(
        self, input_uri: str, output_uri: str, backend: QueueBackend | None = None, only: int | None = None
    ) -> tuple[JobPlan, list[ChunkResult], JobSummary]:
        plan = plan_job(self.settings, input_uri, output_uri, None, self.config)
        start_job(plan)
        done = find_committed(plan)
        todo = [c for c in plan.chunks if c.index not in done][:only]
        results = list(done.values()) + [process_chunk(plan.job, c, self.pipeline, backend) for c in todo]
        return plan, results, finalize_job(plan, results, 1.0)


def assert_names_the_five_repeats(summary: dict[str, Any]) -> None:
    assert summary["duplicate_ids"] == 5
    first = summary["duplicate_examples"][0]
    assert first["record_id"] == 0
    assert first["count"] == 2
    assert first["occurrences"] == [{"key": "x.jsonl", "position": 0}, {"key": "y.jsonl", "position": 0}]
    assert [e["record_id"] for e in summary["duplicate_examples"]] == [0, 1, 2, 3, 4]


def test_two_files_sharing_ids_put_every_record_on_the_local_queue_and_the_summary_names_the_repeats(
    tmp_path: Path,
) -> None:
    inp, out = two_files_sharing_ids(tmp_path), str(tmp_path / "out")
    backend = LocalQueueBackend(tmp_path / "queues")
    _, _, summary = Job(tmp_path, id_field="order_id", success_queue="s2").run(inp, out, backend)
    parts = read_parts(out)
    queued = [json.loads(body) for body in backend.messages("s2")]
    assert len(parts) == 10
    assert sorted((m["meta"]["key"], m["record_id"]) for m in queued) == sorted(
        (key, i) for key in ("x.jsonl", "y.jsonl") for i in range(5)
    )
    manifest = read_manifest(out)
    assert manifest["queued_success"] == len(queued) == 10
    assert_names_the_five_repeats(summary.model_dump())
    assert_names_the_five_repeats(manifest)


def test_two_files_sharing_ids_put_every_record_on_a_fifo_sqs_queue(tmp_path: Path, sqs: Any, unique: str) -> None:
    name = f"s2-{unique}.fifo"
    url = sqs.create_queue(QueueName=name, Attributes={"FifoQueue": "true"})["QueueUrl"]
    inp, out = two_files_sharing_ids(tmp_path), str(tmp_path / "out")
    Job(tmp_path, id_field="order_id", success_queue=name).run(inp, out, SQSBackend())
    queued = drain_sqs(sqs, url)
    assert sorted((m["meta"]["key"], m["record_id"]) for m in queued) == sorted(
        (key, i) for key in ("x.jsonl", "y.jsonl") for i in range(5)
    )
    manifest = read_manifest(out)
    assert manifest["queued_success"] == len(queued) == len(read_parts(out)) == 10
    assert_names_the_five_repeats(manifest)


def test_sqs_messages_carry_the_dedup_id_as_an_attribute_for_standard_queue_consumers(
    tmp_path: Path, sqs: Any, unique: str
) -> None:
    name = f"s2-{unique}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    inp, out = two_files_sharing_ids(tmp_path), str(tmp_path / "out")
    plan, _, _ = Job(tmp_path, id_field="order_id", success_queue=name).run(inp, out, SQSBackend())
    received: list[dict[str, Any]] = []
    while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]).get(
        "Messages", []
    ):
        received += batch
        sqs.delete_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)]
        )
    dedup_ids = {m["MessageAttributes"]["dedup_id"]["StringValue"] for m in received}
    assert len(received) == len(dedup_ids) == 10
    job_id = plan.job.job_id
    for message in received:
        body = json.loads(message["Body"])
        dedup = message["MessageAttributes"]["dedup_id"]["StringValue"]
        assert dedup == f"{job_id}:{body['meta']['key']}:{body['meta']['position']}"
        assert len(dedup) <= 128


def test_a_resumed_job_still_reports_the_repeats_of_the_chunks_committed_before(tmp_path: Path) -> None:
    inp, out = two_files_sharing_ids(tmp_path, pad=8_000), str(tmp_path / "out")  # 40 KB a file: two chunks
    backend = LocalQueueBackend(tmp_path / "queues")
    job = Job(tmp_path, id_field="order_id", success_queue="s2")
    _, _, first = job.run(inp, out, backend, only=1)  # interrupted after one chunk
    assert first.duplicate_ids == 0
    _, results, summary = job.run(inp, out, backend)
    assert [r.skipped for r in sorted(results, key=lambda r: r.index)] == [True, False]
    assert_names_the_five_repeats(summary.model_dump())
    assert_names_the_five_repeats(read_manifest(out))
    assert len(backend.messages("s2")) == read_manifest(out)["queued_success"] == 10


def test_a_finished_job_run_again_reports_its_repeats_from_the_manifest_without_merging_the_id_hashes_again(
    tmp_path: Path,
) -> None:
    inp, out = two_files_sharing_ids(tmp_path, pad=8_000), str(tmp_path / "out")
    job = Job(tmp_path, id_field="order_id")
    job.run(inp, out)
    shutil.rmtree(Path(out) / "_ids")  # what the merge reads: gone, so only the manifest can tell
    _, results, again = job.run(inp, out)
    assert all(r.skipped for r in results)
    assert_names_the_five_repeats(again.model_dump())
    assert_names_the_five_repeats(read_manifest(out))


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_repeats_inside_one_chunk_are_counted_with_those_across_chunks(tmp_path: Path, output_format: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    a_rows = [json.dumps({"id": i, "text": "ok"}) + "\n" for i in ["p", "q", "p"]]
    (folder / "a.jsonl").write_text("".join(a_rows))
    (folder / "b.jsonl").write_text("".join(json.dumps({"id": i, "text": "ok"}) + "\n" for i in ["q", "r"]))
    job = Job(tmp_path, id_field="id", output_format=output_format)
    _, _, summary = job.run(str(folder), str(tmp_path / "out"))
    assert summary.duplicate_ids == 2
    by_id = {e.record_id: e for e in summary.duplicate_examples}
    second, third = len(a_rows[0]), len(a_rows[0]) + len(a_rows[1])
    assert [(o.key, o.position) for o in by_id["p"].occurrences] == [("a.jsonl", 0), ("a.jsonl", third)]
    assert [(o.key, o.position) for o in by_id["q"].occurrences] == [("a.jsonl", second), ("b.jsonl", 0)]


def test_unique_ids_report_no_repeats(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, start in (("x", 0), ("y", 5)):
        rows = [json.dumps({"order_id": i, "text": "fine"}) for i in range(start, start + 5)]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    _, _, summary = Job(tmp_path, id_field="order_id").run(str(folder), out)
    assert (summary.duplicate_ids, summary.duplicate_examples) == (0, [])
    assert (read_manifest(out)["duplicate_ids"], read_manifest(out)["duplicate_examples"]) == (0, [])


def test_ids_from_positions_cannot_repeat_and_leave_no_id_bookkeeping(tmp_path: Path) -> None:
    inp, out = two_files_sharing_ids(tmp_path), tmp_path / "out"
    _, _, summary = Job(tmp_path).run(inp, str(out))
    assert summary.duplicate_ids == 0
    assert not (out / "_ids").exists()


def test_finding_repeats_among_a_hundred_thousand_records_takes_well_under_a_second(tmp_path: Path) -> None:
    from modalkit.batch.repeats import IdHashes, find_repeats

    store_dir = tmp_path / "ids"
    store_dir.mkdir()
    uris = []
    for chunk in range(10):
        hashes = IdHashes("f.jsonl")
        hashes.add([*range(chunk * 10_000, chunk * 10_000 + 10_000), chunk], list(range(10_001)))
        uri = str(store_dir / f"{chunk:05d}")
        hashes.write(uri)
        uris.append(uri)
    started = time.perf_counter()
    found = find_repeats(dict(enumerate(uris)))
    assert time.perf_counter() - started < 1.0
    assert found.count == 10  # 0 twice in chunk 0, and 1..9 in chunk 0 and again in chunks 1..9
