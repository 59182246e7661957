"""Queue backends for success and failure records: the protocol, the built-in backends and the registry.

* :mod:`~modalkit.queues.base`: :class:`QueueBackend` (the protocol any backend implements), :class:`QueueMessage`,
  :class:`BatchQueueBackend` (modalkit's backends: a batch send that raises), :func:`deliver`.
* :mod:`~modalkit.queues.local`: :class:`LocalQueueBackend`, durable SQLite queues, the embedded default.
* :mod:`~modalkit.queues.sqs`: :class:`SQSBackend`, Amazon SQS.
* :mod:`~modalkit.queues.memory`: :class:`MemoryBackend`, in memory, for tests and examples.
* :mod:`~modalkit.queues.registry`: :func:`create_backend`, :func:`register_backend`.

``modalkit.task_queue`` re-exports all of this under the original modalkit's import path, beside the original's
``send_response_queue`` and example backends.
"""

from modalkit.queues.base import (
    BatchQueueBackend,
    QueueBackend,
    QueueMessage,
    as_message,
    check_queues,
    deliver,
    deliver_sync,
    describe_target,
)
from modalkit.queues.local import LocalQueueBackend
from modalkit.queues.memory import InMemoryBackend, MemoryBackend
from modalkit.queues.registry import BackendFactory, create_backend, register_backend
from modalkit.queues.sqs import S3_POINTER_CLASS, SQSBackend, fifo_dedup_id, resolve_message_body

__all__ = [
    "S3_POINTER_CLASS",
    "BackendFactory",
    "BatchQueueBackend",
    "InMemoryBackend",
    "LocalQueueBackend",
    "MemoryBackend",
    "QueueBackend",
    "QueueMessage",
    "SQSBackend",
    "as_message",
    "check_queues",
    "create_backend",
    "deliver",
    "deliver_sync",
    "describe_target",
    "fifo_dedup_id",
    "register_backend",
    "resolve_message_body",
]
