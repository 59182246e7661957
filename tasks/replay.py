"""Task: gather a finished job's failure records into the input of a replay job."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modalkit.batch.replay import ReplayInput, collect_failures
from modalkit.batch.storage import Store


@task(name="collect-failures", cache_policy=NO_CACHE)  # storage calls retry themselves
def collect(job_output_uri: str, output_uri: str, stages: list[str] | None, store: Store | None = None) -> ReplayInput:
    """Write the failures of the job at ``job_output_uri`` as the replay job's input."""
    return collect_failures(job_output_uri, output_uri, stages, store)
