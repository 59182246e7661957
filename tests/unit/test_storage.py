"""The store: one object per process that reads, writes and lists URIs; here over fsspec's in-memory filesystem
and local paths. Importing it runs nothing (the umask is read when a file is first written, without changing it)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from pydantic import BaseModel

from modalkit.batch.chunk import ChunkProcessor
from modalkit.batch.job import JobPlan, find_committed
from modalkit.batch.layout import OutputLayout
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.batch.storage import Store, default_store, join
from modalkit.exceptions import StorageError
from modalkit.inference_pipeline import InferencePipeline
from modalkit.iomodel import InferenceOutputModel, JobSpec


@pytest.fixture
def memory_root() -> str:
    """A fresh folder on fsspec's in-memory filesystem (shared by the process: each test takes its own)."""
    return f"memory://modalkit-test-{uuid.uuid4().hex[:8]}"


def test_a_store_over_memory_writes_reads_lists_and_deletes(memory_root: str) -> None:
    store = Store({"memory": MemoryFileSystem()})
    store.write_bytes(join(memory_root, "a", "x.json"), b"1")
    store.write_bytes(join(memory_root, "a", "_hidden.json"), b"2")
    assert store.create_exclusive(join(memory_root, "claim.json"), b"mine")
    assert not store.create_exclusive(join(memory_root, "claim.json"), b"theirs")

    assert store.read_bytes(join(memory_root, "claim.json")) == b"mine"
    assert store.list_names(memory_root) == ["claim.json"]
    assert store.list_names(memory_root, folders=True) == ["a", "claim.json"]
    skipped: list[str] = []
    assert [f.key for f in store.list_files(memory_root, skipped)] == ["a/x.json", "claim.json"]
    assert skipped == ["a/_hidden.json"]
    with store.open_input(join(memory_root, "a", "x.json")) as fh:
        assert fh.read() == b"1"
    store.delete(join(memory_root, "claim.json"))
    assert not store.exists(join(memory_root, "claim.json"))


def test_a_missing_input_is_a_storage_error_naming_it(memory_root: str) -> None:
    with pytest.raises(StorageError, match=f"input {memory_root}/nothing does not exist"):
        Store().list_files(f"{memory_root}/nothing")


def test_the_default_store_is_one_per_process() -> None:
    assert default_store() is default_store()


def test_importing_the_store_leaves_the_umask_alone_and_files_get_its_modes(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "os.umask(0o027)\n"
        "def refuse(mask): raise AssertionError('umask changed')\n"
        "os.umask = refuse\n"
        "from modalkit.batch.storage import Store\n"
        f"Store().write_bytes({str(tmp_path / 'f.txt')!r}, b'x')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640


# --- a whole small job on the in-memory store -------------------------------------------------------------------


class In(BaseModel):
    text: str


class Out(InferenceOutputModel):
    length: int


class Length(InferencePipeline):
    input_model = In
    output_model = Out

    def __init__(self) -> None:
        super().__init__("length", "models", {})

    def preprocess(self, input_list: list[In]) -> dict[str, Any]:
        return {}

    def predict(self, input_list: list[In], preprocessed_data: dict[str, Any]) -> dict[str, Any]:
        return {}

    def postprocess(self, input_list: list[In], raw_output: dict[str, Any]) -> list[Out]:
        return [Out(length=len(i.text)) for i in input_list]


def test_a_job_plans_runs_and_resumes_on_an_in_memory_store(memory_root: str) -> None:
    store = Store({"memory": MemoryFileSystem()})
    inp, out = join(memory_root, "in"), join(memory_root, "out")
    store.write_bytes(join(inp, "a.jsonl"), b"".join(b'{"text": "%d"}\n' % i for i in range(100)) + b"not json\n")
    store.write_bytes(join(inp, "b.csv"), b"text\n" + b"".join(b"row %d\n" % i for i in range(50)))
    table = io.BytesIO()
    pq.write_table(pa.table({"text": [f"r{i}" for i in range(30)]}), table, row_group_size=10)
    store.write_bytes(join(inp, "c.parquet"), table.getvalue())

    chunks = plan_chunks(list_dataset(inp, store=store), 300, "job-in-memory", store=store)
    job = JobSpec(job_id="job-in-memory", input_uri=inp, output_uri=out, model_name="length")
    processor = ChunkProcessor(Length(), store=store)
    results = [processor.process(job, chunk) for chunk in chunks]

    assert {c.key for c in chunks} == {"a.jsonl", "b.csv", "c.parquet"}
    assert len(chunks) > 3  # cut into several
    assert (sum(r.records for r in results), sum(r.failed for r in results)) == (181, 1)
    layout = OutputLayout(out)
    assert layout.committed_indices(store) == [c.index for c in chunks]
    rows = [json.loads(line) for c in chunks for line in store.read_bytes(layout.part(c.index)).splitlines()]
    assert len(rows) == 180
    assert {r["record_id"] for r in rows} >= {"a.jsonl:0", "c.parquet:29"}

    plan = JobPlan(job=job, chunks=chunks, total_bytes=0)
    assert find_committed(plan, store) == {r.index: r.model_copy(update={"skipped": True}) for r in results}
    assert all(processor.process(job, chunk).skipped for chunk in chunks)  # resume: nothing runs again
