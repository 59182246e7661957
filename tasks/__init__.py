"""Prefect tasks: thin wrappers over modalkit's batch engine (the logic lives in ``modalkit.batch``)."""

from __future__ import annotations

from typing import Any

from modalkit.exceptions import is_retryable


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only errors a later attempt may not see (S3/SQS/worker outages)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:
        return False
    return isinstance(exc, BaseException) and is_retryable(exc)
