"""Queue backends for success and failure records.

:class:`QueueBackend` is the protocol (one async method, as in the original modalkit) that any injected backend
implements. modalkit's own backends add a batch method, :meth:`BatchQueueBackend.send_batch`, that raises
:class:`~modalkit.exceptions.QueueError` instead of returning False, so a lost message can never go unnoticed.

* :class:`LocalQueueBackend`: the embedded default. Durable: messages live in a SQLite file and survive the
  process. A message with a ``dedup_id`` is stored once per queue, so a resumed job does not repeat it.
* :class:`SQSBackend`: Amazon SQS. ``SendMessageBatch`` in tens, failed entries retried with backoff, bodies over
  the threshold stored in S3 behind a pointer message, FIFO group and deduplication ids. A queue that does not
  exist is an error; modalkit never creates queues.
* :class:`MemoryBackend`: keeps messages in memory, for tests and examples.

Example:
    >>> import asyncio
    >>> from modalkit.task_queue import MemoryBackend
    >>> backend = MemoryBackend()
    >>> asyncio.run(backend.send_message("results", '{"ok": true}'))
    True
    >>> backend.messages("results")
    ['{"ok": true}']
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from modalkit.exceptions import ConfigError, QueueError, queue_errors, storage_errors

if TYPE_CHECKING:
    from modalkit.settings import QueueConfig

__all__ = [
    "BatchQueueBackend",
    "InMemoryBackend",
    "LocalQueueBackend",
    "MemoryBackend",
    "QueueBackend",
    "QueueMessage",
    "SQSBackend",
    "create_backend",
    "deliver",
    "deliver_sync",
    "register_backend",
    "resolve_message_body",
]

log = logging.getLogger(__name__)

SQS_BATCH_ENTRIES = 10
SQS_MAX_BATCH_BYTES = 256 * 1024
# the pointer format of the AWS SQS Extended Client libraries, so their consumers can read our large messages
S3_POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"
_DEDUP_ID_OK = re.compile(r"^[!-~]{1,128}$")  # printable ASCII without space, as SQS requires


@runtime_checkable
class QueueBackend(Protocol):
    """Protocol for queue backends: implement it to send records anywhere (TaskIQ, Kafka, Redis...).

    ``send_message`` returns True when the message was accepted. modalkit treats False as a failure and raises
    :class:`~modalkit.exceptions.QueueError`.
    """

    async def send_message(self, queue_name: str, message: str) -> bool:
        """Send ``message`` (a JSON string) to ``queue_name``; True when accepted."""
        ...


@dataclass(frozen=True, slots=True)
class QueueMessage:
    """A message body with optional FIFO ids.

    Attributes:
        body: The JSON string.
        dedup_id: Deduplication id (FIFO ``MessageDeduplicationId``; the local backend stores a dedup id once).
        group_id: FIFO ``MessageGroupId``; defaults to the backend's.
    """

    body: str
    dedup_id: str | None = None
    group_id: str | None = None


def _as_message(item: str | QueueMessage) -> QueueMessage:
    return item if isinstance(item, QueueMessage) else QueueMessage(item)


class BatchQueueBackend(ABC):
    """Base of modalkit's backends: a synchronous batch send that raises, and the async protocol on top."""

    @abstractmethod
    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        """Send every message or raise :class:`QueueError`; returns how many were sent."""

    async def send_messages(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        """Async form of :meth:`send_batch` (runs in a thread: sending blocks on I/O)."""
        return await asyncio.to_thread(self.send_batch, queue_name, list(messages))

    async def send_message(self, queue_name: str, message: str) -> bool:
        """Send one message; True when sent (failures raise :class:`QueueError`)."""
        await self.send_messages(queue_name, [message])
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""


def deliver_sync(backend: QueueBackend, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
    """Send ``messages`` through any backend from synchronous code; raises :class:`QueueError` on any failure."""
    if not messages:
        return 0
    if isinstance(backend, BatchQueueBackend):
        return backend.send_batch(queue_name, messages)
    return asyncio.run(deliver(backend, queue_name, messages))


async def deliver(backend: QueueBackend, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
    """Send ``messages`` through any backend; raises :class:`QueueError` if one is refused or fails."""
    if isinstance(backend, BatchQueueBackend):
        return await backend.send_messages(queue_name, messages)
    for item in messages:
        body = _as_message(item).body
        try:
            ok = await backend.send_message(queue_name, body)
        except QueueError:
            raise
        except Exception as exc:
            raise QueueError(f"{type(backend).__name__} failed to send to queue {queue_name!r}: {exc}") from exc
        if not ok:
            raise QueueError(f"{type(backend).__name__} refused a message for queue {queue_name!r}")
    return len(messages)


# --- memory --------------------------------------------------------------------------------------------------


class MemoryBackend(BatchQueueBackend):
    """Keeps messages in memory, per queue; inspect them with :meth:`messages`. For tests and examples.

    A message with a ``dedup_id`` already seen on its queue is dropped, like the local backend does.
    """

    _shared: MemoryBackend | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, list[str]] = {}
        self._seen: dict[str, set[str]] = {}

    @classmethod
    def shared(cls) -> MemoryBackend:
        """The process-wide instance that ``queue_config.backend: memory`` uses."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        with self._lock:
            stored = self._queues.setdefault(queue_name, [])
            seen = self._seen.setdefault(queue_name, set())
            for item in messages:
                msg = _as_message(item)
                if msg.dedup_id is not None:
                    if msg.dedup_id in seen:
                        continue
                    seen.add(msg.dedup_id)
                stored.append(msg.body)
        return len(messages)

    def messages(self, queue_name: str) -> list[str]:
        """The bodies sent to ``queue_name``, oldest first."""
        with self._lock:
            return list(self._queues.get(queue_name, []))

    def queues(self) -> list[str]:
        """Names of the queues that received messages."""
        with self._lock:
            return sorted(self._queues)

    def clear(self) -> None:
        """Drop every message."""
        with self._lock:
            self._queues.clear()
            self._seen.clear()


InMemoryBackend = MemoryBackend  # the original modalkit's name


# --- local (durable) -----------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    dedup_id TEXT,
    sent_at REAL NOT NULL,
    taken INTEGER NOT NULL DEFAULT 0,
    UNIQUE (queue, dedup_id)
);
CREATE INDEX IF NOT EXISTS messages_waiting ON messages (queue, taken, seq);
"""


class LocalQueueBackend(BatchQueueBackend):
    """Durable queues in a SQLite file: the embedded default, used when no cloud queue is configured.

    Messages are committed before :meth:`send_batch` returns, so they survive the process (and a crash of it).
    Several processes may send at once. Messages with a ``dedup_id`` are stored once per queue, ever: a taken
    message is marked, not deleted, so a resumed or retried batch job sends each record once even after a
    consumer drained the queue. Consumers read with :meth:`messages` or take with :meth:`receive`.

    Args:
        root: Directory of the queue file (created if missing).
    """

    FILE_NAME = "queues.sqlite3"

    def __init__(self, root: str | Path = ".modalkit/queues") -> None:
        self.root = Path(root)
        self.path = self.root / self.FILE_NAME
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            with storage_errors(f"opening the local queue file {self.path}"):
                self.root.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            try:
                _set_up(conn)
            except sqlite3.Error as exc:
                conn.close()
                raise QueueError(f"opening the local queue file {self.path}: {exc}", retryable=_is_busy(exc)) from exc
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise QueueError(f"{what} in {self.path}: {exc}", retryable=True) from exc
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        if not messages:
            return 0
        now = time.time()
        rows = [(queue_name, m.body, m.dedup_id, now) for m in map(_as_message, messages)]
        with self._transaction(f"sending to queue {queue_name!r}") as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO messages (queue, body, dedup_id, sent_at) VALUES (?, ?, ?, ?)", rows
            )
        return len(rows)

    def messages(self, queue_name: str) -> list[str]:
        """Every body waiting on ``queue_name``, oldest first (nothing is removed)."""
        with self._lock:
            cur = self._connection().execute(
                "SELECT body FROM messages WHERE queue = ? AND taken = 0 ORDER BY seq", (queue_name,)
            )
            return [row[0] for row in cur]

    def count(self, queue_name: str) -> int:
        """How many messages wait on ``queue_name``."""
        with self._lock:
            cur = self._connection().execute(
                "SELECT COUNT(*) FROM messages WHERE queue = ? AND taken = 0", (queue_name,)
            )
            return int(cur.fetchone()[0])

    def receive(self, queue_name: str, max_messages: int = 10) -> list[str]:
        """Take up to ``max_messages`` bodies off ``queue_name``, oldest first (they no longer wait)."""
        with self._transaction(f"receiving from queue {queue_name!r}") as conn:
            cur = conn.execute(
                "UPDATE messages SET taken = 1 WHERE seq IN "
                "(SELECT seq FROM messages WHERE queue = ? AND taken = 0 ORDER BY seq LIMIT ?) RETURNING seq, body",
                (queue_name, max_messages),
            )
            return [body for _, body in sorted(cur.fetchall())]

    def queues(self) -> list[str]:
        """Names of the queues holding messages."""
        with self._lock:
            cur = self._connection().execute("SELECT DISTINCT queue FROM messages WHERE taken = 0 ORDER BY 1")
            return [row[0] for row in cur]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _set_up(conn: sqlite3.Connection, timeout: float = 60.0) -> None:
    # Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is locked" at once
    # (without waiting busy_timeout) when another process opens the same new file at that moment: retry.
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.05)


