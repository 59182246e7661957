"""process_chunk with real pipelines on local files: the output layout, success and failure rows, record ids,
resume, Parquet output, queue records and the queue journal; the part-file writers and their Arrow schemas."""

from __future__ import annotations

import datetime as dt
import errno
import gc
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipelines import PoisonAwareSentiment
from pydantic import BaseModel, Field, ValidationError

from modalkit.batch import queueing
from modalkit.batch.chunk import GC_THRESHOLD, REPLAY_ID_KEY, ChunkProcessor, process_chunk
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.writers import FailureWriter, JsonlPartWriter, ParquetPartWriter, Success, arrow_schema
from modalkit.examples.sentiment import LABELS
from modalkit.exceptions import ConfigError, PipelineError, QueueError, StorageError
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import (
    OUTPUT_ENVELOPE,
    ChunkResult,
    ChunkSpec,
    FailureRecord,
    InferenceOutputModel,
    JobSpec,
    SuccessRecord,
    describe_validation_error,
)
from modalkit.task_queue import MemoryBackend, QueueMessage

JOB_ID = "job0123456789abc"
SUCCESS_KEYS = {"job_id", "record_id", "status", "output", "meta"}
FAILURE_KEYS = {"job_id", "record_id", "status", "stage", "error_type", "error", "input", "meta"}


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> PoisonAwareSentiment:
    return PoisonAwareSentiment("sentiment", str(tmp_path_factory.mktemp("models")), {})


# --- a tiny pure-Python pipeline ------------------------------------------------------------------------------


class Item(BaseModel):
    text: str
    n: int = 0


class Echo(InferenceOutputModel):
    length: int
    upper: str


