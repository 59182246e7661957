"""What a job writes, object by object: nothing empty, and a manifest whose size does not grow with the chunks.

Jobs run the library's own steps in this process, as the flow runs them (plan, claim, find what is committed,
process each remaining chunk, finalize), with the example pipeline on local files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from batch_support import assert_record_invariant, write_config
from support import MotoServer

from modalkit.batch.chunk import process_chunk
from modalkit.batch.job import JobPlan, finalize_job, find_committed, plan_job, resolve_job_config, start_job
from modalkit.batch.layout import OutputLayout
from modalkit.batch.replay import collect_failures
from modalkit.batch.storage import default_store
from modalkit.exceptions import ConfigError
from modalkit.inference_pipeline import import_pipeline
from modalkit.iomodel import ChunkResult, JobSummary
from modalkit.settings import Settings

TEXTS = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]


def reviews(n: int, filler: int = 8, bad: frozenset[int] = frozenset()) -> bytes:
    """JSONL reviews ``r00000``...; the records at the positions in ``bad`` lack their text (they fail validation).

    ``filler`` pads each record by twice as many bytes (in a field the pipeline ignores)."""
    rows = [{"id": f"r{i:05d}", "pad": "x " * filler} if i in bad else
            {"id": f"r{i:05d}", "text": TEXTS[i % 3], "pad": "x " * filler} for i in range(n)]  # fmt: skip
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


class Job:
    """One job's settings and steps, run inline: plan, claim, skip what is committed, process the rest, finalize."""

    def __init__(self, tmp_path: Path, **job_config: Any) -> None:
        self.settings = Settings.load(str(write_config(tmp_path)))
        self.config = resolve_job_config(self.settings, **job_config)
        name, entry = self.settings.model_settings.entry(None)
        assert entry.pipeline is not None
        folder = self.settings.model_settings.local_model_repository_folder
        self.pipeline = import_pipeline(entry.pipeline)(name, folder, {})

    def plan(self, input_uri: str, output_uri: str) -> JobPlan:
        return plan_job(self.settings, input_uri, output_uri, None, self.config)

    def run(self, input_uri: str, output_uri: str) -> tuple[list[ChunkResult], JobSummary]:
        plan = self.plan(input_uri, output_uri)
        start_job(plan)
        done = find_committed(plan)
        fresh = [process_chunk(plan.job, c, self.pipeline) for c in plan.chunks if c.index not in done]
        results = list(done.values()) + fresh
        return results, finalize_job(plan, results, 1.0)


