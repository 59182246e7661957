"""The original modalkit's queue module: everything in :mod:`modalkit.queues`, its helper and its example backends.

``from modalkit.task_queue import SQSBackend, create_backend, send_response_queue`` keeps working; new code may
import the backends from ``modalkit.queues``. :func:`send_response_queue` lives here, where the original had it,
and builds its backend with this module's ``create_backend``. :class:`TaskIQExample` and
:class:`CustomRedisExample` are the original's examples of backends of your own; they import taskiq or redis only
when built, so importing this module needs neither.

Example:
    >>> import asyncio
    >>> from modalkit.task_queue import MemoryBackend
    >>> asyncio.run(MemoryBackend().send_message("results", '{"ok": true}'))
    True
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

from modalkit import queues
from modalkit.exceptions import DependencyError, QueueError
from modalkit.queues import *  # noqa: F403 - the seed's path re-exports the package as it is
from modalkit.queues import as_message, create_backend, deliver

__all__ = [*queues.__all__, "CustomRedisExample", "TaskIQExample", "send_response_queue"]

log = logging.getLogger(__name__)


def send_response_queue(queue_name: str, queue_message: str) -> bool:
    """Send one message through the backend the settings configure (the original modalkit's helper).

    Loads the settings the usual way (``MODALKIT_CONFIG`` or ``./modalkit.yaml``). Prefer injecting a backend; this
    builds one per call.

    Returns:
        True: the message was sent. Unlike the original, a failure raises instead of returning False.

    Raises:
        TypeValidationError: ``queue_message`` is not a string.
        QueueError: the message could not be sent, or ``queue_config.backend`` is ``none``.
    """
    as_message(queue_message, queue_name)
    from modalkit.settings import Settings

    backend = create_backend(Settings.load().app_settings.queue_config)
    if backend is None:
        raise QueueError(f"cannot send to queue {queue_name!r}: app_settings.queue_config.backend is 'none'")
    asyncio.run(deliver(backend, queue_name, [queue_message]))
    return True


def _require(module: str, example: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(f"{example} needs {install.split()[0]}: pip install {install}") from exc


class TaskIQExample:
    """A backend that hands each message to a TaskIQ task (the original modalkit's example; copy and adapt it).

    Args:
        broker_url: ``redis://...`` for taskiq-redis's ``AsyncRedisTaskiqBroker``; anything else, taskiq's
            ``InMemoryBroker``.

    Raises:
        DependencyError: taskiq (or, for a ``redis://`` URL, taskiq-redis) is not installed.
    """

    def __init__(self, broker_url: str = "redis://localhost:6379") -> None:
        taskiq = _require("taskiq", "TaskIQExample", "taskiq")
        if broker_url.startswith("redis://"):
            taskiq_redis = _require("taskiq_redis", "TaskIQExample", "taskiq-redis")
            self.broker = taskiq_redis.AsyncRedisTaskiqBroker(broker_url)
        else:
            self.broker = taskiq.InMemoryBroker()
        self._tasks: dict[str, Any] = {}

    def _task(self, queue_name: str) -> Any:
        task = self._tasks.get(queue_name)
        if task is None:

            async def process_message(message: str) -> None:
                log.info("TaskIQ processing a message of queue %s", queue_name)

            task = self.broker.task(task_name=f"process_{queue_name}")(process_message)
            self._tasks[queue_name] = task
        return task

    async def send_message(self, queue_name: str, message: str) -> bool:
        """Send ``message`` as a task of ``process_<queue_name>``; False when the broker refused it."""
        try:
            await self._task(queue_name).kiq(message)
        except Exception:
            log.exception("TaskIQ did not take a message for queue %s", queue_name)
            return False
        return True


class CustomRedisExample:
    """A backend that pushes each message onto a Redis list named after the queue (the original's example).

    Args:
        redis_url: The Redis server (the client connects on first use).
        client: A ``redis.asyncio``-compatible client to use instead of one for ``redis_url``.

    Raises:
        DependencyError: ``client`` is not given and the redis package is not installed.
    """

    def __init__(self, redis_url: str = "redis://localhost:6379", *, client: Any = None, **kwargs: Any) -> None:
        if client is None:
            client = _require("redis.asyncio", "CustomRedisExample", "redis").from_url(redis_url, **kwargs)
        self.redis = client

    async def send_message(self, queue_name: str, message: str) -> bool:
        """``LPUSH`` ``message`` onto the list ``queue_name``; False when Redis refused it."""
        try:
            await self.redis.lpush(queue_name, message)
        except Exception:
            log.exception("Redis did not take a message for queue %s", queue_name)
            return False
        return True
