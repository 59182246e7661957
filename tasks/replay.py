"""Task: gather a finished job's failure records into the input of a replay job."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modalkit.batch.replay import ReplayInput, collect_failures
from tasks import retry_if_transient


@task(name="collect-failures", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 8],
      retry_condition_fn=retry_if_transient)  # fmt: skip
def collect(job_output_uri: str, output_uri: str, stages: list[str] | None) -> ReplayInput:
    """Write the failures of the job at ``job_output_uri`` as the replay job's input."""
    return collect_failures(job_output_uri, output_uri, stages)
