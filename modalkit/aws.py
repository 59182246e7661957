"""AWS clients, created once per process and passed in; endpoints come from the standard environment variables.

boto3 reads ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL_SQS`` itself, so pointing
modalkit at a local S3/SQS (moto, MinIO, LocalStack) needs no code. Clients are cached per process (a forked
worker makes its own) because creating one costs milliseconds and boto3 clients are thread-safe once made.

Example:
    >>> from modalkit.aws import aws_client
    >>> aws_client("sqs") is aws_client("sqs")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from modalkit.exceptions import ConfigError

__all__ = ["SsmKey", "aws_client", "aws_region", "make_client", "reset_clients", "s3_storage_options"]

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
DEFAULT_REGION = "us-east-1"
#: Seconds to wait for a connection to an AWS endpoint, and for a response.
CONNECT_TIMEOUT = 5
READ_TIMEOUT = 60


def aws_region() -> str:
    """The region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1 (S3 and SQS need one)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def aws_client(service: str) -> Any:
    """A boto3 client for ``service`` ("s3", "sqs", "ssm"), shared by every caller in this process."""
    key = (
        service,
        os.getpid(),
        aws_region(),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}"),
    )
    client = _clients.get(key)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = make_client(service)
            _clients[key] = client
    return client


def make_client(service: str, *, region_name: str | None = None, endpoint_url: str | None = None) -> Any:
    """A new boto3 client for ``service`` that makes one attempt per call: the caller owns retries.

    botocore's own retries are off (``total_max_attempts=1``) because modalkit retries every call it makes in one
    place per concern (storage calls, queue sends, chunks); two layers would multiply how long an outage takes to
    report. Connections time out after 5 s, reads after 60 s.
    """
    import boto3
    import botocore.config
    from botocore.exceptions import BotoCoreError

    config = botocore.config.Config(
        retries={"total_max_attempts": 1},
        max_pool_connections=32,
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
    )
    try:
        return boto3.session.Session().client(  # type: ignore[call-overload]
            service, region_name=region_name or aws_region(), endpoint_url=endpoint_url, config=config
        )
    except BotoCoreError as exc:
        raise ConfigError(f"cannot create the AWS {service} client: {exc}") from exc


def reset_clients() -> None:
    """Forget the cached clients (tests that change endpoints between cases call this)."""
    with _lock:
        _clients.clear()


def s3_storage_options() -> dict[str, Any]:
    """fsspec/s3fs options that follow the same environment variables as boto3, one attempt per call."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {
        "client_kwargs": {"region_name": aws_region()},
        "config_kwargs": {
            "retries": {"total_max_attempts": 1},
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
        },
    }
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class SsmKey:
    """An API key kept in AWS SSM Parameter Store: read with decryption, cached, read again every
    ``refresh_seconds``; after a rotation the previous key stays valid for ``refresh_seconds`` more, so that
    clients that fetched it just before are not cut off.

    A read that fails keeps the keys known so far (and is tried again at the next request); with no key known yet,
    no request is let in.
    """

    def __init__(self, name: str, refresh_seconds: float) -> None:
        self.name = name
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._current: str | None = None
        self._previous: tuple[str, float] | None = None  # the key before a rotation, and until when it is valid
        self._read_at = float("-inf")

    def valid_keys(self) -> tuple[str, ...]:
        """The keys a request may carry now."""
        now = time.monotonic()
        if now - self._read_at >= self.refresh_seconds:
            self._refresh(now)
        keys = [self._current] if self._current is not None else []
        if self._previous is not None and now < self._previous[1]:
            keys.append(self._previous[0])
        return tuple(keys)

    def _refresh(self, now: float) -> None:
        with self._lock:
            if now - self._read_at < self.refresh_seconds:
                return
            try:
                value = aws_client("ssm").get_parameter(Name=self.name, WithDecryption=True)["Parameter"]["Value"]
            except Exception:  # botocore's errors, a lost endpoint: keep what we know, try again soon
                self._read_at = now - self.refresh_seconds + 1.0
                return
            if self._current is not None and value != self._current:
                self._previous = (self._current, now + self.refresh_seconds)
            self._current = str(value)
            self._read_at = now
