"""Listing an input on a real moto_server's S3 as the S3 console leaves it: folder markers (0-byte keys ending in
``/``), ``.json`` files, and files modalkit cannot read, named by their keys under the input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from batch_support import read_failures, read_parts, write_config

from modalkit.batch.chunk import process_chunk
from modalkit.batch.job import find_committed, plan_job, resolve_job_config, start_job
from modalkit.batch.planning import list_dataset
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import import_pipeline
from modalkit.settings import Settings


def jsonl(texts: list[str]) -> bytes:
    return b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)


@pytest.fixture
def bucket(s3: Any, unique: str) -> str:
    name = f"markers-{unique}"
    s3.create_bucket(Bucket=name)
    return name


def test_folder_markers_are_not_files_and_json_files_are_read_as_json_lines(
    tmp_path: Path, s3: Any, bucket: str
) -> None:
    s3.put_object(Bucket=bucket, Key="in/", Body=b"")  # what "Create folder" in the S3 console makes
    s3.put_object(Bucket=bucket, Key="in/sub/", Body=b"")
    s3.put_object(Bucket=bucket, Key="in/x.json", Body=jsonl(["great value", "broke after a day"]))
    s3.put_object(Bucket=bucket, Key="in/sub/y.jsonl", Body=jsonl(["fine"]))
    files = list_dataset(f"s3://{bucket}/in/")
    assert [(f.key, f.format) for f in files] == [("sub/y.jsonl", "jsonl"), ("x.json", "jsonl")]

    settings = Settings.load(str(write_config(tmp_path)))
    config = resolve_job_config(settings)
    plan = plan_job(settings, f"s3://{bucket}/in/", f"s3://{bucket}/out/", None, config)
    start_job(plan)
    assert find_committed(plan) == {}
    name, entry = settings.model_settings.entry(None)
    assert entry.pipeline is not None
    pipeline = import_pipeline(entry.pipeline)(name, str(tmp_path / "models"), {})
    results = [process_chunk(plan.job, chunk, pipeline) for chunk in plan.chunks]
    assert sum(r.records for r in results) == 3
    assert read_failures(f"s3://{bucket}/out/") == []
    second = len(jsonl(["great value"]))
    assert sorted(r["record_id"] for r in read_parts(f"s3://{bucket}/out/")) == ["sub/y.jsonl:0", "x.json:0",
                                                                                f"x.json:{second}"]  # fmt: skip


def test_files_modalkit_cannot_read_are_named_by_their_keys_under_the_input(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="in/", Body=b"")
    s3.put_object(Bucket=bucket, Key="in/x.json", Body=jsonl(["a"]))
    s3.put_object(Bucket=bucket, Key="in/notes.txt", Body=b"read me")
    s3.put_object(Bucket=bucket, Key="in/docs/", Body=b"")
    s3.put_object(Bucket=bucket, Key="in/docs/readme.md", Body=b"# hi")
    with pytest.raises(ConfigError) as caught:
        list_dataset(f"s3://{bucket}/in/")
    message = str(caught.value)
    assert "files modalkit cannot read: docs/readme.md, notes.txt;" in message
    assert ", ," not in message
    assert ": ," not in message


def test_a_folder_holding_only_markers_holds_no_files(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="in/", Body=b"")
    s3.put_object(Bucket=bucket, Key="in/empty/", Body=b"")
    with pytest.raises(Exception, match="holds no files"):
        list_dataset(f"s3://{bucket}/in/")


@pytest.mark.parametrize(
    ("body", "shape"),
    [(b'[{"text": "a"},\n {"text": "b"}]\n', "a JSON array"), (b'{\n  "text": "a"\n}\n', "one JSON document")],
)
def test_a_json_file_holding_one_document_is_refused_at_planning_naming_it(
    s3: Any, bucket: str, body: bytes, shape: str
) -> None:
    from modalkit.batch.planning import plan_chunks

    s3.put_object(Bucket=bucket, Key="in/ok.json", Body=jsonl(["a"]))
    s3.put_object(Bucket=bucket, Key="in/pretty.json", Body=body)
    files = list_dataset(f"s3://{bucket}/in/")
    with pytest.raises(ConfigError, match=f"pretty.json holds {shape}"):
        plan_chunks(files, 1 << 20)
