"""The online core both ``modalkit serve`` and the Modal class run: a batch of requests through the isolated runner,
one broken-device policy, one mapping of outcomes to HTTP statuses, and the async result record.

* **Isolation**: each request gets its own outcome (:func:`~modalkit.inference_pipeline.run_isolated`): a record the
  pipeline fails on fails alone, with its ``stage``, ``error_type`` and message: **422**, the record's own fault
  (as is a body that fails the input model or is not JSON).
* **Infrastructure**: an error no record causes (a lost connection, a timeout, a retryable modalkit error) fails
  every request of the batch with it: **503** with ``Retry-After``, for the client to try again. Any other error no
  record causes (out of memory, a pipeline that breaks its contract) is **500**.
* **A broken device** (a CUDA error, a lost GPU: :func:`~modalkit.inference_pipeline.is_device_failure`) fails every
  request of the batch, **503** with ``Retry-After``, and calls ``on_broken_device``: on Modal that replaces the
  container; ``modalkit serve`` turns unhealthy (``/health`` 503) and answers every later request 503.
* **Async results**: an async request's result goes to its success or failure queue. Its ``record_id`` is
  ``meta["record_id"]`` when the request gives one, else the job id (the id ``POST /predict_async`` answered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import PrivateAttr

from modalkit.exceptions import DeviceError, is_retryable
from modalkit.inference_pipeline import (
    FailedOutput,
    InferencePipeline,
    RecordError,
    StageClock,
    as_output,
    async_result,
    run_isolated,
)
from modalkit.iomodel import AsyncInputModel, ErrorBody, InferenceOutputModel

__all__ = [
    "RETRY_AFTER_S",
    "DeviceBroken",
    "UnavailableOutput",
    "UnknownJob",
    "async_record",
    "error_body",
    "http_status",
    "run_requests",
]

log = logging.getLogger(__name__)

#: ``Retry-After`` (seconds) of a 503 for an infrastructure fault or a broken device.
RETRY_AFTER_S = 1


class DeviceBroken(Exception):
    """``modalkit serve`` lost its device: it answers 503 to every request until it is restarted."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the server's device is broken ({cause}); restart it or send the request elsewhere")


class UnknownJob(Exception):
    """``GET /jobs/{id}`` for an id the server never issued (404)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class UnavailableOutput(FailedOutput):
    """The output of a request that failed for a reason no record causes: ``status_code`` is 503 (retry) or 500."""

    _status_code: int = PrivateAttr(default=503)

    @classmethod
    def of_fault(cls, failure: RecordError, status_code: int) -> UnavailableOutput:
        output = cls(status="error", error=f"{failure.stage}: {failure.error_type}: {failure.error}")
        output._failure = failure
        output._status_code = status_code
        return output

    @property
    def status_code(self) -> int:
        return self._status_code


def run_requests(
    pipeline: InferencePipeline,
    records: Sequence[Any],
    on_broken_device: Callable[[DeviceError], None] | None = None,
    clock: StageClock | None = None,
) -> list[InferenceOutputModel]:
    """One output per record, in order: its result, or an error output saying whose fault it was.

    Never raises for what the pipeline does: a broken device calls ``on_broken_device`` and fails every record with
    a 503 output; another error no record caused fails every record with a 503 (retryable) or 500 output. With a
    ``clock``, the pipeline's stages are timed by it (the device's busy seconds, for ``/metrics``).
    """
    try:
        outcomes = run_isolated(pipeline, records, clock)
    except DeviceError as exc:
        log.error("the device is broken; failing %d requests: %s", len(records), exc)
        cause = exc.__cause__ or exc
        broken = UnavailableOutput.of_fault(RecordError(exc.stage, type(cause).__name__, str(exc)), 503)
        if on_broken_device is not None:
            on_broken_device(exc)
        return [broken.model_copy() for _ in records]
    except Exception as exc:  # no record caused it: each request says so
        log.error("a batch of %d requests failed: %s: %s", len(records), type(exc).__name__, exc)
        fault = UnavailableOutput.of_fault(
            RecordError.from_exception("predict", exc), 503 if is_retryable(exc) else 500
        )
        return [fault.model_copy() for _ in records]
    return [as_output(outcome) for outcome in outcomes]


def http_status(output: InferenceOutputModel) -> tuple[int, dict[str, str] | None]:
    """The HTTP status (and headers) of one request's output: 200, 422 (the record's fault), 503 (with
    ``Retry-After``) or 500 (no record's fault)."""
    if output.status != "error":
        return 200, None
    if isinstance(output, UnavailableOutput):
        code = output.status_code
        return code, {"Retry-After": str(RETRY_AFTER_S)} if code == 503 else None
    return 422, None


def error_body(output: InferenceOutputModel) -> dict[str, Any]:
    """The :class:`~modalkit.iomodel.ErrorBody` of a failed output (``stage``, ``error_type``, ``error``)."""
    failure = output.failure if isinstance(output, FailedOutput) else None
    if failure is None:
        body = ErrorBody(error_type="PipelineError", error=output.error or "the request failed")
    else:
        body = ErrorBody(stage=failure.stage, error_type=failure.error_type, error=failure.error)
    return body.model_dump(mode="json")


def async_record(job_id: str, output: InferenceOutputModel, request: AsyncInputModel[Any]) -> tuple[str | None, Any]:
    """Where an async request's result goes and the record it sends: ``(queue, body)``, the queue None when the
    request names none. The record id is ``meta["record_id"]`` when given (a string or an integer as given; any
    other value as its text), else ``job_id``."""
    record_id = request.meta.get("record_id", job_id)
    if not isinstance(record_id, str | int) or isinstance(record_id, bool):
        record_id = str(record_id)
    return async_result(job_id, record_id, output, request)
