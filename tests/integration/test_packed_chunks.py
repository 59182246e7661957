"""Small files packed into chunks: a dataset of many small files is a few chunks, and everything a job promises
holds for them: every record once in the output under ``<file key>:<position>``, a few objects per chunk (not per
file), resume by markers, replay keeping ids, repeated ids named with their files, a record that kills its worker
failing alone; a job of one file plans and commits as before.

Jobs run the library's own steps in this process, as the flow runs them (plan, claim, find what is committed,
process each remaining chunk, finalize), with the example pipeline on local files.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_support import assert_record_invariant, read_failures, read_parts, write_config

from modalkit.batch.chunk import marker_identity, process_chunk, read_marker
from modalkit.batch.job import JobPlan, finalize_job, find_committed, plan_job, resolve_job_config, start_job
from modalkit.batch.layout import OutputLayout
from modalkit.batch.replay import collect_failures
from modalkit.batch.storage import default_store
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import import_pipeline
from modalkit.iomodel import ChunkResult, JobSummary
from modalkit.settings import Settings

TEXTS = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]
CHUNK = 64 * 1024


class Job:
    """One job's settings and steps, run inline: plan, claim, skip what is committed, process the rest (``only``:
    those chunks), finalize."""

    def __init__(self, tmp_path: Path, pipeline: str = "pipelines:PoisonAwareSentiment", **job_config: Any) -> None:
        self.settings = Settings.load(str(write_config(tmp_path, pipeline=pipeline)))
        self.config = resolve_job_config(self.settings, **{"chunk_size": "64KiB", **job_config})
        name, entry = self.settings.model_settings.entry(None)
        assert entry.pipeline is not None
        self.pipeline = import_pipeline(entry.pipeline)(name, str(tmp_path / "models"), {})

    def plan(self, input_uri: str, output_uri: str) -> JobPlan:
        return plan_job(self.settings, input_uri, output_uri, None, self.config)

    def run(
        self, input_uri: str, output_uri: str, only: set[int] | None = None
    ) -> tuple[JobPlan, list[ChunkResult], JobSummary]:
        plan = self.plan(input_uri, output_uri)
        start_job(plan)
        done = find_committed(plan)
        todo = [c for c in plan.chunks if c.index not in done and (only is None or c.index in only)]
        results = list(done.values()) + [process_chunk(plan.job, c, self.pipeline) for c in todo]
        return plan, results, finalize_job(plan, results, 1.0)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def line_ids(key: str, data: bytes, skip_first: bool = False) -> list[str]:
    """``<key>:<byte offset>`` of each line of ``data`` (the header line of a CSV left out)."""
    ids, at = [], 0
    for n, line in enumerate(data.splitlines(keepends=True)):
        if not (skip_first and n == 0):
            ids.append(f"{key}:{at}")
        at += len(line)
    return ids


def offsets(data: bytes) -> list[int]:
    return [int(i.rsplit(":", 1)[1]) for i in line_ids("", data)]


def mixed_dataset(root: Path, small_files: int = 300) -> tuple[list[str], dict[str, tuple[str, int]]]:
    """Small JSONL files (5 records each; every 50th has a record without text), CSV files, a gzipped JSONL file,
    a Parquet file, and one JSONL file large enough to be cut in ranges. Returns every input record's id and, for
    each record that must fail, its ``(key, position)``."""
    ids: list[str] = []
    bad: dict[str, tuple[str, int]] = {}
    (root / "small").mkdir(parents=True)
    (root / "t").mkdir()
    big = jsonl([{"text": TEXTS[i % 3], "pad": "x" * 400} for i in range(350)])  # ~150 KB: three 64 KiB ranges
    (root / "big.jsonl").write_bytes(big)
    ids += line_ids("big.jsonl", big)
    for f in range(small_files):
        key = f"small/f{f:05d}.jsonl"
        rows: list[dict[str, Any]] = [{"text": f"{TEXTS[(f + i) % 3]} {f}"} for i in range(5)]
        if f % 50 == 7:
            rows[2] = {"note": "no text"}
        data = jsonl(rows)
        (root / key).write_bytes(data)
        ids += line_ids(key, data)
        if f % 50 == 7:
            bad[f"{key}:{offsets(data)[2]}"] = (key, offsets(data)[2])
    for c in range(3):
        data = ("id,text\n" + "".join(f'c{c}-{i},"{TEXTS[i % 3]}"\n' for i in range(4))).encode()
        (root / "t" / f"c{c}.csv").write_bytes(data)
        ids += line_ids(f"t/c{c}.csv", data, skip_first=True)
    plain = jsonl([{"text": TEXTS[i % 3]} for i in range(6)])
    (root / "t" / "g.jsonl.gz").write_bytes(gzip.compress(plain))
    ids += line_ids("t/g.jsonl.gz", plain)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": [TEXTS[i % 3] for i in range(7)]}), buffer)
    (root / "t" / "p.parquet").write_bytes(buffer.getvalue())
    ids += [f"t/p.parquet:{row}" for row in range(7)]
    return ids, bad


def objects(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_small_files_are_packed_into_few_chunks_and_every_record_is_in_the_output_once(tmp_path: Path) -> None:
    ids, bad = mixed_dataset(tmp_path / "in")
    out = tmp_path / "out"
    plan, results, summary = Job(tmp_path).run(str(tmp_path / "in"), str(out))
    files = 1 + 300 + 3 + 1 + 1
    assert summary.chunks <= 8, [len(c.pieces()) for c in plan.chunks]
    assert max(len(c.pieces()) for c in plan.chunks) > 100
    for chunk in plan.chunks:
        pieces = chunk.pieces()
        assert len(pieces) == 1 or sum(p.size for p in pieces) <= CHUNK
        assert len({p.key for p in pieces}) == len(pieces)  # a file's ranges never share a chunk
    assert sum(len(c.pieces()) for c in plan.chunks) == files + 2  # big.jsonl in three ranges
    assert_record_invariant(str(out), ids, summary=summary.model_dump())
    failures = read_failures(str(out))
    assert {f["record_id"] for f in failures} == set(bad)
    for failure in failures:
        key, pos = bad[failure["record_id"]]
        assert failure["meta"] == {"key": key, "position": pos}
        assert failure["error"].startswith(f"{key} at byte {pos}: ")
    # a part file and a marker per chunk (and a failure file for a chunk with failures), not per file
    with_failures = {r.index for r in results if r.failed}
    expected = {f"part-{i:05d}.jsonl" for i in range(summary.chunks)} | {
        f"_chunks/{i:05d}.json" for i in range(summary.chunks)
    }
    expected |= {f"_failures/part-{i:05d}.jsonl" for i in with_failures} | {"_job.json", "_manifest.json"}
    assert objects(out) == expected
    assert len(expected) < files / 10


def test_a_resumed_job_skips_its_committed_packed_chunks_and_holds_each_record_once(tmp_path: Path) -> None:
    ids, _ = mixed_dataset(tmp_path / "in")
    out = tmp_path / "out"
    job = Job(tmp_path)
    last = len(job.plan(str(tmp_path / "in"), str(out)).chunks) - 1
    plan, first, _ = job.run(str(tmp_path / "in"), str(out), only={0, last})
    assert len(first) == 2  # interrupted after two chunks (one of them packed)
    assert any(len(plan.chunks[r.index].pieces()) > 1 for r in first)
    _, again, summary = job.run(str(tmp_path / "in"), str(out))
    assert sorted(r.index for r in again if r.skipped) == sorted(r.index for r in first)
    assert_record_invariant(str(out), ids, summary=summary.model_dump())


def test_a_marker_of_another_packing_is_refused_naming_both(tmp_path: Path) -> None:
    mixed_dataset(tmp_path / "in", small_files=20)
    out = tmp_path / "out"
    job = Job(tmp_path)
    plan, _, _ = job.run(str(tmp_path / "in"), str(out))
    packed = next(c for c in plan.chunks if c.more)
    marker = OutputLayout(str(out)).marker(packed.index)
    assert marker_identity(plan.job.job_id, packed)["more"][0]["key"] == packed.more[0].key
    other = packed.model_copy(update={"more": packed.more[:-1]})  # the same first file, one file fewer
    with pytest.raises(ConfigError, match=r"more files, not chunk \d+ of this run"):
        read_marker(marker, plan.job.job_id, other, default_store())
    single = packed.model_copy(update={"more": ()})
    with pytest.raises(ConfigError, match="not chunk"):
        read_marker(marker, plan.job.job_id, single, default_store())
    assert read_marker(marker, plan.job.job_id, packed, default_store()).skipped


def test_replaying_the_failures_of_packed_chunks_keeps_their_ids(tmp_path: Path) -> None:
    _, bad = mixed_dataset(tmp_path / "in")
    out = tmp_path / "out"
    job = Job(tmp_path)
    job.run(str(tmp_path / "in"), str(out))
    replay = collect_failures(str(out), str(tmp_path / "replayed"))
    assert replay.replayable == len(bad)
    _, _, summary = job.run(replay.input_uri, str(tmp_path / "replayed"))
    assert summary.failed == len(bad)  # they fail again (no text), under their first ids
    assert {f["record_id"] for f in read_failures(str(tmp_path / "replayed"))} == set(bad)


def test_ids_repeated_across_the_files_of_one_packed_chunk_are_counted_with_their_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    a = jsonl([{"order_id": i, "text": TEXTS[i % 3]} for i in range(5)])
    b = jsonl([{"order_id": 10 + i, "text": TEXTS[i % 3]} for i in range(5)])
    c = jsonl([{"order_id": i, "text": TEXTS[i % 3] + " again"} for i in (9, 4, 3)])
    for name, data in (("a", a), ("b", b), ("c", c)):
        (tmp_path / "in" / f"{name}.jsonl").write_bytes(data)
    out = str(tmp_path / "out")
    _, _, summary = Job(tmp_path, id_field="order_id").run(str(tmp_path / "in"), out)
    assert (summary.chunks, summary.records, summary.succeeded) == (1, 13, 13)  # one chunk; repeats are not failures
    assert summary.duplicate_ids == 2
    in_a, in_c = offsets(a), offsets(c)
    assert [(e.record_id, [(o.key, o.position) for o in e.occurrences]) for e in summary.duplicate_examples] == [
        (3, [("a.jsonl", in_a[3]), ("c.jsonl", in_c[2])]),
        (4, [("a.jsonl", in_a[4]), ("c.jsonl", in_c[1])]),
    ]


def test_a_record_that_kills_its_worker_in_the_second_file_of_a_packed_chunk_fails_alone(tmp_path: Path) -> None:
    from modalkit.runners.local import LocalRunner

    (tmp_path / "in").mkdir()
    a = jsonl([{"text": TEXTS[i % 3]} for i in range(10)])
    b = jsonl([{"text": "KILL-WORKER right here"}] + [{"text": TEXTS[i % 3]} for i in range(9)])
    (tmp_path / "in" / "a.jsonl").write_bytes(a)
    (tmp_path / "in" / "b.jsonl").write_bytes(b)
    job = Job(tmp_path, pipeline="pipelines:KillsItsWorker")
    out = str(tmp_path / "out")
    plan = job.plan(str(tmp_path / "in"), out)
    start_job(plan)
    (chunk,) = plan.chunks
    assert [p.key for p in chunk.pieces()] == ["a.jsonl", "b.jsonl"]
    with LocalRunner(job.settings, "sentiment", workers=1) as runner:
        result = runner.run_chunk(plan.job, chunk)
    summary = finalize_job(plan, [result], 1.0)
    assert (summary.records, summary.succeeded, summary.failed) == (20, 19, 1)
    (failure,) = read_failures(out)
    assert (failure["record_id"], failure["error_type"], failure["meta"]) == (
        "b.jsonl:0", "WorkerCrashed", {"key": "b.jsonl", "position": 0}
    )  # fmt: skip
    assert "a.jsonl:0" in {row["record_id"] for row in read_parts(out)}  # same position, the other file: scored
    assert_record_invariant(out, line_ids("a.jsonl", a) + line_ids("b.jsonl", b), summary=summary.model_dump())


def test_a_job_of_one_file_plans_and_commits_as_before_packing(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    data = jsonl([{"text": TEXTS[i % 3], "pad": "x" * 1500} for i in range(60)])
    (tmp_path / "in" / "r.jsonl").write_bytes(data)
    out = tmp_path / "out"
    plan, _, _ = Job(tmp_path).run(str(tmp_path / "in"), str(out))
    assert [(c.extent.start, c.extent.end) for c in plan.chunks] == [(0, 46600), (46600, None)]  # type: ignore[union-attr]
    for chunk in plan.chunks:
        assert list(chunk.model_dump(mode="json")) == [
            "job_id", "index", "uri", "key", "format", "compression", "extent", "size"
        ]  # fmt: skip
        marker = orjson.loads((out / "_chunks" / f"{chunk.index:05d}.json").read_bytes())
        assert list(marker)[:3] == ["job_id", "key", "extent"]
        assert "more" not in marker
        assert set(marker) - {"job_id", "key", "extent"} == set(ChunkResult.model_fields)


# --- remote inputs: a packed chunk of small S3 objects, read ahead -------------------------------------------------


def upload_small_objects(s3: Any, bucket: str, files: int) -> list[str]:
    """``files`` small JSONL objects, a CSV, a gzipped JSONL and a Parquet object; every record's id."""
    s3.create_bucket(Bucket=bucket)
    ids: list[str] = []
    for f in range(files):
        data = jsonl([{"text": f"{TEXTS[(f + i) % 3]} {f}"} for i in range(5)])
        s3.put_object(Bucket=bucket, Key=f"in/f{f:04d}.jsonl", Body=data)
        ids += line_ids(f"f{f:04d}.jsonl", data)
    csv_data = ("id,text\n" + "".join(f'c-{i},"{TEXTS[i % 3]}"\n' for i in range(4))).encode()
    s3.put_object(Bucket=bucket, Key="in/z/c.csv", Body=csv_data)
    ids += line_ids("z/c.csv", csv_data, skip_first=True)
    plain = jsonl([{"text": TEXTS[i % 3]} for i in range(6)])
    s3.put_object(Bucket=bucket, Key="in/z/g.jsonl.gz", Body=gzip.compress(plain))
    ids += line_ids("z/g.jsonl.gz", plain)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": [TEXTS[i % 3] for i in range(7)]}), buffer)
    s3.put_object(Bucket=bucket, Key="in/z/p.parquet", Body=buffer.getvalue())
    ids += [f"z/p.parquet:{row}" for row in range(7)]
    return ids


