"""A chunk's failure log: its failure rows (also the failure queue's records) and its failures by error type.

Each failed record becomes one :class:`~modalkit.iomodel.FailureRecord` body, built as bytes from the model's field
names; the same bytes are the failure file's row and the failure queue's message. Each sub-batch collects its own
failures (:class:`FailureRows`, on whichever thread works on the sub-batch at the time); the chunk's log takes them
in input order (:meth:`FailureLog.take`), so the rows, the queue records and the counts come out the same however
the stages of consecutive sub-batches overlapped. The log counts failures per ``error_type`` with the first one's
stage and message, for the job's report (at most ``MAX_ERROR_TYPES`` types).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from modalkit.batch.queueing import dedup_id
from modalkit.inference_pipeline import RecordError
from modalkit.iomodel import FailureRecord, json_template

__all__ = ["FAILURE_BODY", "MAX_ERROR_TYPES", "MAX_EXAMPLE_CHARS", "MAX_INPUT_CHARS", "FailureLog", "FailureRows"]

#: A raw line (a record that did not parse) keeps at most this many characters in its failure row.
MAX_INPUT_CHARS = 100_000
#: A chunk reports its failures by error_type (for the job's report) for at most this many types, each with the
#: first failure's stage and message cut to MAX_EXAMPLE_CHARS; the failure files hold every failure.
MAX_ERROR_TYPES = 20
MAX_EXAMPLE_CHARS = 300

FAILURE_BODY = json_template(FailureRecord, ("job_id", "record_id", "stage", "error_type", "error", "input", "meta"))


class FailureRows:
    """The failures of one sub-batch, in the order they were logged: rows, failure queue records, errors.

    Args:
        job_id: The job.
        key: The file's key (each record's ``meta.key``); a sub-batch spanning several files names each with
            :meth:`use`.
        where: Describes a position in the file (``a.jsonl at byte 120``); it starts each record's ``error``.
        queued: Whether the failures also go to a failure queue (their deduplication ids are then made).
    """

    __slots__ = ("_job_json", "errors", "job_id", "key", "lines", "queue", "queued", "where")

    def __init__(self, job_id: str, key: str, where: Callable[[int], str], queued: bool = False) -> None:
        self.job_id = job_id
        self.key = key
        self.where = where
        self.queued = queued
        self._job_json = orjson.dumps(job_id)
        #: each failure's row (also its queue record's body), ending with a newline
        self.lines: list[bytes] = []
        #: each failure's (ordinal, deduplication id, body) for the failure queue, when ``queued``
        self.queue: list[tuple[int, str, bytes]] = []
        #: each failure's (error, the error text of its row), for the counts by error type
        self.errors: list[tuple[RecordError, str]] = []

    def use(self, key: str, where: Callable[[int], str]) -> None:
        """Log the next failures as records of file ``key`` (a packed chunk reads several files)."""
        self.key = key
        self.where = where

    def add(self, ordinal: int, record_id: Any, pos: int, error: RecordError, data: Any) -> None:
        """Log one failed record: its row, its queue record."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace").rstrip("\r\n")
        if isinstance(data, str) and len(data) > MAX_INPUT_CHARS:
            data = data[:MAX_INPUT_CHARS] + "..."
        error_text = f"{self.where(pos)}: {error.error}"
        dumps = orjson.dumps
        body = FAILURE_BODY % (
            self._job_json,
            dumps(record_id),
            dumps(error.stage),
            dumps(error.error_type),
            dumps(error_text),
            dumps(data, default=str),
            dumps({"key": self.key, "position": pos}),
        )
        self.lines.append(body + b"\n")
        self.errors.append((error, error_text))
        if self.queued:  # whole: a body too large for its queue is the queue backend's to place
            self.queue.append((ordinal, dedup_id(self.job_id, self.key, pos), body))


class FailureLog:
    """The failures of one chunk: how many, and the first of each error type.

    Args:
        job_id: The job.
        queued: Whether the failures also go to a failure queue (see :class:`FailureRows`).
    """

    def __init__(self, job_id: str, queued: bool = False) -> None:
        self.job_id = job_id
        self.queued = queued
        self.failed = 0
        self.errors_by_type: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}

    def rows(self, key: str, where: Callable[[int], str]) -> FailureRows:
        """An empty log for the failures of one sub-batch, starting in file ``key``."""
        return FailureRows(self.job_id, key, where, self.queued)

    def take(self, rows: FailureRows) -> None:
        """Count a sub-batch's failures (call it with the sub-batches in input order)."""
        self.failed += len(rows.lines)
        errors_by_type = self.errors_by_type
        for error, error_text in rows.errors:
            count = errors_by_type.get(error.error_type)
            if count is not None:
                errors_by_type[error.error_type] = count + 1
            elif len(errors_by_type) < MAX_ERROR_TYPES:
                errors_by_type[error.error_type] = 1
                self.error_examples[error.error_type] = f"{error.stage}: {error_text}"[:MAX_EXAMPLE_CHARS]
