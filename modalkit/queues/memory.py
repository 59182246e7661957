"""The memory backend: messages kept in this process, per queue. For tests and examples."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import ClassVar

from modalkit.queues.base import BatchQueueBackend, QueueMessage, as_message

__all__ = ["InMemoryBackend", "MemoryBackend"]


class MemoryBackend(BatchQueueBackend):
    """Keeps messages in memory, per queue; inspect them with :meth:`messages`.

    A message with a ``dedup_id`` already seen on its queue is dropped, as the local backend does; a body of any
    size is kept whole.
    """

    _shared: ClassVar[MemoryBackend | None] = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, list[str]] = {}
        self._seen: dict[str, set[str]] = {}

    @classmethod
    def shared(cls) -> MemoryBackend:
        """The process-wide instance that ``queue_config.backend: memory`` uses."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        batch = [as_message(item, queue_name) for item in messages]  # all or nothing: check every body first
        with self._lock:
            stored = self._queues.setdefault(queue_name, [])
            seen = self._seen.setdefault(queue_name, set())
            for msg in batch:
                if msg.dedup_id is not None:
                    if msg.dedup_id in seen:
                        continue
                    seen.add(msg.dedup_id)
                stored.append(msg.body)
        return len(batch)

    def messages(self, queue_name: str) -> list[str]:
        """The bodies sent to ``queue_name``, oldest first."""
        with self._lock:
            return list(self._queues.get(queue_name, []))

    def queues(self) -> list[str]:
        """Names of the queues that received messages."""
        with self._lock:
            return sorted(self._queues)

    def location(self) -> str:
        """This process's memory (the records go when it exits)."""
        return f"the memory of process {os.getpid()}"

    def clear(self) -> None:
        """Drop every message."""
        with self._lock:
            self._queues.clear()
            self._seen.clear()


InMemoryBackend = MemoryBackend  # the original modalkit's name