def test_a_packed_chunk_of_small_s3_objects_holds_every_record_once(tmp_path: Path, s3: Any, unique: str) -> None:
    bucket = f"packed-{unique}"
    ids = upload_small_objects(s3, bucket, files=120)
    out = f"s3://{bucket}/out"
    plan, _, summary = Job(tmp_path).run(f"s3://{bucket}/in", out)
    assert [len(c.pieces()) for c in plan.chunks] == [123]
    assert_record_invariant(out, ids, summary=summary.model_dump())
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "out/_chunks/00000.json", "out/_job.json", "out/_manifest.json", "out/part-00000.jsonl"
    ]  # fmt: skip


def test_a_small_object_gone_since_planning_fails_its_packed_chunk_naming_it(
    tmp_path: Path, s3: Any, unique: str
) -> None:
    from modalkit.exceptions import StorageError

    bucket = f"packed-{unique}"
    upload_small_objects(s3, bucket, files=40)
    job = Job(tmp_path)
    plan = job.plan(f"s3://{bucket}/in", f"s3://{bucket}/out")
    start_job(plan)
    s3.delete_object(Bucket=bucket, Key="in/f0031.jsonl")
    with pytest.raises(StorageError, match=r"f0031\.jsonl"):
        process_chunk(plan.job, plan.chunks[0], job.pipeline)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="out/_chunks/")  # nothing committed
