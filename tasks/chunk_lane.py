"""Task: one lane of a job's chunks (a Prefect task run that pulls chunks until none is left), each chunk retried."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from modalkit.runners.lanes import ChunkLanes


@task(name="chunk-lane", task_run_name="chunk-lane-{lane:02d}", cache_policy=NO_CACHE)  # chunks retry in the lane
def chunk_lane(lanes: ChunkLanes, lane: int) -> int:
    """Run the job's chunks, one after another, until none is left; returns how many this lane ran.

    Each chunk is retried on transient errors with exponential backoff (logged: ``chunk 00012 attempt 2/4 in
    4.0 s: ...``); a chunk that fails after its attempts ends this task run Failed, naming the chunk."""
    logger = get_run_logger()
    finished = lanes.run_lane(logger)
    logger.info("lane %02d ran %d chunks", lane, finished)
    return finished
