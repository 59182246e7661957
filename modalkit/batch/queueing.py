"""Sending a chunk's success and failure records once its part and failure files are durable.

While a chunk is computed its records are spooled to a local file, one window (one sub-batch) at a time. Only when
the chunk's part file and failure file are in place does :meth:`RecordSender.close` send them, window by window in
order, on a background thread (at most ``MAX_PENDING_WINDOWS`` windows wait, which bounds memory). So a queue never
holds a record that no output file holds: a chunk that fails for good (a truncated input, a crashing record, a
worker killed) has sent nothing.

Exactly-once across crashes: every message carries the deduplication id of its *input record*,
``<job_id>:<file key>:<position>`` (:func:`dedup_id`; the local queue stores a dedup id once, SQS FIFO queues drop
repeats within five minutes, and SQS messages carry it as the ``dedup_id`` attribute for consumers of standard
queues). It is stable across retries and resumes, and two records that share a record id (two files, or two
chunks, holding the same ``id_field`` value) are two messages. After each acknowledged window the sender
records in a small journal (``_chunks/NNNNN.progress.json``, written at most every ``JOURNAL_INTERVAL`` seconds)
how far the chunk's records have been sent. A retried or resumed chunk skips the records the journal covers, so
on a standard SQS queue only the records sent after the last journal write can be sent twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Iterator

import orjson

from modalkit.batch.storage import Store, default_store
from modalkit.exceptions import ModalkitError, QueueError
from modalkit.queues import QueueBackend, QueueMessage, deliver_sync

__all__ = ["RecordSender", "dedup_id", "read_journal"]

MAX_PENDING_WINDOWS = 3
JOURNAL_INTERVAL = 0.5


#: The longest dedup id (SQS's limit on a MessageDeduplicationId), and the characters it may hold as it is.
MAX_DEDUP_ID = 128
_PLAIN_DEDUP = re.compile(r"^[!-~]+$")


def dedup_id(job_id: str, key: str, position: int) -> str:
    """The deduplication id of the input record at ``position`` (byte offset or row index) of file ``key``.

    ``<job_id>:<key>:<position>``: the same record of the same job is one message whatever retried or resumed (the
    position does not depend on how the input was cut into chunks), and two records are two messages even when they
    share a record id. When that is over 128 characters or holds a character outside printable ASCII (a space, an
    accent), the part after the job id is a SHA-256 of ``<key>:<position>`` instead (40 hex digits).

    Example:
        >>> dedup_id("3f9a2c7d1e5b8a40", "2026/orders.jsonl", 120)
        '3f9a2c7d1e5b8a40:2026/orders.jsonl:120'
    """
    plain = f"{job_id}:{key}:{position}"
    if len(plain) <= MAX_DEDUP_ID and _PLAIN_DEDUP.match(plain):
        return plain
    return f"{job_id}:{hashlib.sha256(f'{key}:{position}'.encode()).hexdigest()[:40]}"


def read_journal(uri: str, store: Store | None = None) -> int:
    """How many of the chunk's records were already sent (0 when there is no journal), read through ``store``."""
    store = store or default_store()
    if not store.exists(uri):
        return 0
    try:
        return int(orjson.loads(store.read_bytes(uri))["sent_before"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0


class RecordSender:
    """Spools one chunk's records while it runs, then sends them to the success and failure queues, journaling.

    Args:
        backend: Where messages go.
        success_queue: Queue for success records, or None.
        failure_queue: Queue for failure records, or None.
        journal_uri: Where progress is recorded.
        group_id: FIFO MessageGroupId for this chunk's messages.
        skip_before: Records with an ordinal below this were sent by an earlier attempt and are skipped.
        spool_dir: A local folder for the spool file (the chunk's staging folder); default: the temp folder.
        store: Where the journal is written; default: the process's store.
    """

    def __init__(
        self,
        backend: QueueBackend,
        success_queue: str | None,
        failure_queue: str | None,
        journal_uri: str,
        group_id: str,
        skip_before: int = 0,
        spool_dir: str | None = None,
        store: Store | None = None,
    ) -> None:
        self.backend = backend
        self.store = store or default_store()
        self.queues = {"success": success_queue, "failure": failure_queue}
        self.journal_uri = journal_uri
        self.group_id = group_id
        self.skip_before = skip_before
        #: records of this chunk on each queue: sent by this attempt, or by an earlier one (the journal says so)
        self.sent = {"success": 0, "failure": 0}
        fd, self._spool_path = tempfile.mkstemp(dir=spool_dir, prefix="queue-", suffix=".spool")
        self._spool = os.fdopen(fd, "wb", buffering=1 << 20)
        self._pending: deque[concurrent.futures.Future[None]] = deque()
        self._last_journal = 0.0
        self._failed: ModalkitError | None = None

    def add(self, kind: str, ordinal: int, dedup: str, body: bytes) -> None:
        """Spool a record (``kind`` is "success" or "failure") for the current window."""
        if self.queues[kind] is None:
            return
        if ordinal < self.skip_before:  # an earlier attempt sent it: it is on the queue, and counts as queued
            self.sent[kind] += 1
            return
        self._spool.write(orjson.dumps((kind, dedup, body.decode("utf-8"))) + b"\n")

    def end_window(self, next_ordinal: int) -> None:
        """Close the current window; ``next_ordinal`` is the first record not in it."""
        self._spool.write(b"%d\n" % next_ordinal)

    def close(self) -> None:
        """Send every spooled window, in order, and wait until all are acknowledged. Call it only once the chunk's
        part and failure files are durable.

        Raises:
            QueueError: a window could not be sent (later windows are not sent either).
        """
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="modalkit-queue")
        try:
            self._spool.close()
            for window, next_ordinal in self._windows():
                while len(self._pending) >= MAX_PENDING_WINDOWS:
                    self._pending.popleft().result()
                self._pending.append(pool.submit(self._send_window, window, next_ordinal))
            while self._pending:
                self._pending.popleft().result()
        except QueueError:
            for future in self._pending:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._remove_spool()

    def abort(self) -> None:
        """Send nothing (the chunk failed); what an earlier attempt sent stays journaled."""
        self._spool.close()
        self._remove_spool()

    def _windows(self) -> Iterator[tuple[dict[str, list[QueueMessage]], int]]:
        window: dict[str, list[QueueMessage]] = {"success": [], "failure": []}
        with open(self._spool_path, "rb") as spool:
            for line in spool:
                if line[0] != 0x5B:  # not "[": a window's end, the ordinal after it
                    yield window, int(line)
                    window = {"success": [], "failure": []}
                    continue
                kind, dedup, body = orjson.loads(line)
                window[kind].append(QueueMessage(body, dedup_id=dedup, group_id=self.group_id))
        if window["success"] or window["failure"]:  # records added after the last end_window
            yield window, self.skip_before

    def _remove_spool(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self._spool_path)

    def _send_window(self, window: dict[str, list[QueueMessage]], next_ordinal: int) -> None:
        # Windows run one after another on one thread. Once one fails, no later one may be sent: its journal entry
        # would cover the failed window's records, and the retried chunk would skip them (lost, not resent).
        if self._failed is not None:
            raise QueueError(
                f"not sent: an earlier window of records failed ({self._failed})", retryable=self._failed.retryable
            )
        try:
            for kind, messages in window.items():
                queue = self.queues[kind]
                if messages and queue is not None:
                    deliver_sync(self.backend, queue, messages)
                    self.sent[kind] += len(messages)
            now = time.monotonic()
            # never below skip_before: the windows a retry skips sent nothing, and must not undo the journal
            if next_ordinal > self.skip_before and now - self._last_journal >= JOURNAL_INTERVAL:
                self.store.write_bytes(self.journal_uri, orjson.dumps({"sent_before": next_ordinal}))
                self._last_journal = now
        except ModalkitError as exc:
            self._failed = exc
            raise
        except BaseException as exc:
            self._failed = QueueError(f"{type(exc).__name__}: {exc}", retryable=False)
            raise
