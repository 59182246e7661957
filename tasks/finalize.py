"""Task: sum the chunk results into the job summary and write ``_manifest.json``."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modalkit.batch.job import JobPlan, finalize_job
from modalkit.batch.storage import Store
from modalkit.iomodel import ChunkResult, JobSummary


@task(name="finalize-job", cache_policy=NO_CACHE)  # storage calls retry themselves
def finalize(plan: JobPlan, results: list[ChunkResult], seconds: float, failed_chunks: list[tuple[int, str]],
             store: Store | None = None) -> JobSummary:  # fmt: skip
    """Write the manifest and return the summary."""
    return finalize_job(plan, results, seconds, failed_chunks, store)
