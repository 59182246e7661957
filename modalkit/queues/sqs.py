"""The SQS backend: Amazon SQS through one boto3 client per process.

``SendMessageBatch`` in tens; entries SQS reports as failed and transient errors are tried again, with backoff,
up to ``max_send_attempts`` times (this is the one retry layer of a send: the boto3 clients modalkit makes do not
retry on their own). The size policy is this backend's: bodies over ``large_message_threshold`` (256 KiB, SQS's
limit) are stored in S3 behind a pointer message in the AWS SQS Extended Client format when ``large_message_uri``
is set; without it, a failure record is sent with the start of its input (``input_truncated``), and any other body
over the threshold is an error. A message with a dedup id carries it as the ``dedup_id`` message attribute (a
String), so that consumers of standard queues can deduplicate on it (its bytes count toward the threshold, as
SQS counts attributes toward its limit); FIFO queues also get it as the ``MessageDeduplicationId``, and a
``MessageGroupId``. A queue that does not exist is an error: modalkit never creates queues.

Example:
    >>> from modalkit.queues import SQSBackend
    >>> backend = SQSBackend(queue_url="https://sqs.us-east-1.amazonaws.com/123456789012/scored")
    >>> backend.queue_url("scored")
    'https://sqs.us-east-1.amazonaws.com/123456789012/scored'
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_random_exponential

from modalkit.exceptions import BackendError, QueueError, is_retryable, queue_errors, storage_errors
from modalkit.iomodel import truncate_failure_input
from modalkit.queues.base import BatchQueueBackend, QueueMessage, as_message

if TYPE_CHECKING:
    from modalkit.settings import QueueConfig

__all__ = ["DEDUP_ATTRIBUTE", "S3_POINTER_CLASS", "SQSBackend", "fifo_dedup_id", "resolve_message_body"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SQS_BATCH_ENTRIES = 10
SQS_MAX_BATCH_BYTES = 256 * 1024
#: Longest wait between two attempts of a send (seconds); waits grow 0.2, 0.4, 0.8 s... up to this, with jitter.
MAX_BACKOFF_SECONDS = 5.0
# the pointer format of the AWS SQS Extended Client libraries, so their consumers can read our large messages
S3_POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"
#: The message attribute that carries a message's dedup id (consumers of standard queues deduplicate on it).
DEDUP_ATTRIBUTE = "dedup_id"
_DEDUP_ID_OK = re.compile(r"^[!-~]{1,128}$")  # printable ASCII without space, 1..128 characters, as SQS requires
# keys of a QueueConfig dump that the original modalkit passed to every backend (create_backend(backend, **dump))
_CONFIG_ONLY_KEYS = frozenset({"backend", "local_path", "broker_url", "allowed_queues"})


def fifo_dedup_id(message: QueueMessage) -> str:
    """The ``MessageDeduplicationId`` for ``message``: its dedup id when SQS accepts it as it is, else its SHA-256.

    SQS takes 1..128 printable ASCII characters; a longer id, or one holding other characters, is hashed (so the
    same dedup id always maps to the same SQS id). A message without a dedup id is deduplicated on its body.
    """
    if message.dedup_id is not None and _DEDUP_ID_OK.match(message.dedup_id):
        return message.dedup_id
    source = message.dedup_id if message.dedup_id is not None else message.body
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


class SQSBackend(BatchQueueBackend):
    """Amazon SQS.

    Args:
        client: A boto3 SQS client; default: the process's shared client (endpoint from ``AWS_ENDPOINT_URL_SQS``).
        s3_client: A boto3 S3 client for large bodies; default: the shared one.
        queue_url: The URL of a queue this backend sends to (the original modalkit's keyword): its name, the URL's
            last part, then resolves without a lookup. Any queue may still be named, or given by URL.
        region_name: Region for a client of this backend's own (default: ``AWS_REGION``, else us-east-1).
        endpoint_url: Endpoint for a client of this backend's own (default: ``AWS_ENDPOINT_URL_SQS``).
        large_message_threshold: Bodies over this many bytes (UTF-8) are stored in S3; the message is a pointer.
        large_message_uri: ``s3://bucket/prefix`` for those bodies. Without it a failure record over the threshold
            carries the start of its input (``input_truncated``: true), and any other body over it is an error.
        max_send_attempts: Attempts of a send (entries SQS reports as failed, transient errors), with backoff.
        message_group_id: ``MessageGroupId`` for FIFO queues when a message names none.
        **config_keys: ``backend``, ``local_path``, ``broker_url`` and ``allowed_queues`` are accepted and ignored,
            so that ``create_backend("sqs", **queue_config.model_dump())`` works as it did in the original modalkit.

    Attributes:
        available: True: this backend can send (boto3 is one of modalkit's requirements, so it always starts True).
            The original modalkit set it False when boto3 was missing; set False, ``send_message`` returns False
            (the protocol's "not sent") and ``send_batch`` raises :class:`QueueError`.

    Raises:
        BackendError: an unknown keyword.
    """

    available: bool = True

    def __init__(
        self,
        client: Any = None,
        *,
        s3_client: Any = None,
        queue_url: str | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        large_message_threshold: int = 256 * 1024,
        large_message_uri: str | None = None,
        max_send_attempts: int = 8,
        message_group_id: str = "modalkit",
        **config_keys: Any,
    ) -> None:
        unknown = sorted(set(config_keys) - _CONFIG_ONLY_KEYS)
        if unknown:
            raise BackendError(f"SQSBackend() got unknown keyword(s): {', '.join(unknown)}")
        self._client = client
        self._s3 = s3_client
        self._client_kwargs = {k: v for k, v in (("region_name", region_name), ("endpoint_url", endpoint_url)) if v}
        self.large_message_threshold = int(large_message_threshold)
        self.large_message_uri = large_message_uri.rstrip("/") if large_message_uri else None
        self.max_send_attempts = max_send_attempts
        self.message_group_id = message_group_id
        self._urls: dict[str, str] = {}
        if queue_url:
            self._urls[queue_url.rstrip("/").rsplit("/", 1)[-1]] = queue_url
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: QueueConfig) -> SQSBackend:
        """Build from ``app_settings.queue_config``."""
        return cls(
            large_message_threshold=int(config.large_message_threshold),
            large_message_uri=config.large_message_uri,
            max_send_attempts=config.max_send_attempts,
            message_group_id=config.message_group_id,
        )

    @property
    def client(self) -> Any:
        """The boto3 SQS client."""
        if self._client is None:
            from modalkit.aws import aws_client, make_client

            self._client = make_client("sqs", **self._client_kwargs) if self._client_kwargs else aws_client("sqs")
        return self._client

    @property
    def s3_client(self) -> Any:
        """The boto3 S3 client for large bodies."""
        if self._s3 is None:
            from modalkit.aws import aws_client

            self._s3 = aws_client("s3")
        return self._s3

    def _attempts(self, call: Callable[[], T]) -> T:
        """``call()``, tried again on retryable QueueErrors up to ``max_send_attempts`` times in all."""
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, QueueError) and is_retryable(exc)),
            stop=stop_after_attempt(self.max_send_attempts),
            wait=wait_random_exponential(multiplier=0.2, max=MAX_BACKOFF_SECONDS),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        return retrying(call)

    def check_queues(self, queue_names: Sequence[str]) -> None:
        """Look every queue up (once); raises :class:`QueueError` naming the first that does not exist."""
        for name in queue_names:
            self.queue_url(name)

    def location(self) -> str:
        """The SQS endpoint the client talks to."""
        return str(self.client.meta.endpoint_url)

    def address(self, queue_name: str) -> str:
        """The queue's URL (looked up once)."""
        return self.queue_url(queue_name)

    def queue_url(self, queue_name: str) -> str:
        """The queue's URL, looked up once. A queue URL may be given instead of a name.

        Raises:
            QueueError: the queue does not exist (it is never created here).
        """
        if queue_name.startswith(("https://", "http://")):
            return queue_name
        url = self._urls.get(queue_name)
        if url is not None:
            return url
        url = self._attempts(lambda: self._get_queue_url(queue_name))
        with self._lock:
            self._urls[queue_name] = url
        return url

    def _get_queue_url(self, queue_name: str) -> str:
        try:
            with queue_errors(f"looking up SQS queue {queue_name!r}"):
                return str(self.client.get_queue_url(QueueName=queue_name)["QueueUrl"])
        except QueueError as exc:
            if "NonExistentQueue" in str(exc) or "QueueDoesNotExist" in str(exc):
                raise QueueError(
                    f"SQS queue {queue_name!r} does not exist; create it first (modalkit never creates queues)",
                    retryable=False,
                ) from exc
            raise

    async def send_message(self, queue_name: str, message: str) -> bool:
        """Send one message; True when sent, False when this backend is not :attr:`available`."""
        if not self.available:
            log.warning("SQSBackend is not available; message for queue %r not sent", queue_name)
            return False
        return await super().send_message(queue_name, message)

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        if not self.available:
            raise QueueError(f"SQSBackend is not available (available=False); nothing sent to queue {queue_name!r}")
        if not messages:
            return 0
        batch = [as_message(item, queue_name) for item in messages]
        url = self.queue_url(queue_name)
        fifo = queue_name.endswith(".fifo") or url.endswith(".fifo")
        entries = [self._entry(queue_name, msg, fifo) for msg in batch]
        for group in _batches(entries):
            self._send_entries(queue_name, url, group)
        return len(entries)

    def _entry(self, queue_name: str, msg: QueueMessage, fifo: bool) -> dict[str, Any]:
        body = msg.body
        attributes: dict[str, Any] = {}
        if msg.dedup_id is not None:
            attributes[DEDUP_ATTRIBUTE] = {"DataType": "String", "StringValue": msg.dedup_id}
        limit = self.large_message_threshold - _attributes_size(attributes)
        size = len(body.encode("utf-8"))
        if size > limit:
            cut = None if self.large_message_uri else truncate_failure_input(body, limit)
            if cut is not None:
                body = cut
            else:
                body = self._offload(queue_name, body, size)
                attributes["ExtendedPayloadSize"] = {"DataType": "Number", "StringValue": str(size)}
        entry: dict[str, Any] = {"MessageBody": body}
        if attributes:
            entry["MessageAttributes"] = attributes
        if fifo:
            entry["MessageGroupId"] = msg.group_id or self.message_group_id
            entry["MessageDeduplicationId"] = fifo_dedup_id(msg)
        return entry

    def _offload(self, queue_name: str, body: str, size: int) -> str:
        if not self.large_message_uri:
            raise QueueError(
                f"a message of {size} bytes for queue {queue_name!r} is over large_message_threshold "
                f"({self.large_message_threshold} bytes) and app_settings.queue_config.large_message_uri is not set",
                retryable=False,
            )
        bucket, _, prefix = self.large_message_uri.removeprefix("s3://").partition("/")
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
        key = "/".join(p for p in (prefix, _safe_key(queue_name), f"{digest}.json") if p)

        def put() -> None:
            # a QueueError, not a StorageError: send_batch's callers catch QueueError to mark one record undelivered
            with queue_errors(f"storing a large message in s3://{bucket}/{key}"):
                self.s3_client.put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"))

        self._attempts(put)
        return json.dumps([S3_POINTER_CLASS, {"s3BucketName": bucket, "s3Key": key}])

    def _send_entries(self, queue_name: str, url: str, entries: list[dict[str, Any]]) -> None:
        pending = {str(i): e for i, e in enumerate(entries)}

        def attempt() -> None:
            batch = [{"Id": i, **e} for i, e in pending.items()]
            with queue_errors(f"sending {len(batch)} messages to SQS queue {queue_name!r}"):
                response = self.client.send_message_batch(QueueUrl=url, Entries=batch)
            for ok in response.get("Successful", []):
                pending.pop(ok["Id"], None)
            errors = []
            for failed in response.get("Failed", []):
                if failed.get("SenderFault"):
                    raise QueueError(
                        f"SQS rejected a message for queue {queue_name!r}: {failed.get('Code')}: "
                        f"{failed.get('Message')} (body starts {pending[failed['Id']]['MessageBody'][:120]!r})",
                        retryable=False,
                    )
                errors.append(f"{failed.get('Code')}: {failed.get('Message')}")
            if pending:
                raise QueueError(f"SQS did not take {len(pending)} messages: {errors[0]}", retryable=True)

        try:
            self._attempts(attempt)
        except QueueError as exc:
            if not exc.retryable:
                raise
            raise QueueError(
                f"{len(pending)} of {len(entries)} messages to SQS queue {queue_name!r} still failed after "
                f"{self.max_send_attempts} attempts; last error: {exc}",
                retryable=True,
            ) from exc

    def resolve_body(self, body: str) -> str:
        """The real body of a received message: follows an S3 pointer, returns any other body as it is."""
        return resolve_message_body(body, self.s3_client)


def _batches(entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        attributes = _attributes_size(entry.get("MessageAttributes", {}))
        entry_size = len(entry["MessageBody"].encode("utf-8")) + attributes + 64
        if batch and (len(batch) == SQS_BATCH_ENTRIES or size + entry_size > SQS_MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_size
    if batch:
        yield batch


def _attributes_size(attributes: dict[str, Any]) -> int:
    """The bytes SQS counts for message attributes: each one's name, data type and value."""
    return sum(
        len(name.encode()) + len(a["DataType"].encode()) + len(a["StringValue"].encode())
        for name, a in attributes.items()
    )


def _safe_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def resolve_message_body(body: str, s3_client: Any = None) -> str:
    """Follow an S3 pointer written for a large message (AWS Extended Client format); other bodies pass through."""
    if not body.startswith(f'["{S3_POINTER_CLASS}"'):
        return body
    pointer = json.loads(body)[1]
    if s3_client is None:
        from modalkit.aws import aws_client

        s3_client = aws_client("s3")
    uri = f"s3://{pointer['s3BucketName']}/{pointer['s3Key']}"
    with storage_errors(f"reading the large message body at {uri}"):
        obj = s3_client.get_object(Bucket=pointer["s3BucketName"], Key=pointer["s3Key"])
        return str(obj["Body"].read().decode("utf-8"))
