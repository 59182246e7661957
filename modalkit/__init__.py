"""modalkit: one InferencePipeline, served as Prefect batch jobs over S3 datasets and as HTTP endpoints on Modal.

Importing modalkit reads no configuration and touches no network; the heavier parts (Modal, boto3) load on
first use of the names that need them.

Example:
    >>> import modalkit
    >>> settings = modalkit.Settings.load(data={"app_settings": {"app_prefix": "demo"}})
    >>> settings.app_settings.app_prefix
    'demo'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it; loaded on first access so `import modalkit` stays fast
_EXPORTS = {
    "InferencePipeline": "modalkit.inference_pipeline",
    "RecordError": "modalkit.inference_pipeline",
    "load_pipeline": "modalkit.inference_pipeline",
    "run_isolated": "modalkit.inference_pipeline",
    "Settings": "modalkit.settings",
    "ModalConfig": "modalkit.modal_config",
    "ModalService": "modalkit.modal_service",
    "AsyncInputModel": "modalkit.iomodel",
    "AsyncOutputModel": "modalkit.iomodel",
    "ChunkResult": "modalkit.iomodel",
    "ChunkSpec": "modalkit.iomodel",
    "DelayedFailureOutputModel": "modalkit.iomodel",
    "FailureRecord": "modalkit.iomodel",
    "InferenceOutputModel": "modalkit.iomodel",
    "JobStatus": "modalkit.iomodel",
    "JobSummary": "modalkit.iomodel",
    "SuccessRecord": "modalkit.iomodel",
    "SyncInputModel": "modalkit.iomodel",
    "QueueBackend": "modalkit.task_queue",
    "QueueMessage": "modalkit.task_queue",
    "SQSBackend": "modalkit.task_queue",
    "LocalQueueBackend": "modalkit.task_queue",
    "MemoryBackend": "modalkit.task_queue",
    "InMemoryBackend": "modalkit.task_queue",
    "register_backend": "modalkit.task_queue",
    "ModalkitError": "modalkit.exceptions",
    "ConfigError": "modalkit.exceptions",
    "PipelineError": "modalkit.exceptions",
    "StorageError": "modalkit.exceptions",
    "QueueError": "modalkit.exceptions",
    "RemoteError": "modalkit.exceptions",
    "AuthError": "modalkit.exceptions",
}

__all__ = [
    "AsyncInputModel",
    "AsyncOutputModel",
    "AuthError",
    "ChunkResult",
    "ChunkSpec",
    "ConfigError",
    "DelayedFailureOutputModel",
    "FailureRecord",
    "InMemoryBackend",
    "InferenceOutputModel",
    "InferencePipeline",
    "JobStatus",
    "JobSummary",
    "LocalQueueBackend",
    "MemoryBackend",
    "ModalConfig",
    "ModalService",
    "ModalkitError",
    "PipelineError",
    "QueueBackend",
    "QueueError",
    "QueueMessage",
    "RecordError",
    "RemoteError",
    "SQSBackend",
    "Settings",
    "StorageError",
    "SuccessRecord",
    "SyncInputModel",
    "load_pipeline",
    "register_backend",
    "run_isolated",
]

if TYPE_CHECKING:
    from modalkit.exceptions import (
        AuthError,
        ConfigError,
        ModalkitError,
        PipelineError,
        QueueError,
        RemoteError,
        StorageError,
    )
    from modalkit.inference_pipeline import InferencePipeline, RecordError, load_pipeline, run_isolated
    from modalkit.iomodel import (
        AsyncInputModel,
        AsyncOutputModel,
        ChunkResult,
        ChunkSpec,
        DelayedFailureOutputModel,
        FailureRecord,
        InferenceOutputModel,
        JobStatus,
        JobSummary,
        SuccessRecord,
        SyncInputModel,
    )
    from modalkit.modal_config import ModalConfig
    from modalkit.modal_service import ModalService
    from modalkit.settings import Settings
    from modalkit.task_queue import (
        InMemoryBackend,
        LocalQueueBackend,
        MemoryBackend,
        QueueBackend,
        QueueMessage,
        SQSBackend,
        register_backend,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modalkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
