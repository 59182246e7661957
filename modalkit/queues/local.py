"""The local backend: durable queues in a SQLite file, the embedded default when no cloud queue is configured."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random

from modalkit.exceptions import QueueError, storage_errors
from modalkit.queues.base import BatchQueueBackend, QueueMessage, as_message

__all__ = ["LocalQueueBackend"]

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
#: How long opening a new queue file waits for another process that is creating the same file.
SETUP_SECONDS = 60.0


class LocalQueueBackend(BatchQueueBackend):
    """Durable queues in a SQLite file.

    Messages are committed before :meth:`send_batch` returns, so they survive the process (and a crash of it).
    A body of any size is stored whole.
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
        rows = [(queue_name, m.body, m.dedup_id, now) for m in (as_message(item, queue_name) for item in messages)]
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

    def location(self) -> str:
        """The queue file's absolute path."""
        return os.path.abspath(self.path)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


# Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is locked" at once (without
# waiting busy_timeout) when another process opens the same new file at that moment: try again, briefly.
@retry(retry=retry_if_exception(_is_busy), stop=stop_after_delay(SETUP_SECONDS), wait=wait_random(0.01, 0.06),
       reraise=True)  # fmt: skip
def _set_up(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA busy_timeout=60000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