def _is_busy(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


# --- SQS -----------------------------------------------------------------------------------------------------


class SQSBackend(BatchQueueBackend):
    """Amazon SQS, through one boto3 client per process.

    Args:
        client: A boto3 SQS client; default: the process's shared client (endpoint from ``AWS_ENDPOINT_URL_SQS``).
        s3_client: A boto3 S3 client for large bodies; default: the shared one.
        large_message_threshold: Bodies over this many bytes (UTF-8) are stored in S3; the message is a pointer.
        large_message_uri: ``s3://bucket/prefix`` for those bodies.
        max_send_attempts: Attempts for entries SQS reports as failed, and for transient errors, with backoff.
        message_group_id: ``MessageGroupId`` for FIFO queues when a message names none.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        s3_client: Any = None,
        large_message_threshold: int = 256 * 1024,
        large_message_uri: str | None = None,
        max_send_attempts: int = 8,
        message_group_id: str = "modalkit",
    ) -> None:
        self._client = client
        self._s3 = s3_client
        self.large_message_threshold = large_message_threshold
        self.large_message_uri = large_message_uri.rstrip("/") if large_message_uri else None
        self.max_send_attempts = max_send_attempts
        self.message_group_id = message_group_id
        self._urls: dict[str, str] = {}
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
        if self._client is None:
            from modalkit.aws import aws_client

            self._client = aws_client("sqs")
        return self._client

    @property
    def s3_client(self) -> Any:
        if self._s3 is None:
            from modalkit.aws import aws_client

            self._s3 = aws_client("s3")
        return self._s3

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
        url = self._lookup_queue_url(queue_name)
        with self._lock:
            self._urls[queue_name] = url
        return url

    def _lookup_queue_url(self, queue_name: str) -> str:
        # a lookup during a short outage gets the same retry budget as the send itself
        attempt = 1
        while True:
            try:
                return self._get_queue_url(queue_name)
            except QueueError as exc:
                if not exc.retryable or attempt >= self.max_send_attempts:
                    raise
                log.warning("retrying after a transient SQS error: %s", exc)
                time.sleep(_backoff(attempt))
                attempt += 1

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

    def send_batch(self, queue_name: str, messages: Sequence[str | QueueMessage]) -> int:
        if not messages:
            return 0
        url = self.queue_url(queue_name)
        fifo = queue_name.endswith(".fifo") or url.endswith(".fifo")
        entries = [self._entry(queue_name, _as_message(m), fifo) for m in messages]
        for batch in _batches(entries):
            self._send_entries(queue_name, url, batch)
        return len(entries)

    def _entry(self, queue_name: str, msg: QueueMessage, fifo: bool) -> dict[str, Any]:
        body = msg.body
        entry: dict[str, Any] = {}
        size = len(body.encode("utf-8"))
        if size > self.large_message_threshold:
            body = self._offload(queue_name, body, size)
            entry["MessageAttributes"] = {"ExtendedPayloadSize": {"DataType": "Number", "StringValue": str(size)}}
        entry["MessageBody"] = body
        if fifo:
            entry["MessageGroupId"] = msg.group_id or self.message_group_id
            entry["MessageDeduplicationId"] = _dedup_id(msg)
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
        # a QueueError, not a StorageError: send_batch's callers catch QueueError to mark one record undelivered
        with queue_errors(f"storing a large message in s3://{bucket}/{key}"):
            self.s3_client.put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"))
        return json.dumps([S3_POINTER_CLASS, {"s3BucketName": bucket, "s3Key": key}])

    def _send_entries(self, queue_name: str, url: str, entries: list[dict[str, Any]]) -> None:
        pending = {str(i): e for i, e in enumerate(entries)}
        last_error = ""
        for attempt in range(self.max_send_attempts):
            if attempt:
                time.sleep(_backoff(attempt))
            batch = [{"Id": i, **e} for i, e in pending.items()]
            try:
                with queue_errors(f"sending {len(batch)} messages to SQS queue {queue_name!r}"):
                    response = self.client.send_message_batch(QueueUrl=url, Entries=batch)
            except QueueError as exc:
                if not exc.retryable:
                    raise
                last_error = str(exc)
                log.warning("retrying after a transient SQS error: %s", exc)
                continue
            for ok in response.get("Successful", []):
                pending.pop(ok["Id"], None)
            for failed in response.get("Failed", []):
                if failed.get("SenderFault"):
                    raise QueueError(
                        f"SQS rejected a message for queue {queue_name!r}: {failed.get('Code')}: "
                        f"{failed.get('Message')} (body starts {pending[failed['Id']]['MessageBody'][:120]!r})",
                        retryable=False,
                    )
                last_error = f"{failed.get('Code')}: {failed.get('Message')}"
            if not pending:
                return
        raise QueueError(
            f"{len(pending)} of {len(entries)} messages to SQS queue {queue_name!r} still failed after "
            f"{self.max_send_attempts} attempts; last error: {last_error}",
            retryable=True,
        )

    def resolve_body(self, body: str) -> str:
        """The real body of a received message: follows an S3 pointer, returns any other body as it is."""
        return resolve_message_body(body, self.s3_client)


def _backoff(attempt: int) -> float:
    return min(5.0, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def _batches(entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        entry_size = len(entry["MessageBody"].encode("utf-8")) + 64
        if batch and (len(batch) == SQS_BATCH_ENTRIES or size + entry_size > SQS_MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_size
    if batch:
        yield batch


def _dedup_id(msg: QueueMessage) -> str:
    if msg.dedup_id is not None and _DEDUP_ID_OK.match(msg.dedup_id):
        return msg.dedup_id
    source = msg.dedup_id if msg.dedup_id is not None else msg.body
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


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


# --- factory -------------------------------------------------------------------------------------------------

BackendFactory = Callable[["QueueConfig"], QueueBackend]

_REGISTRY: dict[str, BackendFactory] = {
    "local": lambda config: LocalQueueBackend(config.local_path),
    "memory": lambda config: MemoryBackend.shared(),
    "sqs": SQSBackend.from_config,
}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``queue_config.backend: <name>`` build a backend with ``factory(queue_config)``.

    Example:
        >>> class Printer:
        ...     async def send_message(self, queue_name: str, message: str) -> bool:
        ...         print(queue_name, message)
        ...         return True
        >>> register_backend("printer", lambda config: Printer())
    """
    _REGISTRY[name] = factory


def create_backend(config: QueueConfig) -> QueueBackend | None:
    """The backend ``queue_config`` names, or None for ``none``.

    Raises:
        ConfigError: the name is neither built in nor registered.
    """
    if config.backend == "none":
        return None
    factory = _REGISTRY.get(config.backend)
    if factory is None:
        known = ", ".join(sorted([*_REGISTRY, "none"]))
        raise ConfigError(
            f"app_settings.queue_config.backend: unknown backend {config.backend!r} (known: {known}); "
            "register yours with modalkit.task_queue.register_backend, or inject it with queue_backend=..."
        )
    return factory(config)
