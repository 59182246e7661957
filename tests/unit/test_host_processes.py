"""Host processes (``job_config.host_workers``): a worker's sub-batches validated and preprocessed in processes of
their own while ``predict`` runs in the worker. The same outputs in input order, a poison record failing alone,
started once per worker, stage timings from the host processes, Ctrl-C, no process outliving its worker, memory
bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pipelines import HostFed, HostTokens
from support import interrupt, running

from modalkit.batch.chunk import ChunkProcessor
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.iomodel import ChunkSpec, JobSpec

JOB_ID = "job0123456789abc"
ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def write_input(tmp_path: Path, records: list[Any], name: str = "a.jsonl") -> ChunkSpec:
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    (folder / name).write_bytes(b"".join(line + b"\n" for line in lines))
    (chunk,) = plan_chunks(list_dataset(str(folder)), 10**9, JOB_ID)
    return chunk


def make_job(tmp_path: Path, out: str, **kwargs: Any) -> JobSpec:
    fields: dict[str, Any] = {"max_batch_size": 4, "prefetch_batches": 2, **kwargs}
    return JobSpec(job_id=JOB_ID, input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / out), model_name="m",
                   **fields)  # fmt: skip


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "part-00000.jsonl").read_bytes().splitlines()]


def failures(out: Path) -> list[dict[str, Any]]:
    path = out / "_failures" / "part-00000.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def hosted() -> Any:
    processor = ChunkProcessor(HostFed("m", "models", {}), overlap=True, host_workers=2)
    yield processor
    processor.close()


def test_with_host_processes_a_chunk_writes_the_same_rows_and_failures_in_input_order_as_in_process(
    tmp_path: Path, hosted: ChunkProcessor
) -> None:
    records: list[Any] = [{"id": f"r{i}", "text": "x" * (i % 9 + 1)} for i in range(120)]
    records[9]["text"] = "POISON-PRE here"
    records[41]["text"] = "POISON-PREDICT here"
    records[70] = {"id": "r70", "text": ""}  # invalid
    records[88] = b'{"id": "r88", "text": '  # not JSON
    chunk = write_input(tmp_path, records)
    in_process = ChunkProcessor(HostFed("m", "models", {}), overlap=True).process(make_job(tmp_path, "one"), chunk)
    result = hosted.process(make_job(tmp_path, "host"), chunk)

    assert hosted.host is not None
    assert (result.records, result.succeeded, result.failed) == (in_process.records, 116, 4)
    mine, theirs = rows(tmp_path / "one"), rows(tmp_path / "host")
    assert [r["record_id"] for r in theirs] == [r["record_id"] for r in mine]  # input order
    assert [r["length"] for r in theirs] == [r["length"] for r in mine]
    assert [(f["record_id"], f["stage"], f["error_type"]) for f in failures(tmp_path / "host")] == [
        (f["record_id"], f["stage"], f["error_type"]) for f in failures(tmp_path / "one")
    ]
    by = {r["preprocessed_by"] for r in theirs}
    assert set(hosted.host.pids) <= by  # both host processes preprocessed
    assert by <= {*hosted.host.pids, os.getpid()}  # and only the failed sub-batches ran again here


def test_a_poison_record_preprocessed_in_a_host_process_fails_alone_while_the_other_sub_batches_flow(
    tmp_path: Path, hosted: ChunkProcessor
) -> None:
    records = [{"id": f"r{i}", "text": f"text {i}"} for i in range(60)]
    records[13]["text"] = "POISON-PRE in sub-batch 3"
    chunk = write_input(tmp_path, records)
    result = hosted.process(make_job(tmp_path, "out", id_field="id"), chunk)

    assert (result.records, result.succeeded, result.failed) == (60, 59, 1)
    (failure,) = failures(tmp_path / "out")
    assert (failure["record_id"], failure["stage"], failure["error_type"]) == ("r13", "preprocess", "ValueError")
    assert [r["record_id"] for r in rows(tmp_path / "out")] == [f"r{i}" for i in range(60) if i != 13]
    # its neighbours ran again here, split in halves; every other sub-batch stayed in the host processes
    by_here = [r["record_id"] for r in rows(tmp_path / "out") if r["preprocessed_by"] == os.getpid()]
    assert by_here == ["r12", "r14", "r15"]


def test_host_processes_start_once_per_worker_and_their_stage_seconds_reach_the_chunk_timings(
    tmp_path: Path, hosted: ChunkProcessor
) -> None:
    chunk = write_input(tmp_path, [{"text": f"t{i}"} for i in range(80)])
    assert hosted.host is not None
    pids = hosted.host.pids
    first = hosted.process(make_job(tmp_path, "a"), chunk)
    second = hosted.process(make_job(tmp_path, "b"), chunk)

    assert hosted.host.pids == pids  # the same processes, chunk after chunk
    assert first.succeeded == second.succeeded == 80
    for result in (first, second):
        assert result.stages.preprocess > 0  # what the host processes reported
        assert result.stages.predict >= 20 * HostFed.device_seconds  # 20 sub-batches on the 'device'
        assert result.stages.device_busy > 0


def test_a_pipeline_without_host_stages_or_with_preprocess_on_the_device_starts_no_host_process() -> None:
    class OnDevice(HostFed):
        device_stages = ("preprocess", "predict")

    class NoHost(HostFed):
        def host_stages(self) -> None:
            return None

    for cls in (OnDevice, NoHost):
        assert ChunkProcessor(cls("m", "models", {}), host_workers=4).host is None
    assert ChunkProcessor(HostFed("m", "models", {}), host_workers=1).host is None


_RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from pipelines import HostFed
from modalkit.batch.chunk import ChunkProcessor
from modalkit.batch.planning import list_dataset, plan_chunks
from modalkit.iomodel import JobSpec

class Slow(HostFed):
    device_seconds = 0.2

if __name__ == "__main__":
    base = Path(sys.argv[2])
    processor = ChunkProcessor(Slow("m", "models", {}), overlap=True, host_workers=2)
    (base / "pids").write_text(" ".join(map(str, processor.host.pids)))
    (chunk,) = plan_chunks(list_dataset(str(base / "in")), 10**9, "job")
    job = JobSpec(job_id="job", input_uri=str(base / "in"), output_uri=str(base / "out"), model_name="m",
                  max_batch_size=2, prefetch_batches=2)
    if sys.argv[1] == "wait":
        processor.live_host()
        (base / "started").touch()
        time.sleep(600)
    processor.process(job, chunk)
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    write_input(tmp_path, [{"text": f"t{i}"} for i in range(2000)])  # minutes of work at 0.2 s a sub-batch
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_RUN), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), mode, str(tmp_path), str(TESTS)], env=env,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / ("started" if mode == "wait" else "out")).exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    return proc, [int(p) for p in (tmp_path / "pids").read_text().split()]


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_ctrl_c_stops_a_chunk_fed_by_host_processes_within_seconds_and_they_are_gone(tmp_path: Path) -> None:
    proc, pids = _start(tmp_path, "run")
    assert all(running(p) for p in pids)
    stderr, stopped = interrupt(proc)
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in stderr
    assert stderr.count(b"Traceback") == 1  # the worker's only: the host processes ignore Ctrl-C
    assert stopped < 2.0
    assert _gone_within(pids, 3.0)
    assert not (tmp_path / "out" / "_chunks").exists()  # nothing committed


def test_host_processes_die_within_seconds_of_their_worker_killed_with_sigkill(tmp_path: Path) -> None:
    proc, pids = _start(tmp_path, "wait")
    try:
        assert all(running(p) for p in pids)
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone_within(pids, 3.0)


def test_host_processes_are_gone_once_the_worker_closes_them(tmp_path: Path) -> None:
    processor = ChunkProcessor(HostFed("m", "models", {}), overlap=True, host_workers=2)
    assert processor.host is not None
    pids = processor.host.pids
    processor.process(make_job(tmp_path, "out"), write_input(tmp_path, [{"text": "a"}] * 10))
    processor.close()
    assert _gone_within(pids, 3.0)


def test_a_killed_host_process_fails_the_chunk_with_one_line_and_the_next_chunk_starts_others(tmp_path: Path) -> None:
    from modalkit.batch.host_pool import HostProcessLost

    processor = ChunkProcessor(HostFed("m", "models", {}), overlap=True, host_workers=2)
    try:
        records = [{"text": f"t{i}"} for i in range(40)]
        records[21]["text"] = "KILL-HOST"
        chunk = write_input(tmp_path, records)
        with pytest.raises(HostProcessLost, match=r"host process \d+ of this worker was killed by signal|exited with"):
            processor.process(make_job(tmp_path, "out"), chunk)
        assert not (tmp_path / "out" / "_chunks").exists()
        before = processor.host.pids if processor.host else []
        clean = write_input(tmp_path / "b", [{"text": f"t{i}"} for i in range(40)])
        result = processor.process(make_job(tmp_path / "b", "out"), clean)
        assert result.succeeded == 40
        assert processor.host is not None
        assert processor.host.pids != before
    finally:
        processor.close()


def test_a_chunk_fed_by_host_processes_holds_a_bounded_number_of_sub_batches(tmp_path: Path) -> None:
    """Memory stays flat: the worker holds at most depth + 2 sub-batches (depth at least host processes + 1), and
    the host processes no more than are in flight."""
    from test_chunk_overlap import _Big  # counts live input models in this process

    class BigHosted(HostFed):
        input_model = _Big

    _Big.live = _Big.peak = 0
    chunk = write_input(tmp_path, [{"text": "y" * 1000} for _ in range(400)])
    processor = ChunkProcessor(BigHosted("m", "models", {}), overlap=True, host_workers=2)
    try:
        result = processor.process(make_job(tmp_path, "out", max_batch_size=8, prefetch_batches=1), chunk)
    finally:
        processor.close()
    assert result.succeeded == 400
    depth = max(1, 2 + 1)
    assert _Big.peak <= (depth + 2) * 8


def test_host_tokens_are_picklable_and_small() -> None:
    import pickle

    assert len(pickle.dumps(HostTokens())) < 200


def test_the_example_pipelines_give_host_stages_that_preprocess_as_they_do_and_pickle_small(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    from modalkit.examples.sentiment import Review, SentimentPipeline

    pipeline = SentimentPipeline("sentiment", str(tmp_path), {})
    reviews = [Review(text="great value, works well"), Review(text="broke in a day")]
    stages = pickle.loads(pickle.dumps(pipeline.host_stages()))
    assert len(pickle.dumps(stages)) < 200  # the bucket count, not the weights
    mine, theirs = pipeline.preprocess(reviews), stages.preprocess(reviews)
    assert mine.keys() == theirs.keys()
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_by_default_a_worker_keeps_one_cpu_for_itself_and_starts_host_processes_only_from_3_cpus() -> None:
    from modalkit.batch.host_pool import default_host_workers

    assert [default_host_workers(cpus) for cpus in (0.125, 1, 2, 2.5, 3, 8, 16)] == [1, 1, 1, 1, 2, 7, 15]
