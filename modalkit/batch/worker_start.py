"""Who a chunk worker is and what its start cost: its id, and the seconds from its process's start to its pipeline
loaded (cold start, then model load), reported once, with its first chunk, for the job's cost accounting.

Example:
    >>> start = WorkerStart.measure(lambda: "pipeline")
    >>> start.value, start.model_load_seconds >= 0, start.cold_start_seconds >= 0
    ('pipeline', True, True)
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["WorkerStart", "process_started_at", "worker_id"]

T = TypeVar("T")


def worker_id() -> str:
    """This worker's name: the Modal task's id in a Modal container, else ``host:pid``."""
    return os.environ.get("MODAL_TASK_ID") or f"{socket.gethostname()}:{os.getpid()}"


def process_started_at() -> float | None:
    """When this process started (seconds since the epoch, to 10 ms), from ``/proc``; None where it does not say."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            after_name = fh.read().rsplit(")", 1)[1].split()
        since_boot = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


@dataclass(frozen=True)
class WorkerStart(Generic[T]):
    """What a worker's start took: ``cold_start_seconds`` (process start to the load's beginning: the interpreter,
    imports, settings), ``model_load_seconds`` (the load itself), ``ready_at`` (when it ended, seconds since the
    epoch), and what the load returned."""

    value: T
    cold_start_seconds: float
    model_load_seconds: float
    ready_at: float

    @classmethod
    def measure(cls, load: Callable[[], T]) -> WorkerStart[T]:
        """Run ``load`` (the pipeline's load) and time it, with the seconds since this process started."""
        began = time.time()
        value = load()
        loaded = time.time()
        started = process_started_at()
        # /proc counts in clock ticks (10 ms) and a boot time in whole seconds: never below 0
        cold = max(0.0, began - started) if started is not None else 0.0
        return cls(value, round(cold, 3), round(loaded - began, 3), round(loaded, 3))
