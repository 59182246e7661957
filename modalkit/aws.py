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
from typing import Any

from modalkit.exceptions import ConfigError

__all__ = ["aws_client", "aws_region", "reset_clients", "s3_storage_options"]

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
DEFAULT_REGION = "us-east-1"


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
            client = _make_client(service)
            _clients[key] = client
    return client


def _make_client(service: str) -> Any:
    import boto3
    import botocore.config
    from botocore.exceptions import BotoCoreError

    config = botocore.config.Config(
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=32,
        connect_timeout=5,
        read_timeout=60,
    )
    try:
        return boto3.session.Session().client(service, region_name=aws_region(), config=config)  # type: ignore[call-overload]
    except BotoCoreError as exc:
        raise ConfigError(f"cannot create the AWS {service} client: {exc}") from exc


def reset_clients() -> None:
    """Forget the cached clients (tests that change endpoints between cases call this)."""
    with _lock:
        _clients.clear()


def s3_storage_options() -> dict[str, Any]:
    """fsspec/s3fs options that follow the same environment variables as boto3."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"client_kwargs": {"region_name": aws_region()}}
    if endpoint:
        options["endpoint_url"] = endpoint
    return options