class EchoPipeline(InferencePipeline):
    """Upper-cases ``text``; ``n < 0`` makes predict raise for any batch holding it. Records its batch sizes."""

    input_model = Item
    output_model = Echo

    def __init__(self) -> None:
        super().__init__("echo", "models", {})
        self.batches: list[int] = []

    def preprocess(self, input_list: list[Item]) -> dict[str, Any]:
        self.batches.append(len(input_list))
        return {"texts": [i.text for i in input_list]}

    def predict(self, input_list: list[Item], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        if any(i.n < 0 for i in input_list):
            raise ArithmeticError("negative n")
        return {"upper": [t.upper() for t in preprocessed_data["texts"]]}

    def postprocess(self, input_list: list[Item], raw_output: dict[str, Any]) -> list[Echo]:
        return [Echo(length=len(i.text), upper=u) for i, u in zip(input_list, raw_output["upper"], strict=True)]


# --- helpers --------------------------------------------------------------------------------------------------


def write_input(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(tmp_path / "in")


def jsonl(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def offsets(data: bytes) -> list[int]:
    """Byte offsets of the non-blank lines."""
    out, pos = [], 0
    for line in data.splitlines(keepends=True):
        if line.strip():
            out.append(pos)
        pos += len(line)
    return out


def make_job(tmp_path: Path, **kwargs: Any) -> JobSpec:
    fields: dict[str, Any] = {"job_id": JOB_ID, "input_uri": str(tmp_path / "in"), "model_name": "m"}
    fields["output_uri"] = str(tmp_path / "out")
    return JobSpec(**{**fields, **kwargs})


def plan(input_uri: str, chunk_size: int = 10**9) -> list[ChunkSpec]:
    return plan_chunks(list_dataset(input_uri), chunk_size, JOB_ID)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def output_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


# --- layout, rows, errors -------------------------------------------------------------------------------------

GOOD = [
    {"text": "Absolutely love it, great value"},
    {"text": "Terrible. It broke after a day"},
    {"text": "The kettle arrived on monday."},
    {"text": "日本語 naïve review 🎉, fine", "other": "ignored"},
]


def test_output_layout_rows_and_errors(tmp_path: Path, sentiment: PoisonAwareSentiment) -> None:
    data = jsonl(
        GOOD[0],
        b'{"text": "unterminated',
        {"text": "POISON-PREDICT here"},
        GOOD[1],
        b"",
        {"txt": "typo in the field name"},
        [1, 2, 3],
        {"text": "POISON-PRE here"},
        GOOD[2],
        {"text": "POISON-POST here"},
        GOOD[3],
        {"text": 5},
    )
    pos = offsets(data)
    inp = write_input(tmp_path, "data.jsonl", data)
    chunks = plan(inp, chunk_size=len(data) // 2 + 1)
    assert len(chunks) == 2
    job = make_job(tmp_path, max_batch_size=3)
    results = [process_chunk(job, c, sentiment) for c in chunks]

    out = tmp_path / "out"
    assert output_files(out) == [
        "_chunks/00000.json",
        "_chunks/00001.json",
        "_failures/part-00000.jsonl",
        "_failures/part-00001.jsonl",
        "part-00000.jsonl",
        "part-00001.jsonl",
    ]  # no staging files or queue journal left behind
    parts = read_jsonl(out / "part-00000.jsonl") + read_jsonl(out / "part-00001.jsonl")
    fails = read_jsonl(out / "_failures/part-00000.jsonl") + read_jsonl(out / "_failures/part-00001.jsonl")

    good_ids = [f"data.jsonl:{pos[i]}" for i in (0, 3, 7, 9)]
    assert [r["record_id"] for r in parts] == good_ids
    for row in parts:
        assert set(row) == {"record_id", "label", "score"}  # no status/error envelope in success rows
        assert row["label"] in LABELS
        assert 0.0 <= row["score"] <= 1.0
    assert parts[0]["label"] == "positive"
    assert parts[1]["label"] == "negative"

    by_id = {f["record_id"]: f for f in fails}
    assert sorted(by_id, key=lambda r: int(r.split(":")[1])) == [f"data.jsonl:{pos[i]}" for i in (1, 2, 4, 5, 6, 8, 10)]
    for row in fails:
        assert {"record_id", "stage", "error_type", "error", "input"} <= set(row)
        assert row["status"] == "error"

    def fail(i: int) -> dict[str, Any]:
        return by_id[f"data.jsonl:{pos[i]}"]

    assert fail(1)["stage"] == "parse"
    assert fail(1)["error_type"] == "JSONDecodeError"
    assert fail(1)["error"].startswith(f"data.jsonl at byte {pos[1]}: invalid JSON")
    assert fail(1)["input"] == '{"text": "unterminated'
    assert fail(2)["stage"] == "predict"
    assert fail(2)["error_type"] == "RuntimeError"
    assert fail(2)["error"] == f"data.jsonl at byte {pos[2]}: predict failed on a POISON-PREDICT text"
    assert fail(2)["input"] == {"text": "POISON-PREDICT here"}
    assert fail(4)["stage"] == "validate"
    assert fail(4)["error_type"] == "ValidationError"
    assert fail(4)["error"] == f"data.jsonl at byte {pos[4]}: field 'text': Field required"
    assert fail(4)["input"] == {"txt": "typo in the field name"}
    assert fail(5)["stage"] == "validate"
    assert fail(5)["error"] == f"data.jsonl at byte {pos[5]}: the record is a JSON list, not an object"
    assert fail(5)["input"] == [1, 2, 3]
    assert (fail(6)["stage"], fail(6)["error_type"]) == ("preprocess", "ValueError")
    assert (fail(8)["stage"], fail(8)["error_type"]) == ("postprocess", "KeyError")
    assert fail(10)["error"] == f"data.jsonl at byte {pos[10]}: field 'text': Input should be a valid string"

    for result, chunk in zip(results, chunks, strict=True):
        assert_marker_matches_files(out, result, chunk)
    assert sum(r.records for r in results) == len(pos)


def assert_marker_matches_files(out: Path, result: ChunkResult, chunk: ChunkSpec) -> None:
    n = f"{chunk.index:05d}"
    marker = json.loads((out / "_chunks" / f"{n}.json").read_bytes())
    succeeded = len(read_jsonl(out / f"part-{n}.jsonl"))
    failed = len(read_jsonl(out / "_failures" / f"part-{n}.jsonl"))
    assert (marker["records"], marker["succeeded"], marker["failed"]) == (succeeded + failed, succeeded, failed)
    assert (marker["job_id"], marker["key"], marker["extent"]) == (
        JOB_ID,
        chunk.key,
        {"kind": "bytes", "start": chunk.extent.start, "end": chunk.extent.end},
    )
    assert (result.records, result.succeeded, result.failed, result.skipped) == (
        succeeded + failed,
        succeeded,
        failed,
        False,
    )
    assert result.part_uri == str(out / f"part-{n}.jsonl")


def test_id_field_values_keep_their_json_types_and_bad_ids_fail_validation(tmp_path: Path) -> None:
    data = jsonl(
        {"id": "a1", "text": "x"},
        {"id": 7, "text": "y"},
        {"text": "no id"},
        {"id": 1.5, "text": "float id"},
        {"id": True, "text": "bool id"},
        {"id": None, "text": "null id"},
        {"id": "z", "text": 3},  # a good id, an invalid record: the failure keeps the id
    )
    pos = offsets(data)
    inp = write_input(tmp_path, "ids.jsonl", data)
    (chunk,) = plan(inp)
    result = process_chunk(make_job(tmp_path, id_field="id"), chunk, EchoPipeline())
    assert (result.succeeded, result.failed) == (2, 5)

    parts = read_jsonl(tmp_path / "out" / "part-00000.jsonl")
    assert parts == [{"record_id": "a1", "length": 1, "upper": "X"}, {"record_id": 7, "length": 1, "upper": "Y"}]
    fails = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert [(f["record_id"], f["stage"], f["error_type"]) for f in fails] == [
        (f"ids.jsonl:{pos[2]}", "validate", "InvalidRecordId"),
        (f"ids.jsonl:{pos[3]}", "validate", "InvalidRecordId"),
        (f"ids.jsonl:{pos[4]}", "validate", "InvalidRecordId"),
        (f"ids.jsonl:{pos[5]}", "validate", "InvalidRecordId"),
        ("z", "validate", "ValidationError"),
    ]
    assert fails[0]["error"] == f"ids.jsonl at byte {pos[2]}: the record has no 'id' field (the job's id_field)"
    assert fails[1]["error"] == f"ids.jsonl at byte {pos[3]}: 'id' is a float; record ids must be str or int"
    assert "'id' is a bool" in fails[2]["error"]
    assert fails[4]["error"] == f"ids.jsonl at byte {pos[6]}: field 'text': Input should be a valid string"


def test_replayed_record_keeps_its_original_id(tmp_path: Path) -> None:
    data = jsonl(
        {REPLAY_ID_KEY: "first.jsonl:120", "text": "again"},
        {REPLAY_ID_KEY: 42, "id": "ignored", "text": "int id"},
        {REPLAY_ID_KEY: "first.jsonl:7", "text": 0},
    )
    inp = write_input(tmp_path, "failures.jsonl", data)
    (chunk,) = plan(inp)
    process_chunk(make_job(tmp_path, id_field="id"), chunk, EchoPipeline())
    parts = read_jsonl(tmp_path / "out" / "part-00000.jsonl")
    assert [r["record_id"] for r in parts] == ["first.jsonl:120", 42]
    assert parts[0] == {"record_id": "first.jsonl:120", "length": 5, "upper": "AGAIN"}
    (fail,) = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert fail["record_id"] == "first.jsonl:7"
    assert fail["stage"] == "validate"
    assert REPLAY_ID_KEY not in fail["input"]


def test_records_that_fail_validation_do_not_take_their_sub_batch_with_them(tmp_path: Path) -> None:
    records = [{"text": f"t{i}", "n": "not a number" if i in (1, 4, 8) else i} for i in range(10)]
    inp = write_input(tmp_path, "a.jsonl", jsonl(*records))
    (chunk,) = plan(inp)
    echo = EchoPipeline()
    result = process_chunk(make_job(tmp_path, max_batch_size=10), chunk, echo)
    assert (result.records, result.succeeded, result.failed) == (10, 7, 3)
    assert echo.batches == [7]  # the valid records of the sub-batch still ran as one batch
    parts = read_jsonl(tmp_path / "out" / "part-00000.jsonl")
    assert [r["upper"] for r in parts] == [f"T{i}" for i in range(10) if i not in (1, 4, 8)]
    fails = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert [f["input"]["text"] for f in fails] == ["t1", "t4", "t8"]
    assert all("field 'n': Input should be a valid integer" in f["error"] for f in fails)


def test_a_pipeline_failure_splits_only_its_own_records_out(tmp_path: Path) -> None:
    records = [{"text": f"t{i}", "n": -1 if i == 5 else i} for i in range(8)]
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl(*records)))
    result = process_chunk(make_job(tmp_path, max_batch_size=8), chunk, EchoPipeline())
    assert (result.succeeded, result.failed) == (7, 1)
    (fail,) = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert (fail["input"], fail["stage"], fail["error_type"]) == (records[5], "predict", "ArithmeticError")


def test_the_collector_threshold_is_raised_while_a_chunk_runs_and_restored_after_even_on_failure(
    tmp_path: Path,
) -> None:
    seen: list[int] = []

    class Watching(EchoPipeline):
        def preprocess(self, input_list: list[Item]) -> dict[str, Any]:
            seen.append(gc.get_threshold()[0])
            return super().preprocess(input_list)

    before = gc.get_threshold()
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl({"text": "a"})))
    process_chunk(make_job(tmp_path), chunk, Watching())
    assert seen == [max(before[0], GC_THRESHOLD)]
    assert gc.get_threshold() == before
    with pytest.raises(StorageError):  # the output root is a file: the chunk cannot commit
        process_chunk(make_job(tmp_path, output_uri=str(tmp_path / "in" / "a.jsonl")), chunk, Watching())
    assert gc.get_threshold() == before


