"""Task: run one chunk on the inference backend (local worker pool or Modal) and return its counts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modalkit.batch.backends import ChunkBackend
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from tasks import retry_if_transient


@task(name="run-chunk", task_run_name="chunk-{chunk.index:05d}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)  # fmt: skip
def run_chunk(backend: ChunkBackend, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
    """Process one chunk (skipped when its commit marker exists). Retried on transient errors only."""
    return backend.run_chunk(job, chunk)
