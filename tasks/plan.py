"""Tasks: check everything and cut the input into chunks (writes nothing), claim the output and take the job's
lease, find what is done."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modalkit.batch.job import JobPlan, find_committed, plan_job, start_job
from modalkit.batch.lease import JobLease, take_lease
from modalkit.batch.storage import Store
from modalkit.iomodel import ChunkResult
from modalkit.settings import JobConfig, Settings


@task(name="plan-chunks", cache_policy=NO_CACHE)  # storage calls retry themselves
def plan_chunks(settings: Settings, input_uri: str, output_uri: str, model_name: str | None,
                job_config: JobConfig, store: Store | None = None) -> JobPlan:  # fmt: skip
    """List the input, check the model, queues and output, and plan the chunks."""
    return plan_job(settings, input_uri, output_uri, model_name, job_config, store)


@task(name="claim-output", cache_policy=NO_CACHE)  # storage calls retry themselves
def claim_output(plan: JobPlan, store: Store, lease_seconds: float, flow_run_id: str | None = None) -> JobLease:
    """Write ``_job.json`` (this output now belongs to this job), then take the job's lease (this run is the one
    run of the job now; another running one makes this one fail at once, naming it)."""
    start_job(plan, store)
    return take_lease(store, plan.job.output_uri, plan.job.job_id, lease_seconds, flow_run_id=flow_run_id)


@task(name="find-committed", cache_policy=NO_CACHE)  # storage calls retry themselves
def committed_chunks(plan: JobPlan, store: Store | None = None) -> dict[int, ChunkResult]:
    """The chunks committed by an earlier run of this job: they are skipped, never sent to a runner."""
    return find_committed(plan, store)
