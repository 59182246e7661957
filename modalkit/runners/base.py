"""What the batch flow needs of the place where chunks run: the ChunkRunner protocol and the factory seam."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
    from modalkit.settings import JobConfig, Settings

__all__ = ["ChunkRunner", "RunnerFactory"]


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
