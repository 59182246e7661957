"""Sending a chunk's success and failure records while the chunk is still being computed.

Records are handed over one window (one sub-batch) at a time and sent by a background thread, in window order,
so slow queue I/O overlaps the model's work; at most ``MAX_PENDING_WINDOWS`` windows wait, which bounds memory.

Exactly-once across crashes: every message carries ``dedup_id = <job_id>:<record_id>`` (the local queue stores a
dedup id once; SQS FIFO queues drop repeats within five minutes), and after each acknowledged window the sender
records in a small journal (``_chunks/NNNNN.progress.json``, written at most every ``JOURNAL_INTERVAL`` seconds)
how far the chunk's records have been sent. A retried or resumed chunk skips the records the journal covers, so
on a standard SQS queue only the records sent after the last journal write can be sent twice.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque

import orjson

from modalkit.batch import storage
from modalkit.exceptions import ModalkitError, QueueError
from modalkit.queues import QueueBackend, QueueMessage, deliver_sync

__all__ = ["RecordSender", "dedup_id", "read_journal"]

MAX_PENDING_WINDOWS = 3
JOURNAL_INTERVAL = 0.5


def dedup_id(job_id: str, record_id: object) -> str:
    """``<job_id>:<record_id>``: the same record of the same job is one message, whatever retried or resumed.

    Backends make it fit their rules (the SQS backend hashes an id SQS would refuse); this is the logical id.
    """
    return f"{job_id}:{record_id}"


def read_journal(uri: str) -> int:
    """How many of the chunk's records were already sent (0 when there is no journal)."""
    if not storage.exists(uri):
        return 0
    try:
        return int(orjson.loads(storage.read_bytes(uri))["sent_before"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0


class RecordSender:
    """Sends one chunk's records to the success and failure queues, in the background, journaling progress.

    Args:
        backend: Where messages go.
        success_queue: Queue for success records, or None.
        failure_queue: Queue for failure records, or None.
        journal_uri: Where progress is recorded.
        group_id: FIFO MessageGroupId for this chunk's messages.
        skip_before: Records with an ordinal below this were sent by an earlier attempt and are skipped.
    """

    def __init__(
        self,
        backend: QueueBackend,
        success_queue: str | None,
        failure_queue: str | None,
        journal_uri: str,
        group_id: str,
        skip_before: int = 0,
    ) -> None:
        self.backend = backend
        self.queues = {"success": success_queue, "failure": failure_queue}
        self.journal_uri = journal_uri
        self.group_id = group_id
        self.skip_before = skip_before
        self.sent = {"success": 0, "failure": 0}
        self._window: dict[str, list[QueueMessage]] = {"success": [], "failure": []}
        self._pending: deque[concurrent.futures.Future[None]] = deque()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="modalkit-queue")
        self._last_journal = 0.0
        self._failed: ModalkitError | None = None

    def add(self, kind: str, ordinal: int, dedup: str, body: bytes) -> None:
        """Queue a record (``kind`` is "success" or "failure") for the current window."""
        if ordinal < self.skip_before or self.queues[kind] is None:
            return
        self._window[kind].append(QueueMessage(body.decode("utf-8"), dedup_id=dedup, group_id=self.group_id))

    def end_window(self, next_ordinal: int) -> None:
        """Hand the window's records to the background thread; ``next_ordinal`` is the first one not in it."""
        window, self._window = self._window, {"success": [], "failure": []}
        while len(self._pending) >= MAX_PENDING_WINDOWS:
            self._pending.popleft().result()
        for done in [f for f in self._pending if f.done()]:
            done.result()  # surface a failure early
        self._pending.append(self._pool.submit(self._send_window, window, next_ordinal))

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
                storage.write_bytes(self.journal_uri, orjson.dumps({"sent_before": next_ordinal}))
                self._last_journal = now
        except ModalkitError as exc:
            self._failed = exc
            raise
        except BaseException as exc:
            self._failed = QueueError(f"{type(exc).__name__}: {exc}", retryable=False)
            raise

    def close(self) -> None:
        """Wait until every window is sent.

        Raises:
            QueueError: a window could not be sent (later windows are not sent either).
        """
        try:
            while self._pending:
                self._pending.popleft().result()
        except QueueError:
            for future in self._pending:
                future.cancel()
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop sending (the chunk failed); what was sent stays journaled."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
