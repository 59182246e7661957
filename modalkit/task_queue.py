"""The original modalkit's import path for queue backends: everything here is :mod:`modalkit.queues`.

``from modalkit.task_queue import SQSBackend, create_backend, send_response_queue`` keeps working; new code may
import from ``modalkit.queues``.
"""

from modalkit import queues
from modalkit.queues import *  # noqa: F403 - the seed's path re-exports the package as it is

__all__ = list(queues.__all__)
