"""Lanes: a job's chunks pulled from one shared queue by a fixed number of long-lived lanes, each chunk retried.

The orchestrator runs ``concurrency`` lanes (the batch flow: one Prefect task run each), so what it tracks grows
with the concurrency, not with the number of chunks. Each lane takes the next chunk (dispatch order: largest
first), runs it on the job's runner, retries it on transient errors only (:func:`modalkit.exceptions.is_retryable`;
a straggler stopped by its deadline is one) with exponential backoff, and puts every chunk's outcome on
:attr:`ChunkLanes.outcomes` for one reader (the flow's thread) to count. A retry is of the chunk, never of the lane.

Once a chunk has failed for good no lane starts another (those in flight finish, retries included), and the lane
that met it raises :class:`ChunkFailed` as it ends. :meth:`ChunkLanes.stop` (an interrupt, a lost lease) ends
every lane after the chunk it is on, without retrying it; so does a lost lease (no lane starts a chunk once the
run's :class:`~modalkit.batch.lease.JobLease` is lost; the flow raises :class:`~modalkit.batch.lease.LeaseLost`).

Example:
    >>> import logging
    >>> class Doubling:
    ...     slots = 1
    ...     def run_chunk(self, job, chunk):
    ...         return chunk * 2
    >>> lanes = ChunkLanes(Doubling(), job=None, chunks=[3, 1], retries=0, retry_delay_s=0.0)
    >>> lanes.run_lane(logging.getLogger("lane"))
    2
    >>> [lanes.outcomes.get() for _ in range(3)]
    [(3, 6), (1, 2), None]
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

from modalkit.batch.lease import JobLease
from modalkit.exceptions import ModalkitError, is_retryable
from modalkit.iomodel import ChunkResult, ChunkSpec, JobSpec
from modalkit.runners.base import ChunkRunner

__all__ = ["ChunkFailed", "ChunkLanes"]

Logger = logging.Logger | logging.LoggerAdapter[Any]


class ChunkFailed(ModalkitError):
    """A chunk failed after its attempts; raised by the lane that ran it, as that lane ends.

    Attributes:
        index: The chunk's index.
    """

    def __init__(self, message: str, *, index: int, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.index = index


class ChunkLanes:
    """A job's chunks, shared by its lanes; thread-safe.

    Args:
        runner: Where the chunks run.
        job: The job they belong to.
        chunks: The chunks to run, in the order to hand them out (:func:`modalkit.batch.job.dispatch_order`).
        retries: Retries of a chunk after a transient error (``job_config.chunk_retries``).
        retry_delay_s: The first retry's delay; each next one doubles it (``job_config.retry_delay_seconds``).
        lease: The run's lease on the job, if any: once it is lost, no lane starts another chunk.

    Attributes:
        outcomes: ``(chunk, ChunkResult or the exception it failed with)``, one per chunk a lane finished, and
            ``None`` each time a lane ends (after its last chunk's outcome).
    """

    def __init__(
        self,
        runner: ChunkRunner,
        job: JobSpec,
        chunks: Iterable[ChunkSpec],
        retries: int,
        retry_delay_s: float,
        lease: JobLease | None = None,
    ) -> None:
        self.runner, self.job = runner, job
        self.retries, self.retry_delay_s = retries, retry_delay_s
        self.lease = lease
        self.outcomes: queue.Queue[tuple[ChunkSpec, ChunkResult | BaseException] | None] = queue.Queue()
        self._pending = collections.deque(chunks)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._failed = False

    def stop(self) -> None:
        """End every lane after the chunk it is on: no new chunk, no retry (an interrupt, a lost lease)."""
        self._stopped.set()

    def not_started(self) -> list[ChunkSpec]:
        """The chunks no lane took (a chunk failed for good, or the lanes were stopped)."""
        with self._lock:
            return list(self._pending)

    def run_lane(self, logger: Logger) -> int:
        """Run chunks until none is left (or the lanes stop); returns how many this lane finished.

        Raises:
            ChunkFailed: A chunk of this lane failed after its attempts (after its outcome was reported).
        """
        finished = 0
        try:
            while (chunk := self._take()) is not None:
                outcome, attempts = self._attempt(chunk, logger)
                finished += 1
                if isinstance(outcome, BaseException) and not self._stopped.is_set():
                    with self._lock:
                        self._failed = True  # no lane starts another chunk; those in flight finish
                    plural = "s" if attempts > 1 else ""
                    message = (
                        f"chunk {chunk.index:05d} ({chunk.key}) failed after {attempts} attempt{plural}: {outcome}"
                    )
                    logger.error("%s", message)
                    self.outcomes.put((chunk, outcome))
                    raise ChunkFailed(message, index=chunk.index, retryable=is_retryable(outcome)) from outcome
                self.outcomes.put((chunk, outcome))
            return finished
        finally:
            self.outcomes.put(None)

    def _take(self) -> ChunkSpec | None:
        with self._lock:
            lost = self.lease is not None and self.lease.lost
            if self._failed or lost or self._stopped.is_set() or not self._pending:
                return None
            return self._pending.popleft()

    def _attempt(self, chunk: ChunkSpec, logger: Logger) -> tuple[ChunkResult | BaseException, int]:
        """The chunk's result, or the error of its last attempt; and how many attempts it took."""
        attempt = 1
        while True:
            try:
                return self.runner.run_chunk(self.job, chunk), attempt
            except Exception as exc:
                if attempt > self.retries or not is_retryable(exc) or self._stopped.is_set():
                    return exc, attempt
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                logger.warning(
                    "chunk %05d attempt %d/%d in %.1f s: %s", chunk.index, attempt + 1, 1 + self.retries, delay, exc
                )
                if self._stopped.wait(delay):
                    return exc, attempt
                attempt += 1
