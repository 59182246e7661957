"""Typed chunk extents: each format plans one kind (a byte range, CSV rows, Parquet row groups), a ChunkSpec carries
it to a worker as JSON and back unchanged, and a commit marker commits job + key + extent, old markers included."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from modalkit.batch.chunk import marker_identity, process_chunk
from modalkit.batch.formats import format_named
from modalkit.batch.job import JobPlan, find_committed
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.storage import default_store
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import ByteRange, ChunkSpec, CsvRows, InferenceOutputModel, JobSpec, RowGroups

JOB_ID = "job0123456789abc"


class Row(InferenceOutputModel):
    n: int


class In(BaseModel):
    n: int


class Count(InferencePipeline):
    """Echoes each record's ``n`` (an int in JSONL and Parquet, a string in CSV)."""

    input_model = In
    output_model = Row

    def __init__(self) -> None:
        super().__init__("count", "models", {})

    def preprocess(self, input_list: list[Any]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[Any], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        return {}

    def postprocess(self, input_list: list[Any], raw_output: dict[str, Any]) -> list[Row]:
        return [Row(n=i.n) for i in input_list]


def dataset(root: Path) -> str:
    """One file of each extent kind, each cut into several chunks at a chunk size of 600 bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jsonl").write_bytes(b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(200)))
    (root / "b.csv").write_bytes(b"n,text\n" + b"".join(f'{i},"row {i}"\n'.encode() for i in range(200)))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(b'{"n": 1}\n{"n": 2}\n'))
    pq.write_table(pa.table({"n": list(range(300))}), root / "d.parquet", row_group_size=50)
    return str(root)


def plan(input_uri: str) -> list[ChunkSpec]:
    return plan_chunks(list_dataset(input_uri), 600, JOB_ID, split_csv=True)


def records(chunk: ChunkSpec) -> list[tuple[int, Any]]:
    return [
        pair
        for pos, rows in format_named(chunk.format).read(chunk, 64, default_store())
        for pair in zip(pos, rows, strict=True)
    ]


def test_each_format_plans_its_own_extent_kind(tmp_path: Path) -> None:
    chunks = [piece for chunk in plan(dataset(tmp_path / "in")) for piece in chunk.pieces()]
    assert {c.key: {type(d.extent) for d in chunks if d.key == c.key} for c in chunks} == {
        "a.jsonl": {ByteRange},
        "b.csv": {CsvRows},
        "c.jsonl.gz": {ByteRange},
        "d.parquet": {RowGroups},
    }
    csv_chunks = [c.extent for c in chunks if isinstance(c.extent, CsvRows)]
    assert len(csv_chunks) > 1
    assert [e.cut.part for e in csv_chunks if e.cut] == list(range(len(csv_chunks)))  # cut: each knows its place
    assert all(e.header == ("n", "text") for e in csv_chunks)


def test_every_extent_kind_travels_to_a_worker_as_json_and_back_unchanged(tmp_path: Path) -> None:
    chunks = plan(dataset(tmp_path / "in"))
    assert {c.extent.kind for c in chunks} == {"bytes", "csv", "row_groups"}
    for chunk in chunks:
        wire = json.dumps(chunk.model_dump(mode="json"))  # what a Modal call carries
        back = ChunkSpec.model_validate(json.loads(wire))
        assert back == chunk
        assert type(back.extent) is type(chunk.extent)
        assert records(back) == records(chunk)


def test_a_chunk_read_by_the_wrong_format_is_an_error_not_a_guess(tmp_path: Path) -> None:
    parquet = next(c for c in plan(dataset(tmp_path / "in")) if c.key == "d.parquet")
    with pytest.raises(TypeError, match="has a row_groups extent, not ByteRange"):
        records(parquet.model_copy(update={"format": "jsonl"}))


# --- commit markers ----------------------------------------------------------------------------------------------


def job(tmp_path: Path) -> JobSpec:
    return JobSpec(job_id=JOB_ID, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), model_name="m")


def legacy_marker(marker: dict[str, Any], chunk: ChunkSpec) -> dict[str, Any]:
    """The marker the code before typed extents wrote for ``chunk``: the job, the key and flat range fields."""
    extent = chunk.extent
    flat: dict[str, Any] = (
        {"start": 0, "end": None, "row_groups": list(extent.groups), "first_row": extent.first_row}
        if isinstance(extent, RowGroups)
        else {"start": extent.start, "end": extent.end, "row_groups": [], "first_row": 0}
    )
    result = {k: v for k, v in marker.items() if k not in ("job_id", "key", "extent")}
    return {"job_id": JOB_ID, "key": chunk.key, **flat, **result}


def commit_all(tmp_path: Path) -> tuple[JobSpec, list[ChunkSpec], dict[int, Path]]:
    spec = job(tmp_path)
    chunks = plan(dataset(tmp_path / "in"))
    pipeline = Count()
    for chunk in chunks:
        assert not process_chunk(spec, chunk, pipeline).skipped
    return spec, chunks, {c.index: tmp_path / "out" / "_chunks" / f"{c.index:05d}.json" for c in chunks}


def test_a_marker_commits_the_job_the_key_and_the_extent(tmp_path: Path) -> None:
    _, chunks, markers = commit_all(tmp_path)
    for chunk in chunks:
        marker = json.loads(markers[chunk.index].read_bytes())
        assert {k: marker[k] for k in ("job_id", "key", "extent", "more") if k in marker} == marker_identity(
            JOB_ID, chunk
        )
        assert marker["extent"]["kind"] == chunk.extent.kind


def test_a_marker_written_before_typed_extents_still_commits_its_chunk(tmp_path: Path) -> None:
    spec, chunks, markers = commit_all(tmp_path)
    before = {}
    for chunk in chunks:
        marker = json.loads(markers[chunk.index].read_bytes())
        before[chunk.index] = marker["records"]
        if not chunk.more:  # the code before typed extents never packed files into a chunk
            markers[chunk.index].write_text(json.dumps(legacy_marker(marker, chunk)))
    found = find_committed(JobPlan(job=spec, chunks=chunks, total_bytes=0))  # the flow's resume listing
    assert {i: r.records for i, r in found.items()} == before
    for chunk in chunks:  # every kind: a byte range, CSV rows (cut and not), row groups
        result = process_chunk(spec, chunk, Count())
        assert result.skipped, chunk
        assert result.records == before[chunk.index]


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("a.jsonl", {"start": 1}),
        ("b.csv", {"end": 7}),
        ("d.parquet", {"row_groups": [9]}),
        ("d.parquet", {"first_row": 3}),
        ("a.jsonl", {"job_id": "another"}),
    ],
)
def test_an_old_marker_of_another_range_is_never_a_skip(tmp_path: Path, key: str, change: dict[str, Any]) -> None:
    spec, chunks, markers = commit_all(tmp_path)
    chunk = next(c for c in chunks if c.key == key)
    marker = legacy_marker(json.loads(markers[chunk.index].read_bytes()), chunk)
    markers[chunk.index].write_text(json.dumps({**marker, **change}))
    with pytest.raises(ConfigError, match=rf"commits job .*, not chunk {chunk.index} of this run"):
        process_chunk(spec, chunk, Count())


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("a.jsonl", {"start": 1}),
        ("b.csv", {"header": ["n", "other"]}),
        ("b.csv", {"cut": None}),
        ("d.parquet", {"first_row": 3}),
        ("d.parquet", {"kind": "bytes", "start": 0, "end": None}),
        ("d.parquet", {"kind": "unknown"}),
    ],
)
def test_a_marker_of_another_extent_is_never_a_skip(tmp_path: Path, key: str, change: dict[str, Any]) -> None:
    spec, chunks, markers = commit_all(tmp_path)
    chunk = next(c for c in chunks if c.key == key)
    marker = json.loads(markers[chunk.index].read_bytes())
    marker["extent"] = {**marker["extent"], **change}
    markers[chunk.index].write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match=rf"commits job .*, not chunk {chunk.index} of this run"):
        process_chunk(spec, chunk, Count())
