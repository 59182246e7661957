"""The ``batch-inference`` flow end to end: inputs in S3 and queues in SQS on a real moto_server, the flow on
Prefect's test server, chunks on the local worker pool (two spawned processes running ``PoisonAwareSentiment``).

What a user relies on: every input record comes out exactly once, as a success row or as a failure row that says
where it was and why it failed; the queues carry the same records; the manifest, the returned summary, the queues
and the Prefect artifacts tell the same numbers; too many failures fail the job without losing a record; and a job
run again does nothing twice.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_support import (
    assert_record_invariant,
    drain_sqs,
    duplicates,
    read_failures,
    read_manifest,
    read_parts,
    write_config,
)

from flows.batch_inference import JobFailed, batch_inference
from modalkit.batch import storage
from modalkit.task_queue import LocalQueueBackend

pytestmark = pytest.mark.slow

#: The smallest chunk_size a job accepts; the files below are a few times larger, so each is cut into chunks.
CHUNK = 64 * 1024
#: The CSV files below hold no quoted line breaks, so the jobs may cut them like JSONL (``split_csv``).
SPLIT_CSV = {"job_config": {"split_csv": True}}
SUCCESS_KEYS = {"job_id", "record_id", "status", "output", "meta"}
FAILURE_KEYS = {"job_id", "record_id", "status", "stage", "error_type", "error", "input", "meta"}
PIPELINE_ERRORS = {
    "preprocess": ("ValueError", "POISON-PRE"),
    "predict": ("RuntimeError", "POISON-PREDICT"),
    "postprocess": ("KeyError", "POISON-POST"),
}
_WORDS = [
    "kettle", "boils", "fast", "and", "the", "handle", "stays", "cool", "while", "the", "lid", "clicks", "shut",
    "with", "a", "firm", "snap", "every", "single", "morning", "blender", "jacket", "laptop", "charger",
    "service", "book", "chair", "headset", "backpack", "camera", "lamp", "mattress", "sturdy", "reliable",
    "noisy", "quiet", "heavy", "light", "bright", "dim", "soft", "hard", "cheap", "pricey", "arrived", "monday",
    "tuesday", "friday", "courier", "parcel", "box", "colour",
]  # fmt: skip


# --- the dataset: files written to S3 with what each record must become -------------------------------------


@dataclass(frozen=True)
class Expected:
    """One input record and its fate: a success (``stage`` None) or a failure at ``stage``."""

    record_id: Any
    key: str
    position: int
    stage: str | None = None
    error_type: str | None = None
    error_has: tuple[str, ...] = ()
    input: Any = None


def review(rng: random.Random, marker: str = "", words: int = 230) -> str:
    """A review of about 6 bytes a word, different every time (so Parquet pages do not shrink it to nothing)."""
    opening = rng.choice(["Great kettle, works well.", "Terrible blender, it broke.", "The lamp arrived on friday."])
    return f"{marker}{opening} " + " ".join(rng.choice(_WORDS) for _ in range(words))


class Dataset:
    """Input files under ``s3://bucket/prefix/`` and the expected outcome of every record in them.

    Args:
        s3: boto3 S3 client.
        bucket: Where the files go.
        prefix: Key prefix of the input (the job's input URI is ``s3://bucket/prefix``).
        id_field: The job's ``id_field`` (None: ids are ``<key>:<position>``), which decides some outcomes.
    """

    def __init__(self, s3: Any, bucket: str, prefix: str, id_field: str | None, seed: int = 7) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.id_field = id_field
        self.rng = random.Random(seed)
        self.expected: list[Expected] = []
        self.keys: list[str] = []
        self.line_starts: dict[str, set[int]] = {}

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=body)
        self.keys.append(key)

    def _rid(self, key: str, position: int, given: Any) -> Any:
        return given if self.id_field else f"{key}:{position}"

    # JSONL ------------------------------------------------------------------------------------------------------

    def jsonl(
        self,
        key: str,
        n: int,
        tag: str,
        *,
        int_ids: bool = False,
        line_bytes: int | None = None,
        kinds: Callable[[int], str] | None = None,
    ) -> None:
        """``n`` records with poison of every kind mixed in, and one whitespace-only line (not a record).

        ``line_bytes``: every line is exactly this long (padded with spaces), so that cuts at multiples of it or at
        equal parts of the file fall exactly on line starts, the other case of the reader's alignment.
        """
        words = 100 if line_bytes else 230
        rows: list[tuple[bytes, str, Any]] = []  # (line without newline, kind, id)
        for i in range(n):
            rid: Any = 10_000 * (1 + len(self.keys)) + i if int_ids else f"{tag}-{i:03d}"
            kind = (kinds or _kind)(i)
            rows.append((self._json_line(kind, rid, words), kind, rid))
        rows.insert(n // 3, (b"   ", "blank", None))
        if line_bytes:
            rows = [(_fill(line, line_bytes - 1), kind, rid) for line, kind, rid in rows]
        self._put(key, b"\n".join(line for line, _, _ in rows))  # no newline after the last line
        position = 0
        self.line_starts[key] = set()
        for line, kind, rid in rows:
            self.line_starts[key].add(position)
            if kind != "blank":
                self.expected.append(self._jsonl_outcome(key, position, line, kind, rid))
            position += len(line) + 1

    def _json_line(self, kind: str, rid: Any, words: int) -> bytes:
        text = review(self.rng, _MARKERS.get(kind, ""), words)
        record: Any = {"id": rid, "text": text, "stars": self.rng.randint(1, 5)}
        if kind == "bad_json":
            return json.dumps(record).encode()[:60]  # cut inside the text: unterminated string
        if kind == "array":
            return json.dumps([rid, text]).encode()
        if kind == "missing_text":
            del record["text"]
        elif kind == "empty_text":
            record["text"] = ""
        elif kind == "wrong_type":
            record["text"] = 12345
        elif kind == "bad_id":
            record["id"] = 1.5
        elif kind == "no_id":
            del record["id"]
        return json.dumps(record).encode()

    def _jsonl_outcome(self, key: str, pos: int, line: bytes, kind: str, rid: Any) -> Expected:
        where = f"{key} at byte {pos}"
        ident = self._rid(key, pos, rid)
        if kind == "bad_json":
            return Expected(f"{key}:{pos}", key, pos, "parse", "JSONDecodeError", (where, "invalid JSON"),
                            line.decode())  # fmt: skip
        data = json.loads(line)
        if kind == "array":
            return Expected(f"{key}:{pos}", key, pos, "validate", "InvalidRecordId", (where, "JSON list"), data)
        if kind in ("bad_id", "no_id") and self.id_field:
            reason = "'id' is a float" if kind == "bad_id" else "no 'id' field"
            return Expected(f"{key}:{pos}", key, pos, "validate", "InvalidRecordId", (where, reason), data)
        return self._common(kind, key, pos, ident, where, data)

    def _common(self, kind: str, key: str, pos: int, ident: Any, where: str, data: Any) -> Expected:
        validation = {
            "missing_text": "Field required",
            "empty_text": "at least 1 character",
            "wrong_type": "valid string",
            "null_text": "valid string",
        }
        if kind in validation:
            return Expected(ident, key, pos, "validate", "ValidationError",
                            (where, "field 'text'", validation[kind]), data)  # fmt: skip
        if kind in PIPELINE_ERRORS:
            error_type, marker = PIPELINE_ERRORS[kind]
            return Expected(ident, key, pos, kind, error_type, (marker,), data)
        return Expected(ident, key, pos)

    # CSV --------------------------------------------------------------------------------------------------------

    def csv(self, key: str, n: int, tag: str, *, line_bytes: int | None = None) -> None:
        """``n`` rows (columns id,text,stars) with empty texts, ragged lines, quoted commas and pipeline poison.

        ``line_bytes``: every row is exactly this long (its last field padded with spaces); see :meth:`jsonl`.
        """
        header = _csv_line(["id", "text", "stars"])
        words = 100 if line_bytes else 230
        rows: list[tuple[bytes, str, Any]] = []
        for i in range(n):
            rid = f"{tag}-{i:03d}"
            kind = _csv_kind(i)
            fields = self._csv_fields(kind, rid, words)
            if line_bytes:  # spaces need no quoting, so the line grows by exactly as many bytes
                fields[-1] += " " * (line_bytes - 1 - len(_csv_line(fields)))
            rows.append((_csv_line(fields), kind, rid))
            assert not line_bytes or len(rows[-1][0]) == line_bytes - 1
        self._put(key, b"\n".join([header, *(line for line, _, _ in rows)]) + b"\n")
        position = len(header) + 1
        self.line_starts[key] = set()
        for line, kind, rid in rows:
            self.line_starts[key].add(position)
            where = f"{key} at byte {position}"
            if kind == "ragged":
                self.expected.append(Expected(f"{key}:{position}", key, position, "parse", "CSVError",
                                              (where, "4 fields", "header has 3"), line.decode()))  # fmt: skip
            else:
                data = dict(zip(["id", "text", "stars"], next(csv.reader([line.decode()])), strict=True))
                self.expected.append(self._common(kind, key, position, self._rid(key, position, rid), where, data))
            position += len(line) + 1

    def _csv_fields(self, kind: str, rid: Any, words: int) -> list[str]:
        text = review(self.rng, _MARKERS.get(kind, ""), words)
        if kind == "quoted":
            text = f'She said "fine, I guess", then {text}'
        if kind == "empty_text":
            text = ""
        fields = [rid, text, str(self.rng.randint(1, 5))]
        if kind == "ragged":
            fields.append("an extra field")
        return fields

    # Parquet ----------------------------------------------------------------------------------------------------

    def parquet(self, key: str, n: int, tag: str, row_group_size: int) -> None:
        """``n`` rows in row groups of ``row_group_size``, with null/empty texts, null ids and poison."""
        kinds = [_parquet_kind(i) for i in range(n)]
        ids = [None if kind == "null_id" else f"{tag}-{i:03d}" for i, kind in enumerate(kinds)]
        texts: list[str | None] = [review(self.rng, _MARKERS.get(kind, "")) for kind in kinds]
        for i, kind in enumerate(kinds):
            if kind == "null_text":
                texts[i] = None
            elif kind == "empty_text":
                texts[i] = ""
        stars = [self.rng.randint(1, 5) for _ in kinds]
        table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()), "stars": stars})
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=row_group_size)
        self._put(key, sink.getvalue())
        for row, kind in enumerate(kinds):
            where = f"{key} at row {row}"
            data = {"id": ids[row], "text": texts[row], "stars": stars[row]}
            if kind == "null_id" and self.id_field:
                self.expected.append(Expected(f"{key}:{row}", key, row, "validate", "InvalidRecordId",
                                              (where, "no 'id' field"), data))  # fmt: skip
            else:
                self.expected.append(self._common(kind, key, row, self._rid(key, row, ids[row]), where, data))

    # expectations -----------------------------------------------------------------------------------------------

    def cuts(self) -> dict[str, set[int]]:
        """Where the job's planner cuts each JSONL/CSV file after its first chunk (byte offsets)."""
        from modalkit.batch.planning import list_dataset, plan_chunks

        cuts: dict[str, set[int]] = {key: set() for key in self.line_starts}
        chunks = [c for c in plan_chunks(list_dataset(self.uri), CHUNK, split_csv=True) if c.key in cuts]
        firsts = {key: min(c.extent.start for c in chunks if c.key == key) for key in cuts}
        for c in chunks:
            if c.extent.start != firsts[c.key]:
                cuts[c.key].add(c.extent.start)
        return cuts

    @property
    def successes(self) -> list[Expected]:
        return [e for e in self.expected if e.stage is None]

    @property
    def failures(self) -> list[Expected]:
        return [e for e in self.expected if e.stage is not None]


_MARKERS = {"preprocess": "POISON-PRE ", "predict": "POISON-PREDICT ", "postprocess": "POISON-POST "}
# the kinds of bad (and awkward) records, mixed in at a regular stride, cycling through each list
_JSONL_POISON = ["bad_json", "array", "missing_text", "empty_text", "wrong_type", "bad_id", "no_id",
                 "predict", "preprocess", "postprocess", "predict"]  # fmt: skip
_CSV_POISON = ["ragged", "empty_text", "predict", "preprocess", "postprocess", "quoted"]
_PARQUET_POISON = ["null_text", "empty_text", "null_id", "predict", "preprocess", "postprocess"]


def _kind(i: int) -> str:
    return _JSONL_POISON[(i // 5) % len(_JSONL_POISON)] if i % 5 == 3 or i % 23 == 4 else "ok"


def _csv_kind(i: int) -> str:
    return _CSV_POISON[(i // 4) % len(_CSV_POISON)] if i % 4 == 3 else "ok"


def _parquet_kind(i: int) -> str:
    return _PARQUET_POISON[(i // 4) % len(_PARQUET_POISON)] if i % 4 == 3 else "ok"


def _csv_line(fields: list[Any]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue().encode()


def _fill(line: bytes, size: int) -> bytes:
    """``line`` padded with spaces to ``size`` bytes (JSON allows trailing whitespace; bad JSON stays bad)."""
    assert len(line) <= size, (len(line), size)
    return line.ljust(size)


# --- fixtures and checks -------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3: Any, unique: str) -> str:
    name = f"batch-{unique}"
    s3.create_bucket(Bucket=name)
    return name


def run_job(tmp_path: Path, input_uri: str, output_uri: str, settings: dict[str, Any] | None = None,
            **params: Any) -> dict[str, Any]:  # fmt: skip
    """Run the flow in this process (against the Prefect test server) and return its summary."""
    config = write_config(tmp_path, **(settings or {}))
    return batch_inference(input_uri, output_uri, config=str(config), **params)


def chunks_per_file(output_uri: str) -> Counter[str]:
    """How many chunks each input file was cut into, from the commit markers."""
    fs, root = storage.default_store().filesystem(output_uri)
    fs.invalidate_cache()
    markers = [m for m in fs.find(f"{root}/_chunks") if m.endswith(".json") and "progress" not in m]
    return Counter(json.loads(fs.cat_file(m))["key"] for m in markers)


def check_outputs(ds: Dataset, output_uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every input record is in exactly one part or failure file, and each failure says where and why."""
    assert_record_invariant(output_uri, [e.record_id for e in ds.expected])
    parts, failures = read_parts(output_uri), read_failures(output_uri)
    ids = [row["record_id"] for row in parts] + [row["record_id"] for row in failures]
    assert duplicates(ids) == {}
    assert Counter(ids) == Counter(e.record_id for e in ds.expected)
    assert sorted(map(str, (row["record_id"] for row in parts))) == sorted(str(e.record_id) for e in ds.successes)
    for row in parts:
        assert set(row) == {"record_id", "label", "score"}, row
        assert row["label"] in ("negative", "neutral", "positive")
        assert 0.0 <= row["score"] <= 1.0
    by_id = {row["record_id"]: row for row in failures}
    for e in ds.failures:
        row = by_id[e.record_id]
        got = (row["stage"], row["error_type"])
        assert got == (e.stage, e.error_type), (e, row["error"])
        for fragment in e.error_has:
            assert fragment in row["error"], (fragment, row["error"])
        assert row["input"] == e.input, e.record_id
    return parts, failures


def check_summary(ds: Dataset, summary: dict[str, Any], output_uri: str, status: str = "completed") -> dict[str, Any]:
    """The summary counts every record once and agrees with ``_manifest.json``."""
    assert summary["records"] == len(ds.expected)
    assert summary["succeeded"] == len(ds.successes)
    assert summary["failed"] == len(ds.failures)
    assert summary["records"] == summary["succeeded"] + summary["failed"]
    assert summary["output_uri"] == output_uri
    manifest = read_manifest(output_uri)
    contract = ["job_id", "records", "succeeded", "failed", "chunks", "chunks_skipped", "seconds", "records_per_s",
                "output_uri"]  # fmt: skip
    assert {k: manifest[k] for k in contract} == {k: summary[k] for k in contract}
    assert manifest["status"] == status
    return manifest


def check_queue_messages(
    ds: Dataset, job_id: str, successes: list[dict[str, Any]], failures: list[dict[str, Any]],
    parts: list[dict[str, Any]], failure_rows: list[dict[str, Any]],
) -> None:  # fmt: skip
    """The queues hold exactly the records of the part and failure files, in the contract's shape."""
    where = {e.record_id: {"key": e.key, "position": e.position} for e in ds.expected}
    assert Counter(m["record_id"] for m in successes) == Counter(row["record_id"] for row in parts)
    assert Counter(m["record_id"] for m in failures) == Counter(row["record_id"] for row in failure_rows)
    outputs = {row["record_id"]: {k: v for k, v in row.items() if k != "record_id"} for row in parts}
    for m in successes:
        assert set(m) == SUCCESS_KEYS, m
        assert (m["job_id"], m["status"]) == (job_id, "success")
        assert m["output"] == outputs[m["record_id"]]
        assert m["meta"] == where[m["record_id"]]
    rows = {row["record_id"]: row for row in failure_rows}
    for m in failures:
        assert set(m) == FAILURE_KEYS, m
        assert (m["job_id"], m["status"]) == (job_id, "error")
        row = rows[m["record_id"]]
        assert [m[k] for k in ("stage", "error_type", "error", "input")] == [
            row[k] for k in ("stage", "error_type", "error", "input")
        ]
        assert m["meta"] == where[m["record_id"]]


def prefect_records(job_id: str) -> tuple[dict[str, Any], list[Any], Any, str]:
    """From the Prefect server: the summary table (field -> value), the progress artifacts, and the state and
    flow name of the flow run that published them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = [f"batch-summary-{job_id}", f"batch-progress-{job_id}"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
        tables = [a for a in artifacts if a.key == keys[0]]
        progress = [a for a in artifacts if a.key == keys[1]]
        assert len(tables) == 1, artifacts
        table = tables[0]
        assert table.type == "table"
        assert [a.flow_run_id for a in progress] == [table.flow_run_id]
        assert table.flow_run_id is not None
        flow_run = client.read_flow_run(table.flow_run_id)
        flow = client.read_flow(flow_run.flow_id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return {row["field"]: row["value"] for row in rows}, progress, flow_run.state, flow.name


# --- the tests -----------------------------------------------------------------------------------------------


def test_jsonl_csv_and_parquet_in_s3_come_out_exactly_once_on_files_queues_and_prefect(
    tmp_path: Path, s3: Any, sqs: Any, bucket: str, unique: str, prefect_api: str
) -> None:
    ds = Dataset(s3, bucket, "reviews", id_field="id")
    ds.jsonl("jsonl/a.jsonl", 71, "ja", line_bytes=1024)  # 72 lines with the blank one
    ds.jsonl("jsonl/b.jsonl", 50, "jb", int_ids=True)
    ds.csv("csv/a.csv", 72, "ca", line_bytes=1024)
    ds.csv("csv/b.csv", 50, "cb")
    ds.parquet("parquet/a.parquet", 48, "pa", row_group_size=8)
    ds.parquet("parquet/b.parquet", 48, "pb", row_group_size=12)
    stages = Counter(e.stage for e in ds.failures)
    assert set(stages) == {"parse", "validate", "preprocess", "predict", "postprocess"}, stages
    # the chunks of the padded files start exactly on line starts, those of the others inside lines
    cuts = ds.cuts()
    assert all(cuts.values()), cuts
    assert cuts["jsonl/a.jsonl"] <= ds.line_starts["jsonl/a.jsonl"]
    assert cuts["csv/a.csv"] <= ds.line_starts["csv/a.csv"]
    assert not cuts["csv/b.csv"] & ds.line_starts["csv/b.csv"]
    ok_url = sqs.create_queue(QueueName=f"ok-{unique}")["QueueUrl"]
    err_url = sqs.create_queue(QueueName=f"err-{unique}")["QueueUrl"]
    output = f"s3://{bucket}/scored"

    summary = run_job(
        tmp_path, ds.uri, output,
        settings={"queue_config": {"backend": "sqs"}, "batch_config": {"max_batch_size": 16}, **SPLIT_CSV},
        id_field="id", success_queue=f"ok-{unique}", failure_queue=f"err-{unique}", max_failure_rate=0.5,
    )  # fmt: skip

    per_file = chunks_per_file(output)
    assert set(per_file) == set(ds.keys)
    assert min(per_file.values()) >= 2, per_file  # every file was cut, so chunk alignment was exercised
    assert summary["chunks"] == sum(per_file.values())
    assert summary["chunks_skipped"] == 0
    manifest = check_summary(ds, summary, output)
    parts, failure_rows = check_outputs(ds, output)
    successes, failures = drain_sqs(sqs, ok_url), drain_sqs(sqs, err_url)
    assert_record_invariant(output, [e.record_id for e in ds.expected], {"success": successes, "failure": failures},
                            summary)  # fmt: skip
    check_queue_messages(ds, summary["job_id"], successes, failures, parts, failure_rows)
    assert (manifest["queued_success"], manifest["queued_failure"]) == (len(successes), len(failures))
    assert (len(successes), len(failures)) == (summary["succeeded"], summary["failed"])

    table, progress, state, flow_name = prefect_records(summary["job_id"])
    assert flow_name == "batch-inference"
    assert state.is_completed()
    assert {k: table[k] for k in ("records", "succeeded", "failed", "chunks")} == {
        k: str(summary[k]) for k in ("records", "succeeded", "failed", "chunks")
    }
    assert [p.data for p in progress] == [100.0]


def test_without_id_field_records_are_named_by_file_and_position_and_parts_can_be_parquet(
    tmp_path: Path, s3: Any, bucket: str, prefect_api: str
) -> None:
    ds = Dataset(s3, bucket, "in", id_field=None)
    ds.jsonl("a.jsonl", 60, "ja")
    ds.csv("b.csv", 72, "cb", line_bytes=1024)
    ds.parquet("c.parquet", 48, "pc", row_group_size=6)
    # ids are "<key>:<byte offset of the line>" for JSONL/CSV and "<key>:<row>" for Parquet, for every record
    assert {e.record_id for e in ds.expected if e.key == "c.parquet"} == {f"c.parquet:{row}" for row in range(48)}
    output = f"s3://{bucket}/out"

    summary = run_job(tmp_path, ds.uri, output, SPLIT_CSV, output_format="parquet", max_failure_rate=0.5)

    assert min(chunks_per_file(output).values()) >= 2
    check_summary(ds, summary, output)
    _, failures = check_outputs(ds, output)
    fs, root = storage.default_store().filesystem(output)
    names = sorted(name.rsplit("/", 1)[-1] for name in fs.ls(root))
    assert [n for n in names if n.startswith("part-")] == [f"part-{i:05d}.parquet" for i in range(summary["chunks"])]
    # Parquet parts keep the output model's types
    table = pq.read_table(io.BytesIO(storage.default_store().read_bytes(f"{output}/part-00000.parquet")))
    assert table.schema.names == ["record_id", "label", "score", "_extra"]  # _extra: any extra output fields
    assert (table.schema.field("record_id").type, table.schema.field("score").type) == (pa.string(), pa.float64())
    # every stage failed some record, and each failure's id (checked above) is its file and position
    assert {f["stage"] for f in failures} == {"parse", "validate", "preprocess", "predict", "postprocess"}


def test_too_many_failed_records_fail_the_job_without_losing_any(
    tmp_path: Path, s3: Any, bucket: str, prefect_api: str
) -> None:
    ds = Dataset(s3, bucket, "in", id_field="id")
    ds.jsonl("a.jsonl", 100, "a", kinds=lambda i: "predict" if i % 10 == 7 else "bad_json" if i == 50 else "ok")
    output = f"s3://{bucket}/out"

    with pytest.raises(JobFailed, match=r"max_failure_rate") as failed:
        run_job(tmp_path, ds.uri, output, id_field="id", max_failure_rate=0.01)

    summary = failed.value.summary
    assert summary is not None
    assert summary["failed"] == 11
    assert summary["failure_rate"] > 0.01
    manifest = check_summary(ds, summary, output, status="failed")
    assert manifest["chunks_failed"] == 0
    check_outputs(ds, output)
    table, progress, state, _ = prefect_records(summary["job_id"])
    assert state.is_failed()
    assert (table["status"], table["failed"], table["records"]) == ("failed", "11", str(len(ds.expected)))
    assert [p.data for p in progress] == [100.0]


def test_a_job_run_again_skips_its_committed_chunks_and_sends_nothing_twice(
    tmp_path: Path, s3: Any, bucket: str, prefect_api: str
) -> None:
    ds = Dataset(s3, bucket, "in", id_field="id")
    ds.jsonl("a.jsonl", 60, "ja")
    ds.csv("b.csv", 50, "cb")
    output = f"s3://{bucket}/out"
    params = {"id_field": "id", "success_queue": "ok", "failure_queue": "err", "max_failure_rate": 0.5}
    queues = LocalQueueBackend(tmp_path / "queues")  # write_config's local queue
    try:
        first = run_job(tmp_path, ds.uri, output, SPLIT_CSV, **params)
        sent = (queues.count("ok"), queues.count("err"))
        assert sent == (first["succeeded"], first["failed"]) == (len(ds.successes), len(ds.failures))
        manifest = read_manifest(output)
        assert (manifest["queued_success"], manifest["queued_failure"]) == sent

        second = run_job(tmp_path, ds.uri, output, SPLIT_CSV, **params)

        assert (queues.count("ok"), queues.count("err")) == sent
        queued = {"success": [json.loads(b) for b in queues.messages("ok")],
                  "failure": [json.loads(b) for b in queues.messages("err")]}  # fmt: skip
        assert_record_invariant(output, [e.record_id for e in ds.expected], queued, second)
    finally:
        queues.close()
    assert second["job_id"] == first["job_id"]
    assert second["chunks_skipped"] == second["chunks"] == first["chunks"] >= 4
    same = ["records", "succeeded", "failed", "chunks", "output_uri"]
    assert {k: second[k] for k in same} == {k: first[k] for k in same}
    manifest = check_summary(ds, second, output)
    assert (manifest["queued_success"], manifest["queued_failure"]) == sent  # what the queues hold for the job
    check_outputs(ds, output)


def test_an_input_of_empty_files_completes_with_zero_records_and_full_progress(
    tmp_path: Path, prefect_api: str
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.jsonl").write_bytes(b"")
    (source / "b.jsonl").write_bytes(b"")
    output = str(tmp_path / "out")

    summary = run_job(tmp_path, str(source), output)

    assert (summary["records"], summary["succeeded"], summary["failed"]) == (0, 0, 0)
    assert read_manifest(output)["status"] == "completed"
    _, progress, state, _ = prefect_records(summary["job_id"])
    assert state.is_completed()
    assert [p.data for p in progress] == [100.0]


def test_csv_quoted_fields_holding_newlines_are_kept_whole_and_never_cut_silently(
    tmp_path: Path, prefect_api: str
) -> None:
    from modalkit.batch.planning import list_dataset, plan_chunks

    rng = random.Random(3)
    source = tmp_path / "in"
    source.mkdir()
    ids = [f"m-{i:03d}" for i in range(150)]
    # every review has a line break every few words, as pasted text does
    rows = [_csv_line([rid, "\n".join(review(rng, words=8) for _ in range(16))]) + b"\n" for rid in ids]
    header = b"id,text\n"
    (source / "multi.csv").write_bytes(header + b"".join(rows))
    record_starts = {len(header) + sum(map(len, rows[:i])) for i in range(len(rows))}
    data = (source / "multi.csv").read_bytes()
    assert len(data) > 2 * CHUNK
    assert len(plan_chunks(list_dataset(str(source)), CHUNK)) == 1  # by default a CSV file is read whole
    cuts = [c.extent.start for c in plan_chunks(list_dataset(str(source)), CHUNK, split_csv=True)][1:]
    first_lines = [cut if data[cut - 1 : cut] == b"\n" else data.index(b"\n", cut) + 1 for cut in cuts]
    assert set(first_lines) - record_starts, "no cut falls inside a record: the split run would prove nothing"

    output = str(tmp_path / "out")
    summary = run_job(tmp_path, str(source), output, id_field="id", max_failure_rate=1.0)

    assert (summary["records"], summary["failed"]) == (len(ids), 0), read_failures(output)[:2]
    assert Counter(row["record_id"] for row in read_parts(output)) == Counter(ids)

    # asked to cut it anyway, the job refuses loudly instead of scoring truncated and phantom records
    with pytest.raises(JobFailed, match="split_csv"):
        run_job(tmp_path, str(source), str(tmp_path / "out-split"), settings={"job_config": {"split_csv": True}},
                id_field="id", max_failure_rate=1.0)  # fmt: skip