def objects(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def ids_of(data: bytes, key: str = "r.jsonl") -> list[str]:
    """The record ids a job without an ``id_field`` gives the lines of ``data``: ``<key>:<byte offset>``."""
    offsets, at = [], 0
    for line in data.splitlines(keepends=True):
        offsets.append(f"{key}:{at}")
        at += len(line)
    return offsets


def test_a_job_without_failures_writes_only_part_files_markers_and_its_own_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    data = reviews(60, filler=1500)  # about 3 KB a record: three 64 KiB chunks
    (tmp_path / "in" / "r.jsonl").write_bytes(data)
    out = tmp_path / "out"
    _, summary = Job(tmp_path, chunk_size="64KiB").run(str(tmp_path / "in"), str(out))
    assert (summary.records, summary.failed, summary.chunks) == (60, 0, 3)
    assert objects(out) == ["_chunks/00000.json", "_chunks/00001.json", "_chunks/00002.json", "_job.json",
                            "_manifest.json", "part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]  # fmt: skip
    for i in range(3):
        marker = orjson.loads((out / "_chunks" / f"{i:05d}.json").read_bytes())
        assert (marker["failed"], marker["failures_uri"]) == (0, None)
    assert_record_invariant(str(out), ids_of(data), summary=summary.model_dump())


def test_a_job_without_failures_resumes_and_says_it_has_nothing_to_replay(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    data = reviews(60, filler=1500)
    (tmp_path / "in" / "r.jsonl").write_bytes(data)
    out = tmp_path / "out"
    job = Job(tmp_path, chunk_size="64KiB")
    job.run(str(tmp_path / "in"), str(out))
    results, summary = job.run(str(tmp_path / "in"), str(out))
    assert [r.skipped for r in results] == [True, True, True]
    assert (summary.records, summary.succeeded, summary.chunks_skipped) == (60, 60, 3)
    assert not (out / "_failures").exists()
    with pytest.raises(ConfigError, match="has no failures to replay"):
        collect_failures(str(out), str(tmp_path / "replayed"))


def test_only_chunks_with_failures_write_a_failure_file_and_replay_reads_them(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    data = reviews(60, filler=1500, bad=frozenset({45, 50}))  # both in the last chunk
    (tmp_path / "in" / "r.jsonl").write_bytes(data)
    out = tmp_path / "out"
    _, summary = Job(tmp_path, chunk_size="64KiB").run(str(tmp_path / "in"), str(out))
    assert summary.failed == 2
    assert objects(out / "_failures") == ["part-00002.jsonl"]
    assert orjson.loads((out / "_chunks" / "00002.json").read_bytes())["failures_uri"] == str(
        out / "_failures" / "part-00002.jsonl"
    )
    assert_record_invariant(str(out), ids_of(data), summary=summary.model_dump())
    replay = collect_failures(str(out), str(tmp_path / "replayed"))
    assert replay.replayable == 2


def test_the_manifest_does_not_grow_with_the_number_of_chunks(tmp_path: Path) -> None:
    sizes = {}
    for records in (8, 80):  # about 4 and 40 chunks
        (tmp_path / f"in{records}").mkdir()
        (tmp_path / f"in{records}" / "r.jsonl").write_bytes(reviews(records, filler=15_000))  # ~30 KB a record
        out = tmp_path / f"out{records}"
        _, summary = Job(tmp_path, chunk_size="64KiB").run(str(tmp_path / f"in{records}"), str(out))
        # every number as one digit: the counts' and the timings' digits vary from run to run, not with the chunks
        text = re.sub(rb"\d+(\.\d+)?", b"0", (out / "_manifest.json").read_bytes())
        sizes[records] = (summary.chunks, len(text))
    (few, small), (many, large) = sizes[8], sizes[80]
    assert many >= few + 30, sizes
    assert large - small < 64, sizes  # the words of the notes, not bytes per chunk
    assert large < 4096, sizes


def test_an_old_output_with_empty_failure_files_and_chunk_results_still_resumes_and_replays(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    data = reviews(60, filler=1500, bad=frozenset({45}))
    (tmp_path / "in" / "r.jsonl").write_bytes(data)
    out = tmp_path / "out"
    job = Job(tmp_path, chunk_size="64KiB")
    results, _ = job.run(str(tmp_path / "in"), str(out))
    layout = OutputLayout(str(out))
    # what earlier versions wrote: an empty failure file for every chunk, its path in the marker, and every chunk's
    # result in the manifest
    for r in results:
        if not r.failed:
            Path(layout.failures(r.index)).write_bytes(b"")
        marker = orjson.loads(Path(layout.marker(r.index)).read_bytes())
        Path(layout.marker(r.index)).write_bytes(orjson.dumps({**marker, "failures_uri": layout.failures(r.index)}))
    manifest = orjson.loads(Path(layout.manifest).read_bytes())
    manifest["chunk_results"] = [r.model_dump() for r in results]
    Path(layout.manifest).write_bytes(orjson.dumps(manifest))

    again, summary = job.run(str(tmp_path / "in"), str(out))
    assert [r.skipped for r in again] == [True, True, True]
    assert (summary.records, summary.failed) == (60, 1)
    assert_record_invariant(str(out), ids_of(data), summary=summary.model_dump())
    assert collect_failures(str(out), str(tmp_path / "replayed")).replayable == 1
    assert os.path.getsize(layout.failures(0)) == 0  # left as it was


def test_the_manifest_names_the_failed_chunks_with_their_errors_and_the_errors_by_type(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_bytes(reviews(60, filler=1500, bad=frozenset({45, 50})))
    out = tmp_path / "out"
    job = Job(tmp_path, chunk_size="64KiB")
    plan = job.plan(str(tmp_path / "in"), str(out))
    start_job(plan)
    results = [process_chunk(plan.job, c, job.pipeline) for c in plan.chunks if c.index != 1]
    summary = finalize_job(plan, results, 1.0, [(1, "RemoteError: the worker was lost")])
    manifest = orjson.loads((out / "_manifest.json").read_bytes())
    assert (summary.status, manifest["chunks_failed"]) == ("failed", 1)
    assert manifest["failed_chunk_errors"] == [{"index": 1, "error": "RemoteError: the worker was lost"}]
    assert manifest["errors_by_type"] == {"ValidationError": 2}
    assert "text" in manifest["error_examples"]["ValidationError"]
    assert "chunk_results" not in manifest


def test_files_an_interrupted_attempt_left_are_gone_when_the_retry_writes_none(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    data = reviews(60, filler=1500)
    (tmp_path / "in" / "r.jsonl").write_bytes(data)
    out = tmp_path / "out"
    job = Job(tmp_path, chunk_size="64KiB")
    plan = job.plan(str(tmp_path / "in"), str(out))
    start_job(plan)
    # an earlier attempt of chunk 1 wrote a failure file (a record failed then, say a timeout) and was lost before
    # its marker; this attempt has no failure
    stale = Path(OutputLayout(str(out)).failures(1))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(json.dumps({"record_id": ids_of(data)[25], "stage": "predict"}).encode() + b"\n")
    results = [process_chunk(plan.job, c, job.pipeline) for c in plan.chunks]
    summary = finalize_job(plan, results, 1.0)
    assert not stale.exists()
    assert_record_invariant(str(out), ids_of(data), summary=summary.model_dump())


def test_an_s3_chunk_costs_one_head_per_existence_check_and_no_listing(
    tmp_path: Path, aws: MotoServer, s3: Any, unique: str
) -> None:
    data = reviews(60, filler=1500, bad=frozenset({3}))  # three 64 KiB chunks, a failure in the first
    s3.create_bucket(Bucket=unique)
    s3.put_object(Bucket=unique, Key="in/r.jsonl", Body=data)
    job = Job(tmp_path, chunk_size="64KiB")
    plan = job.plan(f"s3://{unique}/in", f"s3://{unique}/out")
    start_job(plan)
    since = aws.log_size()
    results = [process_chunk(plan.job, chunk, job.pipeline) for chunk in plan.chunks]
    requests = aws.requests(since)
    chunks = len(plan.chunks)
    # per chunk: its marker looked for (HEAD), its input read (GET), its part file (PUT) and the failure file it does
    # not write looked for (HEAD), or the failure file written (PUT), then its marker (PUT); never a listing: s3fs's
    # own exists() follows a missing key with one (is it a folder?), a request per check for nothing
    assert requests["LIST"] == 0, dict(requests)
    assert requests["HEAD"] == 2 * chunks - 1, dict(requests)
    assert requests["PUT"] == 2 * chunks + 1, dict(requests)
    summary = finalize_job(plan, results, 1.0)
    assert_record_invariant(f"s3://{unique}/out", ids_of(data), summary=summary.model_dump())


def test_a_packed_chunk_of_small_s3_objects_reads_each_with_one_get_and_no_head(
    tmp_path: Path, aws: MotoServer, s3: Any, unique: str
) -> None:
    data = reviews(120)
    lines = data.splitlines(keepends=True)
    s3.create_bucket(Bucket=unique)
    for n in range(40):
        s3.put_object(Bucket=unique, Key=f"in/f{n:02d}.jsonl", Body=b"".join(lines[3 * n : 3 * n + 3]))
    job = Job(tmp_path, chunk_size="64KiB", id_field="id")
    plan = job.plan(f"s3://{unique}/in", f"s3://{unique}/out")
    (chunk,) = plan.chunks
    assert len(chunk.pieces()) == 40
    start_job(plan)
    default_store().filesystem(f"s3://{unique}")[0].invalidate_cache()  # as a worker, which listed nothing
    since = aws.log_size()
    result = process_chunk(plan.job, chunk, job.pipeline)
    requests = aws.requests(since)
    # the 40 files read ahead, a GET each: s3fs's cat_file asks an object's size first (a HEAD) unless told to
    # fetch it in one part; the chunk's own HEADs: its marker and the failure file it does not write, looked for
    assert requests["GET"] == 40, dict(requests)
    assert requests["HEAD"] == 2, dict(requests)
    summary = finalize_job(plan, [result], 1.0)
    assert_record_invariant(f"s3://{unique}/out", [f"r{i:05d}" for i in range(120)], summary=summary.model_dump())
