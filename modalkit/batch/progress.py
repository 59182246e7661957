"""Progress of a running batch job, for whoever watches in this process (the CLI's progress bar).

The flow reports each finished chunk here (and to its Prefect progress artifact); listeners are plain callables,
registered for the duration of a ``with listening(fn):`` block.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["JobProgress", "listening", "report"]

log = logging.getLogger(__name__)
_listeners: list[Callable[[JobProgress], None]] = []
_lock = threading.Lock()


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands: chunks and bytes done of the total, and records so far."""

    job_id: str
    chunks_done: int
    chunks_total: int
    bytes_done: int
    bytes_total: int
    records: int
    failed: int

    @property
    def percent(self) -> float:
        """Progress in percent, by input bytes."""
        return 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 100.0


@contextlib.contextmanager
def listening(listener: Callable[[JobProgress], None]) -> Iterator[None]:
    """Call ``listener`` with every progress report made inside the block."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def report(progress: JobProgress) -> None:
    """Tell every listener; a failing listener is logged, never allowed to break the job."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(progress)
        except Exception:
            log.exception("progress listener failed")
