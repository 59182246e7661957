"""The queue protocol, the message type, and sending through any backend.

:class:`QueueBackend` is the original modalkit's protocol: one async ``send_message`` that returns True when the
message was accepted. Any object with that method is a backend (TaskIQ, Kafka, Redis...). modalkit's own backends
derive from :class:`BatchQueueBackend`, which adds a synchronous batch send that *raises*
:class:`~modalkit.exceptions.QueueError` instead of returning False (so a lost message can never go unnoticed) and
:meth:`~BatchQueueBackend.check_queues`, which the batch engine calls before a job writes anything.

Producers hand a backend whole bodies, whatever their size; what a body too large for a queue becomes is the
backend's policy (the local and memory backends take any size; the SQS backend's is in :mod:`modalkit.queues.sqs`;
a backend of your own gets every body whole and applies its own).

Example:
    >>> import asyncio
    >>> from modalkit.queues import MemoryBackend
    >>> backend = MemoryBackend()
    >>> asyncio.run(backend.send_message("results", '{"ok": true}'))
    True
    >>> backend.messages("results")
    ['{"ok": true}']
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from modalkit.exceptions import QueueError, TypeValidationError

__all__ = [
    "BatchQueueBackend",
    "QueueBackend",
    "QueueMessage",
    "as_message",
    "check_queues",
    "deliver",
    "deliver_sync",
    "describe_target",
]


@runtime_checkable
class QueueBackend(Protocol):
    """Protocol for queue backends: implement it to send records anywhere.

    ``send_message`` returns True when the message was accepted. modalkit treats False as a failure and raises
    :class:`~modalkit.exceptions.QueueError`.
    """

    async def send_message(self, queue_name: str, message: str) -> bool:
        """Send ``message`` (a JSON string) to ``queue_name``; True when accepted."""
        ...


@dataclass(frozen=True, slots=True)
class QueueMessage:
    """A message body with optional FIFO ids.

    Attributes:
        body: The JSON string.
        dedup_id: Deduplication id: for batch records ``<job_id>:<file key>:<position>``, naming the input record
            (:func:`modalkit.batch.queueing.dedup_id`). The local and memory backends store a dedup id once per
            queue; the SQS backend sends it as the ``MessageDeduplicationId`` of a FIFO queue and as the
            ``dedup_id`` message attribute on every queue.
        group_id: FIFO ``MessageGroupId``; defaults to the backend's.
    """

    body: str
    dedup_id: str | None = None
    group_id: str | None = None


def as_message(item: object, queue_name: str) -> QueueMessage:
    """``item`` as a :class:`QueueMessage`; a body that is not a string is a non-retryable error naming the queue.

    Raises:
        TypeValidationError: the body is not a ``str`` (serialise it first: ``json.dumps``, ``model_dump_json``).
    """
    message = item if isinstance(item, QueueMessage) else QueueMessage(item)  # type: ignore[arg-type]
    if not isinstance(message.body, str):
        raise TypeValidationError(  # the original modalkit's words first
            f"Expected string, got {type(message.body).__name__}: a message for queue {queue_name!r} must be a JSON "
            "string; serialise it first (json.dumps(...) or model.model_dump_json())"
        )
    return message


class BatchQueueBackend(ABC):
    """Base of modalkit's backends: a synchronous batch send that raises, and the async protocol on top."""

    @abstractmethod
    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        """Send every message or raise :class:`QueueError`; returns how many were sent."""

    def check_queues(self, queue_names: Sequence[str]) -> None:
        """Raise :class:`QueueError` naming a queue that does not exist; the default checks nothing.

        Backends whose queues come into being on first send (local, memory) keep the default.
        """
        return

    async def send_messages(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        """Async form of :meth:`send_batch` (runs in a thread: sending blocks on I/O)."""
        return await asyncio.to_thread(self.send_batch, queue_name, list(messages))

    async def send_message(self, queue_name: str, message: str) -> bool:
        """Send one message; True when sent (failures raise :class:`QueueError`)."""
        await self.send_messages(queue_name, [message])
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    def location(self) -> str:
        """Where this backend keeps records, for a user to find them (a file, an endpoint)."""
        return type(self).__name__

    def address(self, queue_name: str) -> str:
        """Where ``queue_name`` is within :meth:`location` (its name; on SQS its URL)."""
        return queue_name


def check_queues(backend: QueueBackend, queue_names: Sequence[str]) -> None:
    """Ask ``backend`` whether ``queue_names`` exist (backends that cannot tell are taken at their word).

    Raises:
        QueueError: a queue does not exist.
    """
    check = getattr(backend, "check_queues", None)
    if callable(check):
        check(list(queue_names))


def describe_target(backend: QueueBackend, queue_name: str) -> tuple[str, str]:
    """``(location, address)`` of ``queue_name`` on ``backend``; a backend of another kind is named by its class."""
    if isinstance(backend, BatchQueueBackend):
        return backend.location(), backend.address(queue_name)
    return type(backend).__name__, queue_name


def deliver_sync(backend: QueueBackend, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
    """Send ``messages`` through any backend from synchronous code; raises :class:`QueueError` on any failure."""
    if not messages:
        return 0
    if isinstance(backend, BatchQueueBackend):
        return backend.send_batch(queue_name, messages)
    return asyncio.run(deliver(backend, queue_name, messages))


async def deliver(backend: QueueBackend, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
    """Send ``messages`` through any backend; raises :class:`QueueError` if one is refused or fails."""
    if isinstance(backend, BatchQueueBackend):
        return await backend.send_messages(queue_name, messages)
    for item in messages:
        body = as_message(item, queue_name).body
        try:
            ok = await backend.send_message(queue_name, body)
        except QueueError:
            raise
        except Exception as exc:
            raise QueueError(f"{type(backend).__name__} failed to send to queue {queue_name!r}: {exc}") from exc
        if not ok:
            raise QueueError(f"{type(backend).__name__} refused a message for queue {queue_name!r}")
    return len(messages)