def test_default_ids_use_the_key_under_the_input_root(tmp_path: Path) -> None:
    inp = write_input(tmp_path, "2024/05/day.jsonl", jsonl({"text": "a"}, {"text": "b"}))
    (chunk,) = plan(inp)
    process_chunk(make_job(tmp_path), chunk, EchoPipeline())
    parts = read_jsonl(tmp_path / "out" / "part-00000.jsonl")
    assert [r["record_id"] for r in parts] == ["2024/05/day.jsonl:0", "2024/05/day.jsonl:14"]


def test_csv_records_ids_and_errors_name_the_byte_offset(tmp_path: Path) -> None:
    data = b'text,n\r\n"hello, world",1\r\nbad,row,extra\r\n\r\nthird,x\r\n'
    inp = write_input(tmp_path, "t.csv", data)
    (chunk,) = plan(inp)
    result = process_chunk(make_job(tmp_path), chunk, EchoPipeline())
    assert (result.records, result.succeeded, result.failed) == (3, 1, 2)
    assert read_jsonl(tmp_path / "out" / "part-00000.jsonl") == [
        {"record_id": "t.csv:8", "length": 12, "upper": "HELLO, WORLD"}
    ]
    parse, invalid = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    bad_at, third_at = data.index(b"bad"), data.index(b"third")
    assert (parse["record_id"], parse["stage"], parse["error_type"]) == (f"t.csv:{bad_at}", "parse", "CSVError")
    assert parse["error"] == f"t.csv at byte {bad_at}: line has 3 fields, the header has 2"
    assert parse["input"] == "bad,row,extra"
    assert invalid["record_id"] == f"t.csv:{third_at}"
    assert invalid["error"].startswith(f"t.csv at byte {third_at}: field 'n': Input should be a valid integer")
    assert invalid["input"] == {"text": "third", "n": "x"}


