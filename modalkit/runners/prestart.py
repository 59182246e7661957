"""A runner that starts a job's first chunks before the orchestrator is ready, and hands them over when asked.

``modalkit batch`` plans the job and starts its first chunks while Prefect imports and connects (about two
seconds): when the flow then asks for those chunks, it gets the runs already under way. Only chunks that the flow
itself would send first are started early (no commit marker, dispatch order, as many as the runner's slots), and
a chunk is idempotent, so nothing changes but the wait. The caller hands the flow the job it started
(:class:`modalkit.runners.base.StartedJob`: the chunks committed before these started, and the start time).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence

from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.runners.base import ChunkRunner

__all__ = ["PrestartingRunner"]


class PrestartingRunner:
    """Wraps ``inner``; :meth:`prestart` runs chunks now, :meth:`run_chunk` returns a prestarted run if there is one.

    Args:
        inner: The runner the chunks run on.
    """

    def __init__(self, inner: ChunkRunner) -> None:
        self.inner = inner
        self.slots = inner.slots
        self._started: dict[tuple[str, int], concurrent.futures.Future[ChunkResult]] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, inner.slots), thread_name_prefix="modalkit-early")

    def prestart(self, job: JobSpec, chunks: Sequence[ChunkSpec]) -> None:
        """Start ``chunks`` of ``job`` now, on the inner runner."""
        with self._lock:
            for chunk in chunks:
                self._started[(job.job_id, chunk.index)] = self._pool.submit(self.inner.run_chunk, job, chunk)

    def run_chunk(self, job: JobSpec, chunk: ChunkSpec) -> ChunkResult:
        """The prestarted run of this chunk (its result or its error, once), else a new run on the inner runner."""
        with self._lock:
            early = self._started.pop((job.job_id, chunk.index), None)
        if early is not None:
            return early.result()
        return self.inner.run_chunk(job, chunk)

    def close(self) -> None:
        """Wait for early runs nobody asked for (their chunks commit or fail as any other), then close."""
        self._pool.shutdown(wait=True)
        self.inner.close()

    def cancel(self) -> None:
        """Stop now: the inner runner cancels, and early runs not yet started never start."""
        self.inner.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
