"""Stragglers: how long one attempt of a chunk may run before it is stopped and retried.

``job_config.chunk_timeout_s`` when set; otherwise adaptive: no limit until :data:`ADAPTIVE_AFTER` chunks have
finished, then :data:`ADAPTIVE_FACTOR` times their median wall time, never under :data:`ADAPTIVE_FLOOR_S`. Chunks
are cut to about the same size, so one that runs ten times longer than the median is stuck, not slow; the floor
keeps a model's warm-up, a Modal cold start or a short job's noise from ever looking like a hang. A runner waits on
an attempt through :meth:`ChunkDeadline.wait`; past the limit it stops the attempt (kills the local worker, cancels
the Modal call) and raises :class:`ChunkTimedOut`, a transient error the flow retries with its per-chunk retries.

Example:
    >>> deadline = ChunkDeadline(None)
    >>> for wall in (3.0, 4.0, 5.0, 6.0, 7.0):
    ...     deadline.finished(wall)
    >>> deadline.limit()
    600.0
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from modalkit.exceptions import RemoteError
from modalkit.iomodel import ChunkSpec

__all__ = ["ADAPTIVE_AFTER", "ADAPTIVE_FACTOR", "ADAPTIVE_FLOOR_S", "ChunkDeadline", "ChunkTimedOut"]

#: Chunks that must have finished before the adaptive limit applies.
ADAPTIVE_AFTER = 5
#: The adaptive limit, in median chunk walls.
ADAPTIVE_FACTOR = 10.0
#: The adaptive limit is never shorter than this (seconds).
ADAPTIVE_FLOOR_S = 600.0
#: How often a wait under the adaptive policy looks again at the limit (it appears, and moves, as chunks finish).
RECHECK_S = 5.0

T = TypeVar("T")


class ChunkTimedOut(RemoteError):
    """An attempt of a chunk ran past its time limit and was stopped; retryable (a straggler, not a bad chunk)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class ChunkDeadline:
    """The time limit of a chunk attempt, fixed or learnt from the walls of the chunks that finished.

    Args:
        timeout_s: ``job_config.chunk_timeout_s``; None for the adaptive limit.
        after: Finished chunks before the adaptive limit applies.
        factor: The adaptive limit in median walls.
        floor_s: The adaptive limit's lower bound.

    Thread-safe: a runner's threads share one.
    """

    def __init__(
        self,
        timeout_s: float | None,
        after: int = ADAPTIVE_AFTER,
        factor: float = ADAPTIVE_FACTOR,
        floor_s: float = ADAPTIVE_FLOOR_S,
    ) -> None:
        self.timeout_s = timeout_s
        self.after, self.factor, self.floor_s = after, factor, floor_s
        self._walls: list[float] = []
        self._lock = threading.Lock()

    def finished(self, wall: float) -> None:
        """Count the wall time (seconds) of an attempt that finished."""
        with self._lock:
            self._walls.append(wall)

    def limit(self) -> float | None:
        """Seconds an attempt may run now; None: no limit (adaptive, too few chunks finished yet)."""
        if self.timeout_s is not None:
            return self.timeout_s
        with self._lock:
            if len(self._walls) < self.after:
                return None
            median = statistics.median(self._walls)
        return max(self.floor_s, self.factor * median)

    def wait(self, poll: Callable[[float], T], started: Callable[[], float | None], chunk: ChunkSpec) -> T:
        """Wait for an attempt: ``poll(seconds)`` returns its result, or raises ``TimeoutError`` when it is not done
        within ``seconds``; ``started()`` is when it began running (``time.time()``), None while it waits for a
        worker. Its wall counts towards the adaptive limit.

        Raises:
            ChunkTimedOut: it ran past the limit; the caller stops it.
        """
        while True:
            began, limit = started(), self.limit()
            ran = 0.0 if began is None else max(0.0, time.time() - began)
            if limit is not None and began is not None and ran >= limit:
                raise ChunkTimedOut(self.explain(chunk, limit))
            step = RECHECK_S if limit is None else limit - ran
            if self.timeout_s is None or began is None:
                step = min(step, RECHECK_S)  # the limit, or the start, may come while we wait
            try:
                result = poll(step)
            except TimeoutError:
                continue
            if began is not None or (began := started()) is not None:
                self.finished(max(0.0, time.time() - began))
            return result

    def explain(self, chunk: ChunkSpec, limit: float) -> str:
        """The one line a timed-out attempt reports: the chunk, the limit, where it came from, what to change."""
        if self.timeout_s is not None:
            why = "app_settings.job_config.chunk_timeout_s"
        else:
            why = (f"adaptive: {self.factor:g}x the median wall of the chunks finished, at least {self.floor_s:g} s; "
                   "set app_settings.job_config.chunk_timeout_s")  # fmt: skip
        return (f"chunk {chunk.index} ({chunk.key}) ran past its time limit of {limit:g} s ({why}) and was stopped; "
                "it is retried on another worker (raise the limit if the chunk is only slow)")  # fmt: skip
