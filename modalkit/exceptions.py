"""One error hierarchy for modalkit; third-party errors are translated where we call them.

Every error modalkit raises is a :class:`ModalkitError`. botocore, fsspec and Modal errors are caught at the
border (the ``*_errors`` context managers below) and re-raised as one of ours, with the original chained as
``__cause__``. ``retryable`` says whether the same call may succeed later (a dropped connection, throttling),
which is what the batch flow's retries key on.

Example:
    >>> from modalkit.exceptions import QueueError
    >>> try:
    ...     raise QueueError("queue 'results' does not exist", retryable=False)
    ... except QueueError as e:
    ...     e.retryable
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = [
    "AuthConfigError",
    "AuthError",
    "BackendError",
    "ConfigError",
    "DependencyError",
    "DeviceError",
    "JobFailed",
    "ModalkitError",
    "PipelineError",
    "QueueError",
    "RemoteError",
    "StorageError",
    "TypeValidationError",
    "is_retryable",
    "modal_errors",
    "queue_errors",
    "storage_errors",
]

# botocore error codes that a later attempt may not see again
_TRANSIENT_AWS_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMS.ThrottlingException",
        "500",
        "502",
        "503",
        "504",
    }
)


class ModalkitError(Exception):
    """Root of every error modalkit raises.

    Args:
        message: What went wrong, naming the field, file, record or queue involved.
        retryable: True when the same operation may succeed if tried again later.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self) -> tuple[object, ...]:
        # An error crosses process boundaries (the local worker pool, Modal, Prefect's stored results) with all of
        # its attributes (retryable, a subclass's own), whatever its constructor's signature: rebuilt from its
        # args without calling __init__, its attributes restored as state.
        return (_rebuild, (type(self), self.args), self.__dict__)


def _rebuild(cls: type[ModalkitError], args: tuple[Any, ...]) -> ModalkitError:
    return cls.__new__(cls, *args)


class ConfigError(ModalkitError):
    """Invalid or missing configuration: a bad key, a value out of bounds, an unknown model or file."""


class PipelineError(ModalkitError):
    """The user's InferencePipeline is incomplete or broke its contract (for example, wrong output count)."""


class StorageError(ModalkitError):
    """Reading or writing data (local files, S3) failed."""


class QueueError(ModalkitError):
    """Sending to a queue failed, or the queue does not exist."""


class RemoteError(ModalkitError):
    """A call to a remote worker (a deployed Modal function) failed."""


class AuthError(ModalkitError):
    """A request carried no credentials or the wrong ones, or the API key could not be fetched."""


class DeviceError(RemoteError):
    """The accelerator is broken (a CUDA error, a lost device): the batch cannot run here, on any record.

    Retryable: the same work succeeds on a fresh container or process, never on this one.
    """

    def __init__(self, message: str, *, retryable: bool = True, stage: str = "predict") -> None:
        super().__init__(message, retryable=retryable)
        self.stage = stage


class JobFailed(ModalkitError):
    """A batch job finished as failed: chunks failed after their retries, or too many records failed.

    Attributes:
        summary: The job's summary (also written to ``_manifest.json``), or None when the job never started.
    """

    def __init__(self, message: str, summary: dict[str, Any] | None = None, *, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.summary = summary


# --- the original modalkit's names: same builtin bases, now inside our hierarchy ---------------------------------


class AuthConfigError(ConfigError, ValueError):
    """Authentication is configured in a way that cannot work (the original modalkit's name)."""


class DependencyError(ConfigError, ImportError):
    """A library the configuration needs is not installed (the original modalkit's name)."""


class TypeValidationError(ModalkitError, TypeError):
    """A value has the wrong type, e.g. a queue message that is not a string (the original modalkit's name)."""


class BackendError(ConfigError, ValueError):
    """A queue backend is unknown or configured wrongly (the original modalkit's name)."""


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: our errors say so; connection-level errors are."""
    if isinstance(exc, ModalkitError):
        return exc.retryable
    return isinstance(exc, ConnectionError | TimeoutError)


def _aws_is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | HTTPClientError | ReadTimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code", "") in _TRANSIENT_AWS_CODES or int(status or 0) >= 500
    return False


def _describe(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', str(exc))}"
    cause = exc.__cause__
    if isinstance(cause, ClientError):  # s3fs turns AWS errors into OSErrors: the AWS code is in the cause
        return _describe(cause)
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _is_aws_or_io_error(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError | OSError)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Translate botocore, fsspec and OS errors raised inside the block into :class:`StorageError`.

    Args:
        what: What the block does, with the path, e.g. ``"reading s3://bucket/key"``.
    """
    try:
        yield
    except ModalkitError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"{what}: not found ({_describe(exc)})", retryable=False) from exc
    except PermissionError as exc:
        raise StorageError(f"{what}: permission denied ({_describe(exc)})", retryable=False) from exc
    except Exception as exc:
        if not _is_aws_or_io_error(exc) and not _is_aiohttp_error(exc):
            raise
        raise StorageError(
            f"{what}: {_describe(exc)}", retryable=_aws_is_transient(exc) or _is_aiohttp_error(exc)
        ) from exc


def _is_aiohttp_error(exc: BaseException) -> bool:
    # s3fs talks to S3 through aiobotocore/aiohttp; a dropped endpoint surfaces as aiohttp's errors
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - s3fs always brings aiohttp
        return False
    return isinstance(exc, aiohttp.ClientError)


@contextlib.contextmanager
def queue_errors(what: str) -> Iterator[None]:
    """Translate botocore and connection errors raised inside the block into :class:`QueueError`."""
    try:
        yield
    except ModalkitError:
        raise
    except Exception as exc:
        if not _is_aws_or_io_error(exc):
            raise
        raise QueueError(f"{what}: {_describe(exc)}", retryable=_aws_is_transient(exc)) from exc


@contextlib.contextmanager
def modal_errors(what: str) -> Iterator[None]:
    """Translate Modal SDK errors raised inside the block into :class:`RemoteError` or :class:`ConfigError`."""
    import modal.exception

    try:
        yield
    except ModalkitError:
        raise
    except modal.exception.NotFoundError as exc:
        raise ConfigError(f"{what}: {exc}", retryable=False) from exc
    except modal.exception.InvalidError as exc:
        raise ConfigError(f"{what}: {exc}", retryable=False) from exc
    except modal.exception.Error as exc:
        transient = (
            modal.exception.ConnectionError,
            modal.exception.TimeoutError,
            modal.exception.InternalFailure,
            modal.exception.InternalError,
            modal.exception.ResourceExhaustedError,
            modal.exception.ServiceError,
        )
        raise RemoteError(f"{what}: {_describe(exc)}", retryable=isinstance(exc, transient)) from exc
