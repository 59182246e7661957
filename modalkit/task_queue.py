"""The original modalkit's import path for queue backends: everything here lives in :mod:`modalkit.queues`.

Example:
    >>> import asyncio
    >>> from modalkit.task_queue import MemoryBackend
    >>> backend = MemoryBackend()
    >>> asyncio.run(backend.send_message("results", '{"ok": true}'))
    True
    >>> backend.messages("results")
    ['{"ok": true}']
"""

from modalkit.queues import (
    S3_POINTER_CLASS,
    BackendFactory,
    BatchQueueBackend,
    InMemoryBackend,
    LocalQueueBackend,
    MemoryBackend,
    QueueBackend,
    QueueMessage,
    SQSBackend,
    as_message,
    check_queues,
    create_backend,
    deliver,
    deliver_sync,
    fifo_dedup_id,
    register_backend,
    resolve_message_body,
    send_response_queue,
)

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
    "fifo_dedup_id",
    "register_backend",
    "resolve_message_body",
    "send_response_queue",
]
