"""What the batch flow needs of the place where chunks run: the ChunkRunner protocol, the factory seam, and the
started job a caller that planned it already hands the flow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from modalkit.batch.job import JobPlan
    from modalkit.batch.lease import JobLease
    from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
    from modalkit.settings import JobConfig, Settings

__all__ = ["ChunkRunner", "JobStarter", "RunnerFactory", "StartedJob"]


class ChunkRunner(Protocol):
    """Runs chunks somewhere and reports their counts; the data never passes through it.

    Attributes:
        slots: How many chunks it runs at once (local workers; Modal containers), the flow's default concurrency.
    """

    slots: int

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        """Process one chunk; blocks until it is done. Called from several threads at once."""
        ...

    def close(self) -> None:
        """Release workers and connections, after the chunks in progress."""
        ...

    def cancel(self) -> None:
        """Stop now (an interrupt): chunks in progress are abandoned uncommitted, for a rerun to redo."""
        ...


#: Builds the runner of a job: ``factory(settings, model_name, job_config)``. The batch flow is given one
#: (``flows.batch_inference.build_batch_flow(runner_factory)``); :func:`modalkit.runners.open_runner` is the default.
RunnerFactory = Callable[["Settings", str, "JobConfig"], ChunkRunner]


@dataclass(frozen=True)
class StartedJob:
    """A job ready for its chunks: planned, its output claimed, its runner open.

    Attributes:
        plan: The job's plan (its chunks).
        runner: Where its chunks run; some may be running already.
        committed: The chunks an earlier run committed (listed before any chunk of this run was sent): skipped.
        started: When the job started (``time.perf_counter()``), for its clock.
        lease: This run's lease on the output (one run of a job at a time); the flow releases it at the end.
    """

    plan: JobPlan
    runner: ChunkRunner
    committed: dict[int, ChunkResult]
    started: float
    lease: JobLease | None = None


#: Starts a job: ``start(settings, job_config, input_uri, output_uri, model_name)``. The batch flow plans the job
#: itself unless it is given one (``build_batch_flow(start_job=...)``): ``modalkit batch`` plans and starts the
#: first chunks before Prefect is imported, and hands the flow what it started.
JobStarter = Callable[["Settings", "JobConfig", str, str, "str | None"], StartedJob]
