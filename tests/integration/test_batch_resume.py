"""Resume is decided before dispatch: a job run again sends its committed chunks to no worker at all.

The jobs run flow ``batch-inference`` on Prefect's test server with the real local worker pool (two spawned
processes) behind a runner that counts the chunks handed to it, on local files.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from batch_support import assert_record_invariant, write_config

from flows.batch_inference import build_batch_flow
from modalkit.batch.layout import OutputLayout
from modalkit.exceptions import JobFailed, RemoteError
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.runners import ChunkRunner, open_runner
from modalkit.settings import JobConfig, Settings

pytestmark = pytest.mark.slow


class CountingRunner:
    """The real runner the flow would use, recording every chunk that reaches it."""

    def __init__(self, inner: ChunkRunner) -> None:
        self.inner = inner
        self.slots = inner.slots
        self.chunks: list[int] = []
        self._lock = threading.Lock()

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        with self._lock:
            self.chunks.append(chunk.index)
        return self.inner.run_chunk(job, chunk)

    def close(self) -> None:
        self.inner.close()

    def cancel(self) -> None:
        self.inner.cancel()


class Runners:
    """A runner factory for the flow that keeps every runner it made."""

    def __init__(self) -> None:
        self.made: list[CountingRunner] = []

    def __call__(self, settings: Settings, model_name: str, job_config: JobConfig) -> ChunkRunner:
        runner = CountingRunner(open_runner(settings, model_name, job_config))
        self.made.append(runner)
        return runner


def write_reviews(folder: Path, n: int) -> None:
    folder.mkdir()
    texts = ["Absolutely love it, great value", "Terrible, it broke after a day", "It is fine, nothing special"]
    lines = [
        json.dumps({"id": f"r{i:05d}", "text": f"{texts[i % 3]} (review {i}) " + "filler " * 40}) for i in range(n)
    ]
    (folder / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_committed_chunks_of_a_resumed_local_job_never_reach_a_worker(tmp_path: Path, prefect_api: str) -> None:
    config = write_config(tmp_path)
    write_reviews(tmp_path / "in", 1200)  # about 370 KiB: six chunks of 64 KiB
    runners = Runners()
    batch_inference = build_batch_flow(runners)
    params = {"input_uri": str(tmp_path / "in"), "output_uri": str(tmp_path / "out"), "config": str(config),
              "id_field": "id"}  # fmt: skip

    first = batch_inference(**params)
    again = batch_inference(**params)
    layout = OutputLayout(str(tmp_path / "out"))
    for index in (1, 4):  # as if the job had been killed before these two committed
        Path(layout.marker(index)).unlink()
    partly = batch_inference(**params)

    assert first["chunks"] >= 5
    assert sorted(runners.made[0].chunks) == list(range(first["chunks"]))
    assert runners.made[1].chunks == []
    assert again["chunks_skipped"] == again["chunks"] == first["chunks"]
    assert sorted(runners.made[2].chunks) == [1, 4]
    assert partly["chunks_skipped"] == first["chunks"] - 2
    for summary in (again, partly):
        assert {k: summary[k] for k in ("records", "succeeded", "failed")} == {
            k: first[k] for k in ("records", "succeeded", "failed")
        }
    assert first["records"] == 1200
    assert_record_invariant(str(tmp_path / "out"), [f"r{i:05d}" for i in range(1200)], summary=partly)


def test_a_local_worker_on_a_broken_gpu_is_replaced_and_its_chunk_runs_again_elsewhere(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_GPU_MARKER", str(tmp_path / "broken-gpu-claimed"))
    config = write_config(tmp_path, "pipelines:BrokenGpuInOneWorker", job_config={"retry_delay_seconds": 0.1})
    write_reviews(tmp_path / "in", 600)
    runners = Runners()

    summary = build_batch_flow(runners)(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                                        config=str(config), id_field="id")  # fmt: skip

    assert (tmp_path / "broken-gpu-claimed").exists()  # one worker did sit on the broken GPU
    assert summary["status"] == "completed"
    assert (summary["records"], summary["succeeded"], summary["failed"]) == (600, 600, 0)
    assert len(runners.made[0].chunks) > summary["chunks"]  # the chunk that met it was sent again
    assert_record_invariant(str(tmp_path / "out"), [f"r{i:05d}" for i in range(600)], summary=summary)


class OutageRunner(CountingRunner):
    """Every chunk fails with a retryable error, as in an outage that lasts longer than a chunk's retries."""

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        with self._lock:
            self.chunks.append(chunk.index)
        raise RemoteError(f"chunk {chunk.index}: the storage is unreachable", retryable=True)


def test_once_a_chunk_has_failed_for_good_no_new_chunk_starts_and_the_job_fails_as_retryable(
    tmp_path: Path, prefect_api: str
) -> None:
    config = write_config(tmp_path, job_config={"retry_delay_seconds": 0.05, "chunk_retries": 2, "concurrency": 1})
    write_reviews(tmp_path / "in", 1200)  # six chunks
    made: list[OutageRunner] = []

    def outage(settings: Settings, model_name: str, job_config: JobConfig) -> ChunkRunner:
        made.append(OutageRunner(open_runner(settings, model_name, job_config)))
        return made[-1]

    with pytest.raises(JobFailed, match=r"chunk\(s\) failed.*run the job again to resume") as raised:
        build_batch_flow(outage)(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                                 config=str(config), id_field="id")  # fmt: skip

    [runner] = made
    assert len(set(runner.chunks)) == 1  # one chunk, tried 1 + chunk_retries times; the other five never started
    assert len(runner.chunks) == 3
    assert raised.value.retryable
    assert raised.value.summary is not None
    assert raised.value.summary["chunks"] >= 5


def test_on_progress_is_told_after_every_chunk_and_a_failing_listener_does_not_break_the_job(
    tmp_path: Path, prefect_api: str
) -> None:
    from modalkit.batch.progress import JobProgress

    write_reviews(tmp_path / "in", 1200)  # six chunks of 64 KiB
    seen: list[JobProgress] = []

    def on_progress(progress: JobProgress) -> None:
        seen.append(progress)
        raise RuntimeError("a listener that breaks")

    summary = build_batch_flow(on_progress=on_progress)(
        input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), config=str(write_config(tmp_path))
    )

    assert summary["status"] == "completed"
    assert [p.chunks_done for p in seen] == list(range(1, summary["chunks"] + 1))
    assert seen[-1].records == summary["records"] == 1200
    assert seen[-1].bytes_done == seen[-1].bytes_total