def test_parquet_input_ids_are_row_indexes(tmp_path: Path, sentiment: PoisonAwareSentiment) -> None:
    table = pa.table({"text": ["a", "bb", "", "dddd", "e"], "n": [1, 2, 3, 4, 5], "key": [10, 11, 12, 13, 14]})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "rows.parquet", row_group_size=2)
    chunks = plan(str(tmp_path / "in"), chunk_size=1)
    assert len(chunks) == 3
    proc = ChunkProcessor(sentiment)  # one processor, chunk after chunk, as a worker keeps it
    results = [proc.process(make_job(tmp_path), c) for c in chunks]
    assert [r.records for r in results] == [2, 2, 1]
    out = tmp_path / "out"
    parts = [r for i in range(3) for r in read_jsonl(out / f"part-{i:05d}.jsonl")]
    assert [r["record_id"] for r in parts] == ["rows.parquet:0", "rows.parquet:1", "rows.parquet:3", "rows.parquet:4"]
    (fail,) = read_jsonl(out / "_failures" / "part-00001.jsonl")
    assert fail["record_id"] == "rows.parquet:2"
    assert fail["error"] == "rows.parquet at row 2: field 'text': String should have at least 1 character"
    assert fail["input"] == {"text": "", "n": 3, "key": 12}


def test_parquet_id_errors_name_the_row_whatever_the_extension_case(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "key": [10, None]}), tmp_path / "in" / "ROWS.PARQUET")
    (chunk,) = plan(str(tmp_path / "in"))
    result = process_chunk(make_job(tmp_path, id_field="key"), chunk, EchoPipeline())
    assert (result.succeeded, result.failed) == (1, 1)
    assert read_jsonl(tmp_path / "out" / "part-00000.jsonl")[0]["record_id"] == 10
    (fail,) = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert fail["record_id"] == "ROWS.PARQUET:1"
    assert fail["error"] == "ROWS.PARQUET at row 1: the record has no 'key' field (the job's id_field)"


# --- resume ---------------------------------------------------------------------------------------------------


class CountingEcho(EchoPipeline):
    calls = 0

    def preprocess(self, input_list: list[Item]) -> dict[str, Any]:
        type(self).calls += 1
        return super().preprocess(input_list)


def test_a_committed_chunk_is_skipped_without_touching_its_files(tmp_path: Path) -> None:
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl({"text": "a"}, {"text": 1}, {"text": "c"})))
    job = make_job(tmp_path)
    first = process_chunk(job, chunk, EchoPipeline())
    out = tmp_path / "out"
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in output_files(out)}

    CountingEcho.calls = 0
    again = process_chunk(job, chunk, CountingEcho())
    assert again.skipped is True
    assert (again.records, again.succeeded, again.failed) == (first.records, first.succeeded, first.failed) == (3, 2, 1)
    assert CountingEcho.calls == 0
    after = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in output_files(out)}
    assert after == before


# --- Parquet output -------------------------------------------------------------------------------------------


