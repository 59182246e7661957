"""Task: run one chunk on the job's runner (local worker pool or Modal) and return its counts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.runners import ChunkRunner
from tasks import retry_if_transient


@task(name="run-chunk", task_run_name="chunk-{chunk.index:05d}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)  # fmt: skip
def run_chunk(runner: ChunkRunner, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
    """Process one chunk that has no commit marker. Retried on transient errors only."""
    return runner.run_chunk(job, chunk)