def test_parquet_output_follows_the_output_model(tmp_path: Path, sentiment: PoisonAwareSentiment) -> None:
    data = jsonl({"id": 3, "text": "great, love it"}, {"id": 4, "text": ""}, {"id": 5, "text": "awful"})
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", data))
    result = process_chunk(make_job(tmp_path, output_format="parquet", id_field="id"), chunk, sentiment)
    path = tmp_path / "out" / "part-00000.parquet"
    assert result.part_uri == str(path)
    table = pq.read_table(path)
    assert table.schema.names == ["record_id", "label", "score", "_extra"]  # _extra: the output's extra fields
    assert table.schema.field("record_id").type == pa.int64()  # the ids are ints: so is the column
    assert not table.schema.field("record_id").nullable
    assert table.schema.field("label").type == pa.string()
    assert table.schema.field("score").type == pa.float64()
    assert table.num_rows == result.succeeded == 2
    rows = table.to_pylist()
    assert [r["record_id"] for r in rows] == [3, 5]  # the ids keep their JSON type
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert len(read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")) == 1  # failures stay JSONL


class Child(BaseModel):
    a: int
    b: list[str]


class Rich(InferenceOutputModel):
    count: int
    ratio: float | None
    flag: bool
    tags: list[str]
    attrs: dict[str, int]
    child: Child
    when: dt.datetime
    kind: Literal["x", "y"]


class RichPipeline(InferencePipeline):
    input_model = Item
    output_model = Rich

    def preprocess(self, input_list: list[Item]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[Item], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        return {}

    def postprocess(self, input_list: list[Item], raw_output: dict[str, Any]) -> list[Rich]:
        return [
            Rich(count=i.n, ratio=None if i.n % 2 else i.n / 4, flag=i.n > 1, tags=list(i.text),
                 attrs={i.text: i.n}, child=Child(a=i.n, b=[i.text]),
                 when=dt.datetime(2024, 5, 1, 12, i.n, tzinfo=dt.UTC), kind="x" if i.n % 2 else "y")
            for i in input_list
        ]  # fmt: skip


RICH_INPUT = jsonl({"text": "ab", "n": 0}, {"text": "c", "n": 3})


def test_nested_and_dict_fields_in_parquet_are_json_text(tmp_path: Path) -> None:
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", RICH_INPUT))
    result = process_chunk(make_job(tmp_path, output_format="parquet"), chunk, RichPipeline("rich", "m", {}))
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.num_rows == result.succeeded == 2
    schema = table.schema
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("attrs").type == pa.string()
    assert schema.field("child").type == pa.string()
    assert schema.field("when").type == pa.timestamp("us", tz="UTC")
    rows = table.to_pylist()
    assert [json.loads(r["attrs"]) for r in rows] == [{"ab": 0}, {"c": 3}]
    assert [json.loads(r["child"]) for r in rows] == [{"a": 0, "b": ["ab"]}, {"a": 3, "b": ["c"]}]
    assert [r["tags"] for r in rows] == [["a", "b"], ["c"]]
    assert [r["ratio"] for r in rows] == [0.0, None]
    assert [r["flag"] for r in rows] == [False, True]
    assert [r["kind"] for r in rows] == ["y", "x"]
    assert [r["when"] for r in rows] == [dt.datetime(2024, 5, 1, 12, m, tzinfo=dt.UTC) for m in (0, 3)]
    assert [r["record_id"] for r in rows] == [f"a.jsonl:{p}" for p in offsets(RICH_INPUT)]


def test_nested_and_dict_fields_in_jsonl_stay_json_objects(tmp_path: Path) -> None:
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", RICH_INPUT))
    process_chunk(make_job(tmp_path), chunk, RichPipeline("rich", "m", {}))
    first = read_jsonl(tmp_path / "out" / "part-00000.jsonl")[0]
    assert first == {
        "record_id": "a.jsonl:0",
        "count": 0,
        "ratio": 0.0,
        "flag": False,
        "tags": ["a", "b"],
        "attrs": {"ab": 0},
        "child": {"a": 0, "b": ["ab"]},
        "when": "2024-05-01T12:00:00Z",
        "kind": "y",
    }


# --- queue records --------------------------------------------------------------------------------------------


class RecordingBackend(MemoryBackend):
    """A MemoryBackend that keeps the QueueMessage objects too (their dedup and group ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, QueueMessage]] = []

    def send_batch(self, queue_name: str, messages: Any) -> int:
        self.sent.extend((queue_name, m) for m in messages)
        return super().send_batch(queue_name, messages)


def test_queue_records_have_the_contract_shapes_and_dedup_ids(tmp_path: Path, sentiment: PoisonAwareSentiment) -> None:
    data = jsonl({"text": "great value"}, {"text": "POISON-PREDICT"}, b"{bad json", {"text": "terrible"})
    pos = offsets(data)
    (chunk,) = plan(write_input(tmp_path, "q.jsonl", data))
    backend = RecordingBackend()
    job = make_job(tmp_path, success_queue="ok", failure_queue="bad", max_batch_size=2)
    result = process_chunk(job, chunk, sentiment, backend)
    assert (result.queued_success, result.queued_failure) == (2, 2)

    successes = [json.loads(b) for b in backend.messages("ok")]
    assert [set(m) for m in successes] == [SUCCESS_KEYS] * 2
    assert successes[0] == {
        "job_id": JOB_ID,
        "record_id": "q.jsonl:0",
        "status": "success",
        "output": {"label": "positive", "score": successes[0]["output"]["score"]},
        "meta": {"key": "q.jsonl", "position": 0},
    }
    part_rows = read_jsonl(tmp_path / "out" / "part-00000.jsonl")
    assert [{"record_id": m["record_id"], **m["output"]} for m in successes] == part_rows

    failures = [json.loads(b) for b in backend.messages("bad")]
    assert [set(m) for m in failures] == [FAILURE_KEYS] * 2
    assert [(m["record_id"], m["stage"], m["status"]) for m in failures] == [
        (f"q.jsonl:{pos[1]}", "predict", "error"),
        (f"q.jsonl:{pos[2]}", "parse", "error"),
    ]
    assert failures[1]["meta"] == {"key": "q.jsonl", "position": pos[2]}
    assert failures == read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")  # the same records

    assert len(backend.sent) == 4
    for queue, message in backend.sent:
        body = json.loads(message.body)
        assert message.dedup_id == f"{JOB_ID}:q.jsonl:{body['meta']['position']}"  # the input record, not its id
        assert message.group_id == f"{JOB_ID}-00000"
        assert queue == ("ok" if body["status"] == "success" else "bad")
    assert not (tmp_path / "out" / "_chunks" / "00000.progress.json").exists()  # journal gone after the commit


def test_only_the_named_queues_get_records(tmp_path: Path) -> None:
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl({"text": "a"}, {"text": 1})))
    backend = MemoryBackend()
    result = process_chunk(make_job(tmp_path, failure_queue="bad"), chunk, EchoPipeline(), backend)
    assert (result.queued_success, result.queued_failure) == (0, 1)
    assert backend.queues() == ["bad"]


class CrashingBackend(MemoryBackend):
    """Keeps every message (no dedup, like a standard SQS queue) until ``limit``, then refuses every batch."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.delivered: list[str] = []

    def send_batch(self, queue_name: str, messages: Any) -> int:
        if len(self.delivered) + len(messages) > self.limit:
            raise QueueError("queue unavailable")
        self.delivered.extend(m.body for m in messages)
        return len(messages)


def crash_dataset(tmp_path: Path) -> tuple[list[ChunkSpec], list[str]]:
    records = [{"text": f"t{i}", "n": -1 if i % 7 == 3 else i} for i in range(40)]
    data = jsonl(*records)
    (chunk,) = plan(write_input(tmp_path, "c.jsonl", data))
    return [chunk], [f"c.jsonl:{p}" for p in offsets(data)]


@pytest.mark.parametrize("limit", [0, 1, 9, 17, 30])
def test_a_rerun_after_a_queue_crash_resends_only_what_the_journal_does_not_cover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    monkeypatch.setattr(queueing, "JOURNAL_INTERVAL", 0.0)  # journal after every window
    window = 4
    (chunk,), ids = crash_dataset(tmp_path)
    job = make_job(tmp_path, success_queue="ok", failure_queue="bad", max_batch_size=window)
    crashing = CrashingBackend(limit)
    with pytest.raises(QueueError, match="queue unavailable"):
        process_chunk(job, chunk, EchoPipeline(), crashing)
    out = tmp_path / "out"
    assert not (out / "_chunks" / "00000.json").exists()  # nothing committed
    journal = out / "_chunks" / "00000.progress.json"
    sent_before = json.loads(journal.read_bytes())["sent_before"] if journal.exists() else 0
    first = [json.loads(b)["record_id"] for b in crashing.delivered]
    assert set(ids[:sent_before]) <= set(first)  # what the journal covers was sent

    fresh = MemoryBackend()
    result = process_chunk(job, chunk, EchoPipeline(), fresh)
    second = [json.loads(b)["record_id"] for q in ("ok", "bad") for b in fresh.messages(q)]
    assert sorted(second, key=ids.index) == ids[sent_before:]  # only the records after the journaled point
    assert set(first) | set(second) == set(ids)  # none missing
    assert len(set(first) & set(second)) <= window  # duplicates: at most the window that was cut
    assert result.records == 40
    assert result.queued_success + result.queued_failure == 40  # what the queues hold, the earlier attempt's too
    assert not result.skipped
    assert (out / "_chunks" / "00000.json").exists()
    assert not journal.exists()  # the journal is removed after the commit, also on a resumed chunk
    if limit >= 9:
        assert sent_before > 0  # the journal did cover something: the rerun skipped it


class FlakyBackend(MemoryBackend):
    """Refuses its first batch, then accepts everything."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.delivered: list[str] = []

    def send_batch(self, queue_name: str, messages: Any) -> int:
        self.calls += 1
        if self.calls == 1:
            raise QueueError("throttled", retryable=True)
        self.delivered.extend(m.body for m in messages)
        return len(messages)


def test_records_of_a_window_that_failed_to_send_are_sent_by_the_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queueing, "JOURNAL_INTERVAL", 0.0)
    (chunk,) = plan(write_input(tmp_path, "c.jsonl", jsonl(*({"text": f"t{i}"} for i in range(20)))))
    job = make_job(tmp_path, success_queue="ok", max_batch_size=4)
    flaky = FlakyBackend()
    with pytest.raises(QueueError, match="throttled"):
        process_chunk(job, chunk, EchoPipeline(), flaky)
    assert flaky.delivered == []  # no window after the failed one was sent (its journal would cover the failed one)
    fresh = MemoryBackend()
    process_chunk(job, chunk, EchoPipeline(), fresh)
    delivered = [json.loads(b)["record_id"] for b in fresh.messages("ok")]
    succeeded = [r["record_id"] for r in read_jsonl(tmp_path / "out" / "part-00000.jsonl")]
    assert len(succeeded) == 20
    assert delivered == succeeded  # every success reached the queue, once, in order


def test_a_job_naming_queues_needs_a_backend(tmp_path: Path) -> None:
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl({"text": "a"})))
    with pytest.raises(ConfigError, match="no queue backend"):
        process_chunk(make_job(tmp_path, success_queue="ok"), chunk, EchoPipeline())
    assert not (tmp_path / "out" / "_chunks" / "00000.json").exists()


# --- writers --------------------------------------------------------------------------------------------------


def successes(*outputs: Echo, first_id: int = 0) -> list[Success]:
    return [
        Success(first_id + i, o, o.__pydantic_serializer__.to_json(o, exclude=OUTPUT_ENVELOPE))
        for i, o in enumerate(outputs)
    ]


def test_jsonl_part_writer_writes_record_id_then_the_output_fields_without_the_envelope(tmp_path: Path) -> None:
    writer = JsonlPartWriter(str(tmp_path / "w.jsonl"))
    writer.write(successes(Echo(length=1, upper="A"), Echo(length=2, upper="BB", status="success")))
    writer.write([])
    writer.write(successes(Echo(length=3, upper="C"), first_id=2))
    writer.close()
    assert read_jsonl(tmp_path / "w.jsonl") == [
        {"record_id": 0, "length": 1, "upper": "A"},
        {"record_id": 1, "length": 2, "upper": "BB"},
        {"record_id": 2, "length": 3, "upper": "C"},
    ]


def test_failure_writer_appends_ready_made_lines(tmp_path: Path) -> None:
    writer = FailureWriter(str(tmp_path / "f.jsonl"))
    writer.write([b'{"a":1}\n', b'{"a":2}\n'])
    writer.write([])
    writer.write([b'{"a":3}\n'])
    writer.close()
    assert (tmp_path / "f.jsonl").read_bytes() == b'{"a":1}\n{"a":2}\n{"a":3}\n'


def test_parquet_writer_row_groups_ids_and_empty_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modalkit.batch import writers

    monkeypatch.setattr(writers, "ROW_GROUP_ROWS", 3)
    writer = ParquetPartWriter(str(tmp_path / "w.parquet"), Echo)
    for i in range(4):
        writer.write([Success(i, Echo(length=i, upper="X", extra="dropped"), b"") for _ in range(2)])
    writer.close()
    meta = pq.ParquetFile(tmp_path / "w.parquet").metadata
    assert meta.num_rows == 8
    assert meta.num_row_groups >= 2
    table = pq.read_table(tmp_path / "w.parquet")
    assert table.column_names == ["record_id", "length", "upper", "_extra"]
    assert table.column("record_id").to_pylist() == ["0", "0", "1", "1", "2", "2", "3", "3"]

    empty = ParquetPartWriter(str(tmp_path / "e.parquet"), Echo)
    empty.close()
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    assert pq.read_schema(tmp_path / "e.parquet").names == ["record_id", "length", "upper", "_extra"]


class Inner(BaseModel):
    x: int


class AllTypes(InferenceOutputModel):
    a_int: int
    a_float: float
    a_bool: bool
    a_str: str
    a_bytes: bytes
    opt_int: int | None
    opt_old: Any = None
    lit_str: Literal["a", "b"] = "a"
    lit_int: Literal[1, 2] = 1
    lit_bool: Literal[True] = True
    lit_mixed: Literal["a", 1] = "a"
    ints: list[int] = Field(default_factory=list)
    nested_ints: list[list[int]] = Field(default_factory=list)
    opt_items: list[float | None] = Field(default_factory=list)
    models: list[Inner] = Field(default_factory=list)
    inner: Inner | None = None
    mapping: dict[str, float] = Field(default_factory=dict)
    union: int | str = 0
    when: dt.datetime | None = None
    day: dt.date | None = None


def test_arrow_schema_maps_types_and_falls_back_to_json() -> None:
    schema = arrow_schema(AllTypes, OUTPUT_ENVELOPE)
    expected = {
        "record_id": (pa.string(), False),
        "a_int": (pa.int64(), False),
        "a_float": (pa.float64(), False),
        "a_bool": (pa.bool_(), False),
        "a_str": (pa.string(), False),
        "a_bytes": (pa.binary(), False),
        "opt_int": (pa.int64(), False),
        "opt_old": (pa.string(), True),
        "lit_str": (pa.string(), False),
        "lit_int": (pa.int64(), False),
        "lit_bool": (pa.bool_(), False),
        "lit_mixed": (pa.string(), True),
        "ints": (pa.list_(pa.int64()), False),
        "nested_ints": (pa.list_(pa.list_(pa.int64())), False),
        "opt_items": (pa.list_(pa.float64()), False),
        "models": (pa.string(), True),
        "inner": (pa.string(), True),
        "mapping": (pa.string(), True),
        "union": (pa.string(), True),
        "when": (pa.timestamp("us", tz="UTC"), False),
        "day": (pa.date32(), False),
        "_extra": (pa.string(), True),  # InferenceOutputModel allows extra fields: they are kept, as JSON
    }
    assert schema.names == list(expected)  # record_id first, then the model's fields in order, envelope excluded
    for name, (arrow_type, is_json) in expected.items():
        field = schema.field(name)
        assert field.type == arrow_type, name
        assert ((field.metadata or {}).get(b"encoding") == b"json") is is_json, name
        assert field.nullable is (name != "record_id")


def test_arrow_schema_keeps_the_envelope_fields_only_when_not_excluded() -> None:
    assert arrow_schema(Echo, set()).names == ["record_id", "status", "error", "meta", "length", "upper", "_extra"]


# --- validation messages --------------------------------------------------------------------------------------


class Address(BaseModel):
    city: str
    zip: int


class Person(BaseModel):
    name: str
    age: int
    address: Address
    emails: list[str]


def validation_error(model: type[BaseModel], data: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value


def test_describe_validation_error_names_each_field_path() -> None:
    exc = validation_error(Person, {"age": "old", "address": {"zip": "x"}, "emails": ["a", 3]})
    assert describe_validation_error(exc) == (
        "field 'name': Field required; "
        "field 'age': Input should be a valid integer, unable to parse string as an integer; "
        "field 'address.city': Field required; "
        "field 'address.zip': Input should be a valid integer, unable to parse string as an integer; "
        "field 'emails.1': Input should be a valid string"
    )


def test_describe_validation_error_counts_what_it_leaves_out_and_handles_root_errors() -> None:
    many = validation_error(Person, {"address": {}, "emails": [1, 2, 3]})
    text = describe_validation_error(many)
    assert text.count("field '") == 5
    assert text.endswith(f"(and {many.error_count() - 5} more)")
    assert many.error_count() == 7

    root = validation_error(Person, [1, 2])
    assert describe_validation_error(root) == "Input should be a valid dictionary or instance of Person"


def test_processor_requires_declared_schemas() -> None:
    class NoSchemas(EchoPipeline):
        input_model = None

    with pytest.raises(PipelineError, match="input_model"):
        ChunkProcessor(NoSchemas())


def test_no_staging_directories_survive_a_failed_chunk(tmp_path: Path) -> None:
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl({"text": "a"})))
    os.remove(chunk.uri)  # the input vanished between planning and processing
    with pytest.raises(StorageError, match=r"a\.jsonl.*not found"):
        process_chunk(make_job(tmp_path), chunk, EchoPipeline())
    out = tmp_path / "out"
    assert list(out.iterdir()) == []  # no staging directory, no part file, no marker


def test_files_are_closed_and_nothing_committed_when_the_part_file_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modalkit.batch import writers

    def disk_full(self: ParquetPartWriter) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.ParquetPartWriter, "_flush", disk_full)
    (chunk,) = plan(write_input(tmp_path, "a.jsonl", jsonl({"text": "a"})))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises((OSError, StorageError), match="No space left"):
            process_chunk(make_job(tmp_path, output_format="parquet"), chunk, EchoPipeline())
        gc.collect()  # a file left open would warn here, when it is collected
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert list((tmp_path / "out").iterdir()) == []  # no part file, no marker, no staging directory


@pytest.mark.parametrize(("good_id", "bad_id"), [(7, 8), ("a7", "a8")], ids=["int-ids", "str-ids"])
def test_queue_bodies_of_the_batch_path_are_the_record_models_bodies(
    tmp_path: Path, good_id: int | str, bad_id: int | str
) -> None:
    # a consumer validates what it receives with modalkit's own models, whatever JSON type the id_field holds
    data = jsonl({"id": good_id, "text": "a"}, {"id": bad_id, "text": 5})
    pos = offsets(data)
    (chunk,) = plan(write_input(tmp_path, "r.jsonl", data))
    backend = MemoryBackend()
    process_chunk(make_job(tmp_path, id_field="id", success_queue="ok", failure_queue="bad"), chunk, EchoPipeline(),
                  backend)  # fmt: skip
    (success,) = backend.messages("ok")
    (failure,) = backend.messages("bad")

    expected_success = SuccessRecord(
        job_id=JOB_ID, record_id=good_id, output={"length": 1, "upper": "A"}, meta={"key": "r.jsonl", "position": 0}
    )
    expected_failure = FailureRecord(
        job_id=JOB_ID,
        record_id=bad_id,
        stage="validate",
        error_type="ValidationError",
        error=f"r.jsonl at byte {pos[1]}: field 'text': Input should be a valid string",
        input={"id": bad_id, "text": 5},
        meta={"key": "r.jsonl", "position": pos[1]},
    )
    assert SuccessRecord.model_validate_json(success) == expected_success
    assert FailureRecord.model_validate_json(failure) == expected_failure
    assert json.loads(success) == json.loads(expected_success.model_dump_json())  # same keys, nothing more
    assert json.loads(failure) == json.loads(expected_failure.model_dump_json())
    (failure_row,) = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert FailureRecord.model_validate(failure_row) == expected_failure


def test_the_id_policy_rejects_bad_and_repeated_ids_across_sub_batches() -> None:
    from modalkit.batch.record_ids import IdPolicy

    policy = IdPolicy(JOB_ID, "k.jsonl", "id", lambda pos: f"k.jsonl at byte {pos}")
    ids, kept, rejected = policy.assign([(0, 0, {"id": 7}), (1, 10, {"id": "x"}), (2, 20, [1])])
    assert (ids, [r[0] for r in kept]) == ([7, "x"], [0, 1])
    assert [(r.ordinal, r.record_id, r.error.error_type) for r in rejected] == [(2, "k.jsonl:20", "InvalidRecordId")]

    ids, kept, rejected = policy.assign([(3, 30, {"id": "7"}), (4, 40, {"id": None}), (5, 50, {"id": 8})])
    assert ids == [8]
    assert [(r.ordinal, r.record_id, r.error.error_type) for r in rejected] == [
        (3, "7", "DuplicateRecordId"),
        (4, "k.jsonl:40", "InvalidRecordId"),
    ]
    assert rejected[0].error.error == "record id '7' is already the id of the record at k.jsonl at byte 0"


def test_failure_rows_of_a_sub_batch_follow_the_records_order(tmp_path: Path) -> None:
    data = jsonl(b"{bad", {"id": [1], "text": "a"}, b"{bad too", {"id": 2, "text": 5}, {"id": None, "text": "b"})
    (chunk,) = plan(write_input(tmp_path, "o.jsonl", data))
    process_chunk(make_job(tmp_path, id_field="id"), chunk, EchoPipeline())
    rows = read_jsonl(tmp_path / "out" / "_failures" / "part-00000.jsonl")
    assert [r["meta"]["position"] for r in rows] == offsets(data)[:3] + offsets(data)[4:] + [offsets(data)[3]]
    assert [r["error_type"] for r in rows] == [
        "JSONDecodeError", "InvalidRecordId", "JSONDecodeError", "InvalidRecordId", "ValidationError"]  # fmt: skip
